"""The same SFT / DPO runs as bench/recipes/*.yaml, written by hand with TRL the way a user would
without medpipe: read the JSON files, build the trainer, train, save. The baseline for
bench_stage_overhead.py. Usage: python bench/handwritten.py sft|dpo MODEL_DIR OUT_DIR [--full]
[--steps N --batch B --length L] (the peak-memory runs use fewer, shorter steps)."""
import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def sft_rows():
    rows = []
    for r in json.loads((SAMPLES / "sft_alpaca.json").read_text()):
        user = r["instruction"] + ("\n" + r["input"] if r["input"] else "")
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]})
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    for r in json.loads((SAMPLES / "sft_sharegpt.json").read_text()):
        rows.append({"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]]})
    return rows


def dpo_rows():
    rows = []
    for line in (SAMPLES / "preference.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.append({"prompt": [{"role": "user", "content": r["prompt"]}],
                     "chosen": [{"role": "assistant", "content": r["chosen"]}],
                     "rejected": [{"role": "assistant", "content": r["rejected"]}]})
    return rows


def main(kind, model_dir, out, full=False, steps=None, batch=8, length=256):
    steps = steps or (60 if kind == "sft" else 30)
    common = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                  logging_steps=10, save_steps=100000, report_to=[], use_cpu=True, bf16=False, max_length=length,
                  lr_scheduler_type="cosine", warmup_steps=0.05, disable_tqdm=True, seed=42)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(learning_rate=5e-3, weight_decay=0.05, **common)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(sft_rows()), processing_class=tok,
                             peft_config=LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
    else:
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(learning_rate=5e-4, weight_decay=0.05, beta=0.1, **common)
        peft = None if full else LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                            task_type="CAUSAL_LM")
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(dpo_rows()), processing_class=tok,
                             peft_config=peft)
    trainer.train()
    trainer.save_model(out + "/final")


def _flag(name, default):
    return int(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], full="--full" in sys.argv, steps=_flag("--steps", None),
         batch=_flag("--batch", 8), length=_flag("--length", 256))
