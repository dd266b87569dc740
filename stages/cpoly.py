"""`cpoly` — task adaptation on several multiple-choice datasets at once (AntGLM-Med stage 3).

Data. `data` names mcq sources (PubMedQA, MedMCQA, MedQA, CMExam, C-Eval shapes); every record's
`task` comes from the data (the loader fills it per source: the format name, or the source's
`task:` key). Tasks = `tasks` if set (records of other tasks are an error), else the sorted set of
the data's tasks. Unlabeled items are dropped and counted. When the input artifact carries
`dataset_path` (a `voc_label` stage before this one: PQA-U items pseudo-labelled by
Verification-of-Choice), those records are added (`input_dataset: auto`; `require` fails without
one, `ignore` never reads it).

Training text (`text_format`):
* `ppl` (default): exactly the option-perplexity scoring format (`medpipe.stages.evaluation.prompts.build_ppl_prompt`:
  "[Context: ...]\nQuestion: ...\nAnswer:" then " <correct option text>" + EOS), loss on the answer
  tokens only; prompt and answer are tokenised separately, as the scorer does, and the prompt is
  cut from the left when too long. Multi-answer items have no single option continuation: dropped,
  counted (`dropped_multi_answer`).
* `chat`: the data package's mcq → chat rendering (options listed; "Answer: A. text" + explanation)
  through the tokenizer's chat template, loss on the assistant turn (`medpipe.stages.training.chat_masks.encode_chat`).

Adapter (`adapter`):
* `cpoly` (default): `medpipe.stages.adapters.cpoly` layers, settings in the `cpoly:` block
  (`medpipe.stages.adapters.settings.CPolyConfig`, the one copy of their defaults) — on
  `cpoly.target_modules`, `n_shared_skills` (A=4) shared LoRA skills + `n_task_skills` (B=1)
  task-specific skills per task, rank `r` (4), Gumbel-sigmoid routing at temperature `tau`. Each example's task index travels in the batch
  (`task_ids`, emitted by the collator) into `CPolyModel.forward`, which routes it to every layer
  for that call: mixed-task batches, and safe under DDP/DeepSpeed (no global state is set outside
  forward).
* `lora`: the PEFT LoRA baseline (the stage's `peft` block; default r=8, alpha=16, all-linear);
  one adapter for all tasks, no task ids.

Artifact.
* cpoly: `format: full`. The adapter (`cpoly_adapter.safetensors` + `cpoly_config.json` with the
  task list, `load_cpoly(base, dir)`) is in `<stage>/adapter`; every task in `export_tasks`
  (default all) is merged into the base weights (eval-mode allocation, no noise) and saved as a
  plain model in `<stage>/merged/<task>` (loads with `from_pretrained`, no medpipe code);
  `export_shared: true` also writes the shared-skills-only merge to `<stage>/merged/_shared`.
  `model_path` = the merged model of `default_task` (default: the first task), so the next stage
  (e.g. eval on that task) gets a plain model. `handoff.cpoly`: `adapter`, `adapter_dir`,
  `base_model_path` (the model the adapter applies to), `tasks`, `merged` {task: dir},
  `merged_shared` (or null), `default_task`.
* lora: `format: adapter` (PEFT adapter dir + base_model_path; the engine merges it for the next
  stage), `handoff.cpoly.tasks` records what it was trained on.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional


from medpipe.params import param
from medpipe.stages.adapters.settings import CPolyConfig
from medpipe.stages.training.params import TrainParams
from medpipe.stages.training.sequence import TrainingKind

ADAPTERS = ("cpoly", "lora")
TEXT_FORMATS = ("ppl", "chat")
INPUT_DATASET = ("auto", "require", "ignore")


@dataclass
class CPolyParams(TrainParams):
    # AntGLM-Med stage 3 (§3.3 / Table 8): 10 epochs, batch 12, AdamW lr 5e-5, linear decay, wd 0.01,
    # warmup 0.06. Recipes override per run.
    changed_defaults = {"lr": 5e-5, "epochs": 10.0, "batch_size": 12, "scheduler": "linear", "weight_decay": 0.01,
                        "warmup": 0.06}
    max_length: int = param(1024, "tokens per example (the ppl prompt is cut from the left)")
    adapter: str = param("cpoly", "cpoly | lora (the LoRA baseline: settings in `peft`, default r=8 alpha=16)",
                         choices=ADAPTERS)
    cpoly: CPolyConfig = param(help="C-Poly layer settings (adapter=cpoly)", factory=CPolyConfig)
    tasks: Optional[List[str]] = param(None, "task names; null = the data's tasks, sorted")
    default_task: Optional[str] = param(None, "whose merged model is the artifact's model_path; null = first task")
    export_tasks: Optional[List[str]] = param(None, "tasks given a merged model; null = all")
    export_shared: bool = param(False, "also merge the shared skills only (merged/_shared)")
    text_format: str = param("ppl", "ppl (option-perplexity prompt + answer) | chat (chat template)",
                             choices=TEXT_FORMATS)
    lang: str = param("auto", "ppl prompt language: auto (per item) | en | zh", choices=("auto", "en", "zh"))
    input_dataset: str = param("auto", "auto | require | ignore: records from the input artifact's dataset_path",
                               choices=INPUT_DATASET)
    samples_per_task: Optional[int] = param(None, "train on N records per task drawn at random (seed: data.seed), "
                                                  "AntGLM-Med Table 8: 500; null = all")

    def _rules(self):
        return super()._rules() + [
            ("samples_per_task", self.samples_per_task is None or self.samples_per_task >= 1, ">= 1 or null"),
            ("peft", self.adapter == "lora" or self.peft is None,
             "null with adapter=cpoly (`peft` configures the LoRA baseline, adapter=lora; C-Poly's settings are `cpoly:`)")]


def safe_name(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", task) or "_"


# --- data ----------------------------------------------------------------------------------------
def read_dataset_file(path: str | Path) -> list[dict]:
    """Normalised mcq records written by a stage (voc_label's dataset.jsonl), checked."""
    from medpipe.data import DataError

    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON: {e.msg}", str(path), n, None, reason="parse") from None
            for key in ("question", "options", "answer", "task"):
                if not r.get(key):
                    raise DataError("missing", str(path), n, key, reason="missing_field")
            bad = [x for x in r["answer"] if x not in r["options"]]
            if bad:
                raise DataError(f"answer {bad} is not an option", str(path), n, "answer", reason="unknown_answer")
            r["_loc"] = f"{path}:{n}"
            out.append(r)
    return out


def select_records(records: list[dict], p: CPolyParams) -> tuple[list[dict], dict]:
    """Labeled records usable for the text format, and what was dropped."""
    dropped = {"dropped_unlabeled": 0, "dropped_multi_answer": 0}
    keep = []
    for r in records:
        if not r.get("answer"):
            dropped["dropped_unlabeled"] += 1
        elif p.text_format == "ppl" and len(r["answer"]) != 1:
            dropped["dropped_multi_answer"] += 1
        else:
            keep.append(r)
    return keep, dropped


def sample_per_task(records: list[dict], n: int | None, seed: int) -> list[dict]:
    """At most n records of every task, drawn at random (the same draw for the same seed and data);
    the records keep their order."""
    if n is None:
        return records
    import random

    by_task: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_task.setdefault(str(r.get("task")), []).append(i)
    rng = random.Random(seed)
    keep = set()
    for task in sorted(by_task):
        idx = by_task[task]
        keep.update(idx if len(idx) <= n else rng.sample(idx, n))
    return [r for i, r in enumerate(records) if i in keep]


def task_list(records: list[dict], p: CPolyParams, where: str) -> list[str]:
    from medpipe.errors import ConfigError

    found = sorted({str(r.get("task")) for r in records if r.get("task") is not None})
    if any(r.get("task") is None for r in records):
        raise ConfigError(f"{where}: records without a task (give the source a `task:`)")
    if not p.tasks:
        if not found:
            raise ConfigError(f"{where}: no labeled multiple-choice records")
        return found
    unknown = [t for t in found if t not in p.tasks]
    if unknown:
        raise ConfigError(f"{where}: the data has task(s) {unknown} not in tasks={list(p.tasks)}")
    return list(p.tasks)


def check_exports(p: CPolyParams, tasks: list[str], where: str) -> None:
    from medpipe.errors import ConfigError

    for name in ([p.default_task] if p.default_task else []) + list(p.export_tasks or []):
        if name not in tasks:
            raise ConfigError(f"{where}: task '{name}' (default_task/export_tasks) is not one of {tasks}")
    if p.default_task and p.export_tasks and p.default_task not in p.export_tasks:
        raise ConfigError(f"{where}: default_task '{p.default_task}' must be in export_tasks")


def encode_ppl(records: list[dict], tok: Any, max_length: int, lang: str) -> list[dict]:
    """Prompt as the option-perplexity scorer builds it, then the correct option + EOS (labelled)."""
    from medpipe.stages.evaluation.prompts import build_ppl_prompt

    prompts, answers = [], []
    for r in records:
        prompt, conts = build_ppl_prompt(r, lang)
        prompts.append(prompt)
        answers.append(conts[r["answer"][0]])
    p_ids = tok(prompts, add_special_tokens=True)["input_ids"]
    a_ids = tok(answers, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    rows = []
    for pi, ai in zip(p_ids, a_ids):
        ai = list(ai) + ([eos] if eos is not None else [])
        ai = ai[:max(1, max_length - 1)]
        pi = list(pi)[-(max_length - len(ai)):] if max_length > len(ai) else list(pi)[-1:]
        rows.append({"input_ids": pi + ai, "labels": [-100] * len(pi) + ai})
    return rows


def encode_chat_rows(records: list[dict], tok: Any, max_length: int) -> list[dict]:
    from medpipe.data.render import mcq_to_chat
    from medpipe.stages.training.chat_masks import encode_chat

    rows = []
    for r in records:
        e = encode_chat(mcq_to_chat(r)["messages"], tok, max_length)
        rows.append({"input_ids": e["input_ids"],
                     "labels": [t if m else -100 for t, m in zip(e["input_ids"], e["assistant_masks"])]})
    return rows


def encode(records: list[dict], tasks: list[str], tok: Any, p: CPolyParams):
    from datasets import Dataset

    rows = (encode_ppl(records, tok, p.max_length, p.lang) if p.text_format == "ppl"
            else encode_chat_rows(records, tok, p.max_length))
    index = {t: i for i, t in enumerate(tasks)}
    out = [{**row, "task_id": index[str(r["task"])]} for row, r in zip(rows, records)
           if any(x != -100 for x in row["labels"])]  # truncated past every answer token
    return Dataset.from_list(out)


# --- stage ----------------------------------------------------------------------------------------
class CPolyStage(TrainingKind):
    """Multi-task multiple-choice adaptation: C-Poly (shared + task-specific LoRA skills) or a LoRA baseline."""

    Params = CPolyParams
    refuses_zero3 = "its per-task merges read whole skill weights"

    def check(self, params: CPolyParams, base: Any, data_opts: dict) -> list[str]:
        from medpipe.data import load_records
        from medpipe.stages.training.params import data_options

        if params.text_format == "chat":
            from medpipe.stages.training.tokenizer import load_stage_tokenizer

            tok = load_stage_tokenizer(base.tokenizer_path, params, base.trust_remote_code)
        else:
            from medpipe.stages.training.tokenizer import length_tokenizer

            tok = length_tokenizer(base.tokenizer_path, base.trust_remote_code)
        # lengths as validate counts them (mcq prompt + answer); the stage cuts the prompt from the left
        result = load_records(params.data, "mcq", tokenizer=tok, max_length=params.max_length,
                              **data_options(params, data_opts))
        records, dropped = select_records(result.records, params)
        tasks = task_list(records, params, "cpoly") if records or params.input_dataset != "require" else []
        if records:
            check_exports(params, tasks, "cpoly")
        lines = result.summary_table().splitlines()
        lines.append(f"tasks: {', '.join(tasks) or '(from the input dataset)'}; "
                     + ", ".join(f"{k}={v}" for k, v in dropped.items()))
        return lines

    def arguments(self, ctx: Any):
        from transformers import TrainingArguments

        from medpipe.stages.training.args import training_kwargs

        return TrainingArguments(**training_kwargs(ctx, ctx.params), remove_unused_columns=False)

    def data(self, ctx: Any, tok: Any, args: Any) -> "CPolyData":
        from collections import Counter

        from medpipe.data import load_records
        from medpipe.errors import MedpipeError
        from medpipe.stages.training.cpoly import TaskCollator
        from medpipe.stages.training.params import data_options

        p: CPolyParams = ctx.params
        where = f"stages.{ctx.name}"
        loaded = load_records(p.data, "mcq", heldout=p.heldout, **data_options(p, ctx.data))
        train, dropped = select_records(loaded.records, p)
        heldout, _ = select_records(loaded.heldout, p)
        extra_path = ctx.input.dataset_path if p.input_dataset != "ignore" else None
        if p.input_dataset == "require" and not extra_path:
            raise MedpipeError(f"{where}: input_dataset=require but the input artifact ({ctx.input.stage}) "
                               f"carries no dataset_path (put a voc_label stage right before, or use from:)")
        extra: list[dict] = []
        if extra_path:
            extra, more = select_records(read_dataset_file(extra_path), p)
            for k, v in more.items():
                dropped[k] += v
            ctx.say(f"{len(extra)} records from the input dataset {extra_path}")
            train = train + extra
        tasks = task_list(train, p, where)
        check_exports(p, tasks, where)
        if p.samples_per_task is not None:
            before = len(train)
            train = sample_per_task(train, p.samples_per_task, int(ctx.data.get("seed", 0)))
            ctx.say(f"{len(train)} of {before} records kept: at most {p.samples_per_task} per task, drawn at random")
        train_ds = encode(train, tasks, tok, p)
        eval_ds = encode(heldout, tasks, tok, p) if heldout else None
        if len(train_ds) == 0:
            raise MedpipeError(f"{where}: no training example left (all truncated past the answer?)")
        per_task = Counter(tasks[i] for i in train_ds["task_id"])
        ctx.say(f"{len(train_ds)} examples over {len(tasks)} task(s): "
                + ", ".join(f"{t}={per_task[t]}" for t in tasks)
                + (f"; {len(eval_ds)} held out" if eval_ds else ""))
        collator = TaskCollator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                                with_task_ids=p.adapter == "cpoly")
        return CPolyData(train_ds, eval_ds, tasks, per_task, len(extra), dropped, collator)

    def model(self, ctx: Any, data: "CPolyData"):
        from medpipe.stages.adapters.cpoly import inject_cpoly
        from medpipe.stages.training.loop import apply_lora, load_model
        from medpipe.stages.training.params import LoraParams

        p: CPolyParams = ctx.params
        model = load_model(ctx, base_view(p))  # seeds: the adapter's init below is the same in any process
        if p.adapter == "cpoly":
            model = inject_cpoly(model, data.tasks, p.cpoly)
        else:
            model = apply_lora(model, p.peft or LoraParams())
        if p.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # frozen embeddings: let checkpointed blocks backprop
        data.trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
        ctx.say(f"adapter {p.adapter}: {data.trainable:,} trainable parameters")
        return model

    def trainer_class(self) -> type:
        from medpipe.stages.training.cpoly import CPolyTrainer

        return CPolyTrainer

    def trainer_options(self, ctx: Any, data: "CPolyData") -> dict:
        return {"data_collator": data.collator}

    def metrics(self, ctx: Any, trainer: Any, data: "CPolyData") -> dict:
        return dict(examples=len(data.train), tasks=len(data.tasks), trainable_params=data.trainable,
                    input_dataset_records=data.extra, heldout=len(data.heldout) if data.heldout else 0, **data.dropped,
                    mixed_task_batches=data.collator.mixed, batches=data.collator.batches,
                    **{f"examples_{safe_name(t)}": data.per_task[t] for t in data.tasks})

    def save(self, ctx: Any, trainer: Any, tok: Any, data: "CPolyData", metrics: dict):
        """The adapter in `adapter/`; lora: merged for the next stage. cpoly: the merged models'
        places (`finish` writes them once the trainer is released)."""
        from medpipe.artifact import Artifact
        from medpipe.stages.models import loader

        p: CPolyParams = ctx.params
        adapter_dir = ctx.output_dir / "adapter"
        trainer.save_model(str(adapter_dir))
        trainer.accelerator.wait_for_everyone()
        trust = bool(ctx.model.get("trust_remote_code", False))
        handoff = {"cpoly": {"adapter": p.adapter, "adapter_dir": str(adapter_dir), "base": ctx.input.model_path,
                             "tasks": data.tasks}}
        if p.adapter == "lora":
            merged_dir = ctx.output_dir / "merged"
            if ctx.is_main:
                loader.merge_lora(adapter_dir, ctx.input.model_path, adapter_dir, merged_dir, trust)
            trainer.accelerator.wait_for_everyone()
            return Artifact(stage=ctx.name, kind=ctx.kind, format="adapter", model_path=str(adapter_dir),
                            tokenizer_path=str(adapter_dir), base_model_path=ctx.input.model_path,
                            metrics=metrics, trust_remote_code=trust, merged_path=str(merged_dir),
                            handoff=handoff)
        default = p.default_task or data.tasks[0]
        merged = {t: str(ctx.output_dir / "merged" / safe_name(t)) for t in p.export_tasks or data.tasks}
        shared = str(ctx.output_dir / "merged" / "_shared") if p.export_shared else None
        handoff["cpoly"].update(merged_shared=shared, default_task=default)
        return Artifact(stage=ctx.name, kind=ctx.kind, format="full", model_path=merged[default],
                        tokenizer_path=merged[default], metrics=metrics, trust_remote_code=trust,
                        task_models=merged, handoff=handoff)

    def finish(self, ctx: Any, tok: Any, data: "CPolyData", artifact: Any):
        """cpoly: every exported task's merged model (and the shared-only one), written by rank 0."""
        if ctx.params.adapter != "cpoly" or not ctx.is_main:
            return artifact
        adapter_dir = ctx.output_dir / "adapter"
        for task, out in artifact.task_models.items():
            export_merged(ctx, base_view(ctx.params), adapter_dir, tok, task, Path(out))
        shared = artifact.handoff["cpoly"]["merged_shared"]
        if shared:
            export_merged(ctx, base_view(ctx.params), adapter_dir, tok, None, Path(shared))
        ctx.say(f"merged models: {', '.join(artifact.task_models)}{' + shared-only' if shared else ''} → "
                f"{ctx.output_dir / 'merged'}; model_path = {artifact.handoff['cpoly']['default_task']}")
        return artifact


@dataclass
class CPolyData:
    """What the data step hands on: the encoded splits, the tasks, and the counts the metrics report."""

    train: Any
    heldout: Any
    tasks: list
    per_task: Any  # Counter: examples per task
    extra: int  # records from the input artifact's dataset
    dropped: dict
    collator: Any
    trainable: int = 0  # trainable parameters, set by the model step


def base_view(p: CPolyParams) -> Any:
    """What `load_model` reads of the params for the frozen base: it loads like a LoRA base (bf16 on
    GPUs that have it) while the adapters train in fp32 (a C-Poly params object with `peft` set would
    not bind)."""
    from types import SimpleNamespace

    from medpipe.stages.training.params import LoraParams

    return SimpleNamespace(peft=p.peft or LoraParams(), precision=p.precision,
                           gradient_checkpointing=p.gradient_checkpointing)


def export_merged(ctx: Any, params: Any, adapter_dir: Path, tok: Any, task: str | None, out: Path) -> None:
    """Fold one task's eval-mode C-Poly delta (task None: shared skills only) into a fresh copy of the
    base and save it as a plain model (written to a temp dir, then renamed)."""
    from medpipe.artifact import atomic_dir
    from medpipe.stages.adapters.cpoly import load_cpoly, merge_cpoly
    from medpipe.stages.training.loop import load_model

    base = load_model(ctx, params, ctx.input.model_path)
    plain = merge_cpoly(load_cpoly(base, adapter_dir), task, shared_only=task is None)
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
