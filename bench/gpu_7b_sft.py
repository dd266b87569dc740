"""One real-size figure for bench/gpu_check.sh (issue 25): a 7B-shaped model (Qwen1.5-7B or
Llama-2-7B config, random init in bf16: nothing downloaded) through medpipe's SFT LoRA stage at the
qilin recipe's lengths (prompt 256 + response 256 = 512 tokens, micro batch 64, LoRA r 8 / alpha 32
/ dropout 0.05) with gradient checkpointing, on one GPU: tokens/s and MFU.

    python bench/gpu_7b_sft.py --out DIR [--arch qwen1.5-7b|llama2-7b] [--micro 64] [--steps 8]
    python bench/gpu_7b_sft.py --out DIR --dry-run     # CPU: parameter count on the meta device,
                                                        # the recipe and the data, no training

The stage runs in this process (launcher=local) through the CLI, with one change: the LoRA merge
into a full 15 GB copy for the next stage is skipped (it measures the disk, not the training).
Tokens/s: non-padding tokens per second over the steps after the first (the first holds CUDA/
allocator warm-up); the first step is reported too. MFU = tokens/s × 4 N / the GPU's dense bf16
peak, N = all parameters: LoRA training costs ~2N forward + ~2N backward (activation gradients;
no weight gradients for the frozen base); the checkpointing recompute (+2N) is not counted, as
the published anchor (Qwen-7B LoRA ≈ 3.2k tokens/s on one A100 ≈ 31 % MFU) does not count it.
Prints one JSON line and writes it to DIR/gpu_7b_sft.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ARCHS = {
    "qwen1.5-7b": dict(model_type="qwen2", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=151936,
                       max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False),
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096, tie_word_embeddings=False),
    # the same path at toy size: checks this script on a CPU (tests/test_gpu_launch.py)
    "mini": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=4096, max_position_embeddings=1024),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}

RECIPE = """# written by bench/gpu_7b_sft.py: the qilin SFT stage's values on a 7B-shaped random model
defaults: [base, model: qwen1.5-7b, stage/sft@stages.sft, _self_]
name: gpu7b
model: {{path: {model}}}
stages:
  sft:
    data: {data}
    peft: {{r: 8, alpha: 32, dropout: 0.05}}
    lr: 2e-5
    max_prompt_length: 256
    max_response_length: 256
    max_length: 512
    packing: false
    batch_size: {micro}          # one GPU: the global batch is one micro batch (qilin: 64 per GPU)
    micro_batch_size: {micro}
    max_steps: {steps}
    logging_steps: 1
    save_steps: 100000
    gradient_checkpointing: true
"""


def config(arch: str):
    from transformers import AutoConfig

    spec = dict(ARCHS[arch])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def parameters(arch: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config(arch))
    return sum(p.numel() for p in model.parameters())


def tokenizer_dir() -> Path:
    from medpipe.stages.models.tiny import ensure_tiny

    return Path(ensure_tiny())


def write_data(out: Path, rows: int) -> Path:
    """Alpaca rows whose instruction and output each exceed 256 tokens of the tokenizer used, so
    every row is cut to exactly 256 + 256 tokens (the qilin lengths), no padding."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    root = Path(__file__).resolve().parent.parent / "samples"
    texts = [r["output"] for r in json.loads((root / "sft_alpaca.json").read_text(encoding="utf-8"))]

    def long_text(start: int) -> str:
        parts, k = [], start
        while len(tok("".join(parts))["input_ids"]) < 300:
            parts.append(texts[k % len(texts)])
            k += 1
        return "".join(parts)

    path = out / "sft_long.json"
    path.write_text(json.dumps([{"instruction": long_text(2 * i), "input": "", "output": long_text(2 * i + 1)}
                                for i in range(rows)], ensure_ascii=False), encoding="utf-8")
    return path


def build_model(arch: str, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    target = out / f"{arch}-random-bf16"
    if (target / "config.json").exists():
        return target
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init on the GPU: seconds
        model = AutoModelForCausalLM.from_config(config(arch), dtype=torch.bfloat16)
    model.save_pretrained(target, max_shard_size="5GB")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for f in tokenizer_dir().iterdir():  # the tiny model's tokenizer and chat template (ids < every vocab here)
        if f.is_file() and f.name not in ("config.json", "generation_config.json") and ".safetensors" not in f.name:
            shutil.copy(f, target / f.name)
    return target


class StepTimer:
    """A TrainerCallback (built lazily: transformers is imported inside) recording each step's end."""

    marks: list = []

    @classmethod
    def make(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                cls.marks.append((time.monotonic(), int(state.num_input_tokens_seen or 0)))

            def on_step_end(self, args, state, control, **kw):
                cls.marks.append((time.monotonic(), int(state.num_input_tokens_seen or 0)))

        return Timer()


def run_stage(recipe: Path, out: Path) -> int:
    """`medpipe run` in this process, with the step timer added and the LoRA merge skipped."""
    from medpipe.commands.cli import app
    from medpipe.stages.models import loader
    from medpipe.stages.training import common

    original = common.callbacks
    common.callbacks = lambda ctx, p: original(ctx, p) + [StepTimer.make()]
    loader.merge_lora = lambda *a, **k: None
    try:
        code = app(["run", f"recipe={recipe}", f"run.root={out}/runs", f"run.dir={out}/runs/main"],
                   standalone_mode=False)
        return int(code or 0)
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # noqa: BLE001 - the figure says what failed
        print(f"gpu_7b_sft: the stage failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default="qwen1.5-7b", choices=sorted(ARCHS))
    ap.add_argument("--micro", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    n = parameters(a.arch)
    data = write_data(out, a.micro * a.steps)
    model_dir = out / f"{a.arch}-random-bf16"
    recipe = out / "gpu7b.yaml"
    recipe.write_text(RECIPE.format(model=model_dir, data=data, micro=a.micro, steps=a.steps))
    print(f"gpu_7b_sft: {a.arch}: {n / 1e9:.2f}B parameters; {a.micro} x 512 tokens per step, {a.steps} steps; "
          f"recipe {recipe}")
    if a.dry_run:
        print(f"gpu_7b_sft: dry run: would build {model_dir} (random init, bf16, ~{2 * n / 2**30:.1f} GiB) and run "
              f"the sft stage of {recipe} on cuda:0")
        return 0
    import torch

    t0 = time.monotonic()
    build_model(a.arch, out)
    built = time.monotonic() - t0
    code = run_stage(recipe, out)
    result: dict = {"arch": a.arch, "parameters": n, "micro_batch": a.micro, "seq": 512, "steps": a.steps,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "build_s": round(built, 1), "exit": code}
    art = out / "runs" / "main" / "01-sft" / "artifact.json"
    if code == 0 and art.exists():
        m = json.loads(art.read_text())["metrics"]
        marks = StepTimer.marks
        (t_first, k_first), (t_end, k_end) = marks[1], marks[-1]
        steady = (k_end - k_first) / (t_end - t_first) if t_end > t_first else float("nan")
        peak = next((v for k, v in PEAK_BF16.items() if k in result["gpu"]), None)
        result.update(tokens_per_s=round(steady, 1), first_step_s=round(marks[1][0] - marks[0][0], 2),
                      tokens_seen=m.get("tokens_seen"), train_runtime_s=m.get("train_runtime"),
                      peak_gpu_memory_mib=m.get("peak_gpu_memory_mib"),
                      activation_checkpointing=m.get("activation_checkpointing"),
                      first_loss=m.get("first_loss"), last_loss=m.get("last_loss"),
                      mfu=round(steady * 4 * n / peak, 4) if peak else None, peak_flops=peak)
    line = json.dumps(result)
    print(line)
    (out / "gpu_7b_sft.json").write_text(line + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
