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
original cop 1-4 → the Hub's 0-3, PubMedQA's {PMID: record} → one row per PMID, MMLU's header-less
<subject>_<split>.csv → cais/mmlu's rows (question, subject, choices, answer 0-3). An MMLU task
`include`s the installed wheel's own tasks/mmlu/default/mmlu_<subject>.yaml (description, prompt
template, first_n few-shot from `dev`) and only swaps the dataset.
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


def load_mmlu(data_files=None, **_):
    """hendrycks/test CSVs (no header: question,A,B,C,D,answer) → cais/mmlu rows, as the Hub's
    loading script built them (csv.reader cells as they are, answer letter → 0-3)."""
    import csv
    import os

    out = {}
    for split, path in (data_files or {}).items():
        subject = os.path.basename(path).rsplit("_", 1)[0]
        with open(path, encoding="utf-8", newline="") as f:
            rows = [{"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5].strip())}
                    for r in csv.reader(f) if r]
        out[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(out)


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


MMLU_TASK = """include: "{include}"
task: local_{task}
tag: []
custom_dataset: !function medpipe_lmeval.load_mmlu
dataset_kwargs: {{data_files: {{test: "{path}"}}}}
"""


def mmlu_task(task: str, path: str | Path, dev: str | Path | None) -> str:
    """local_mmlu_<subject>: lm-eval's own subject yaml, the dataset read from the local CSVs."""
    import lm_eval

    include = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default" / f"{task}.yaml"
    text = MMLU_TASK.format(include=include, task=task, path=Path(path).resolve())
    if dev is None:  # no dev split given: zero-shot only (the template names fewshot_split: dev)
        return text + "fewshot_split: null\n"
    return text.replace("data_files: {", f'data_files: {{dev: "{Path(dev).resolve()}", ', 1)


def write_tasks(folder: str | Path, files: dict[str, str], train: dict[str, str] | None = None) -> list[str]:
    """Write `local_<task>` definitions for {task: file}; returns the lm-eval task names. `train`:
    {task: file} of the split few-shot examples come from (the stock tasks' `training_split`,
    drawn at random with seed 1234 — what `protocol: lm-eval` does with `fewshot_data`; for
    mmlu_<subject> the subject's dev CSV, first k in file order)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "medpipe_lmeval.py").write_text(ADAPTERS, encoding="utf-8")
    names = []
    for task, path in files.items():
        if task.startswith("mmlu_"):
            (folder / f"local_{task}.yaml").write_text(mmlu_task(task, path, (train or {}).get(task)) + METRICS,
                                                       encoding="utf-8")
            names.append(f"local_{task}")
            continue
        text = TASKS[task].format(path=Path(path).resolve())
        if train and task in train:
            text = text.replace("data_files: {", f'data_files: {{train: "{Path(train[task]).resolve()}", ', 1)
            text += "training_split: train\n"
        (folder / f"local_{task}.yaml").write_text(text + METRICS, encoding="utf-8")
        names.append(f"local_{task}")
    return names
