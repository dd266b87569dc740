"""lm-eval task definitions for local files, so `lm_eval` itself can run the very items medpipe's
`protocol: lm-eval` scores (the parity test, bench/bench_eval_protocols.py, a user who wants the
harness's own number): `write_tasks(folder, {"medqa_4options": path, ...})` writes one YAML per
task plus the adapters they use, then

    lm_eval run --model hf --model_args pretrained=MODEL,dtype=float32 --include_path FOLDER \\
        --tasks local_medqa_4options,local_medmcqa,local_pubmedqa --log_samples --output_path OUT

The YAMLs are lm_eval 0.4.13's tasks/medqa/medqa.yaml, tasks/medmcqa/medmcqa.yaml and
tasks/pubmedqa/pubmedqa.yaml with the Hub dataset replaced by the local file; the prompt functions
are lm-eval's own (imported by the adapters, not re-implemented). The adapters turn the published
file shapes into the Hub rows those prompts read: MedQA jsonl → sent1/ending0-3/label, MedMCQA's
original cop 1-4 → the Hub's 0-3, PubMedQA's {PMID: record} → one row per PMID.
"""
from __future__ import annotations

from pathlib import Path

ADAPTERS = '''"""Local-file adapters for the medpipe-written lm-eval tasks (prompts: lm-eval's own functions)."""
import json

import datasets

from lm_eval.tasks.medmcqa.utils_medmcqa import doc_to_text as medmcqa_doc_to_text  # noqa: F401
from lm_eval.tasks.medqa.preprocess_medqa import doc_to_text as medqa_doc_to_text  # noqa: F401
from lm_eval.tasks.pubmedqa.preprocess_pubmedqa import doc_to_text as pubmedqa_doc_to_text  # noqa: F401


def process_medqa(ds):
    return ds.map(lambda d: {"sent1": d["question"], **{f"ending{i}": d["options"][k] for i, k in enumerate("ABCD")},
                             "label": "ABCD".index(d["answer_idx"].strip())})


def process_medmcqa(ds):
    return ds.map(lambda d: {"cop": int(d["cop"]) - 1})


def load_pubmedqa(data_files=None, **_):
    out = {}
    for split, path in (data_files or {}).items():
        with open(path, encoding="utf-8") as f:
            rows = [{"pmid": k, **v} for k, v in json.load(f).items()]
        out[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(out)
'''

METRICS = """metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
"""

TASKS = {
    "medqa_4options": """task: local_medqa_4options
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{path}"}}}}
output_type: multiple_choice
test_split: test
process_docs: !function medpipe_lmeval.process_medqa
doc_to_text: !function medpipe_lmeval.medqa_doc_to_text
doc_to_target: label
doc_to_choice: ['A', 'B', 'C', 'D']
""",
    "medmcqa": """task: local_medmcqa
dataset_path: json
dataset_kwargs: {{data_files: {{validation: "{path}"}}}}
output_type: multiple_choice
test_split: validation
process_docs: !function medpipe_lmeval.process_medmcqa
doc_to_text: !function medpipe_lmeval.medmcqa_doc_to_text
doc_to_target: cop
doc_to_choice: ['A', 'B', 'C', 'D']
""",
    "pubmedqa": """task: local_pubmedqa
custom_dataset: !function medpipe_lmeval.load_pubmedqa
dataset_kwargs: {{data_files: {{test: "{path}"}}}}
output_type: multiple_choice
test_split: test
doc_to_text: !function medpipe_lmeval.pubmedqa_doc_to_text
doc_to_target: final_decision
doc_to_choice: ["yes", "no", "maybe"]
""",
}


def write_tasks(folder: str | Path, files: dict[str, str], train: dict[str, str] | None = None) -> list[str]:
    """Write `local_<task>` definitions for {task: file}; returns the lm-eval task names. `train`:
    {task: file} of the split few-shot examples come from (the stock tasks' `training_split`,
    drawn at random with seed 1234 — what `protocol: lm-eval` does with `fewshot_data`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "medpipe_lmeval.py").write_text(ADAPTERS, encoding="utf-8")
    names = []
    for task, path in files.items():
        text = TASKS[task].format(path=Path(path).resolve())
        if train and task in train:
            text = text.replace("data_files: {", f'data_files: {{train: "{Path(train[task]).resolve()}", ', 1)
            text += "training_split: train\n"
        (folder / f"local_{task}.yaml").write_text(text + METRICS, encoding="utf-8")
        names.append(f"local_{task}")
    return names
