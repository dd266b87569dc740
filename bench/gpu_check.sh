#!/usr/bin/env bash
# The one GPU check (issue 25): everything CPU cannot prove about medpipe's GPU path, in one call.
#
#   bash bench/gpu_check.sh [--dry-run]
#   env: WHEELS=DIR  pure-Python wheels to install first when the image lacks medpipe's dependencies
#                    (no network: `make wheels` / bench/fetch_wheels.sh fills .whl/, ~40 MiB)
#        OUT=DIR     where the summary and every log go (default ./gpu_check_out)
#        PY=python   the interpreter that holds the image's CUDA torch (default python3)
#        ONLY="a b"  run only these steps (a rerun within the device time); ALLOW_CPU=1 runs them without
#                    a GPU (checks this script's machinery: slow, no GPU figures)
#
# Steps (each under its own time limit; together <= 9 minutes after the install step):
#   (every training stage with gradient checkpointing on, as the paper recipes run real models)
#   1 qilin     the qilin recipe on the tiny model, bf16 (precision auto on a GPU), launcher=local
#   2 dpo_zero2 a LoRA DPO stage under the real deepspeed launcher, ZeRO-2, 1 rank (2 with >= 2 GPUs)
#   3 medcare   the medcare recipe (MKA -> DA) on the tiny model, bf16, launcher=local
#   4 medcare_layer / 5 cpoly_layer   the layer benchmarks at 4096 tokens in bf16 (ratio to PEFT LoRA)
#   6 sft_7b    a 7B-shaped random bf16 model (Qwen1.5-7B config) through the SFT LoRA stage at the
#               qilin lengths with gradient checkpointing: tokens/s and MFU (bench/gpu_7b_sft.py)
# For each: exit status, wall seconds, peak GPU memory (nvidia-smi, sampled every 200 ms; and each
# training stage's torch.cuda.max_memory_allocated from its artifact), written to
# $OUT/gpu_check_summary.md (+ gpu_check.jsonl, one JSON line a step).
# --dry-run prints every step's command and runs what a CPU can: the version check, each recipe's
# composition (`medpipe show`, with the DeepSpeed launch line), the benchmarks' flags, the 7B model's
# parameter count and data (meta device).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run]   (env: WHEELS=dir OUT=dir PY=python)" >&2; exit 2 ;;
esac
OUT=${OUT:-./gpu_check_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PY:-python3}
SUMMARY=$OUT/gpu_check_summary.md
JSONL=$OUT/gpu_check.jsonl
: > "$JSONL"
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
GPUS=${GPUS:-0}
say() { echo "gpu_check: $*"; }

# ---- install (not timed in the 9 minutes) ---------------------------------------------------------
if [ -n "${WHEELS:-}" ]; then
  SITE=$OUT/site
  say "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE (PYTHONPATH first)"
  if [ $DRY = 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
      || { say "wheel install failed"; exit 1; }
  fi
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  export PATH=$SITE/bin:$PATH
fi
if [ $DRY = 0 ] && ! "$PY" -c "import medpipe" 2>/dev/null; then
  say "installing medpipe from this checkout (--no-deps: the image's torch stays)"
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . || { say "medpipe install failed"; exit 1; }
fi
MEDPIPE=("$PY" -m medpipe.commands.cli)

# ---- versions: what runs, against what medpipe declares -----------------------------------------------
"$PY" - "$OUT/versions.json" <<'EOF'
import importlib.metadata as md, json, re, sys
from pathlib import Path
wanted = {}
text = Path("pyproject.toml").read_text()
block = text[text.index("dependencies = ["):text.index("]\n", text.index("dependencies = ["))]
for spec in re.findall(r'^\s*"([^"]+)"', block, re.M):
    name = re.split(r"[ <>=!~;\[]", spec)[0].lower()
    wanted[name] = spec.split(";")[0]
out, bad = {}, []
for name in ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "datasets", "hydra-core",
             "omegaconf", "tokenizers", "flash-attn", "vllm"):
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    out[name] = have
    spec = wanted.get(name)
    if spec and have:
        from packaging.requirements import Requirement
        if have.split("+")[0] not in Requirement(spec).specifier:
            bad.append(f"{name} {have} (medpipe needs {spec})")
    elif spec and not have:
        bad.append(f"{name} missing (medpipe needs {spec})")
try:
    import torch
    out["cuda"] = torch.version.cuda
    out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    out["bf16"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
except Exception as e:  # noqa: BLE001
    out["torch_error"] = str(e)
out["mismatches"] = bad
Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
print("gpu_check: versions: " + ", ".join(f"{k} {v}" for k, v in out.items() if k != "mismatches"))
for line in bad:
    print(f"gpu_check: VERSION: {line}")
EOF
NVCC=$(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo "none")
say "GPUs: $GPUS; nvcc: $NVCC"
if [ "$GPUS" = 0 ] && [ $DRY = 0 ] && [ -z "${ALLOW_CPU:-}" ]; then
  say "no NVIDIA GPU here (nvidia-smi -L lists none): run with --dry-run on a CPU machine"; exit 2
fi

# ---- the steps ------------------------------------------------------------------------------------------
RANKS=1; [ "$GPUS" -ge 2 ] && RANKS=2
# gradient checkpointing on, as the paper recipes run real models (the tiny profiles turn it off)
GC_QILIN="stages.cpt.gradient_checkpointing=true stages.sft.gradient_checkpointing=true"
GC_QILIN="$GC_QILIN stages.dpo.gradient_checkpointing=true"
GC_MEDCARE="stages.mka.gradient_checkpointing=true stages.da.gradient_checkpointing=true"
cat > "$OUT/dpo_zero2.yaml" <<EOF
# written by bench/gpu_check.sh: one LoRA DPO stage under DeepSpeed ZeRO-2 on the tiny model
defaults: [base, model: tiny, data: sample, stage/dpo@stages.dpo, _self_]
name: gpucheck_dpo
stages:
  dpo: {data: "\${data.preference}", lr: 5e-4, max_steps: 8, logging_steps: 1, batch_size: 8, max_length: 256,
        peft: {r: 8, alpha: 16}, ref_probe: 4, reward_eval_pairs: 8, save_steps: 4, gradient_checkpointing: true}
EOF

run_step() {  # NAME LIMIT_S CMD... : run, time, sample GPU memory, record
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  echo
  say "step $name (limit ${limit}s): $*"
  if [ $DRY = 1 ]; then
    echo "{\"step\": \"$name\", \"status\": \"dry-run\", \"command\": \"$*\"}" >> "$JSONL"
    return 0
  fi
  [ -n "${ALLOW_CPU:-}" ] && limit=$((limit * 10))  # a CPU checking the machinery is that much slower
  local smi=$OUT/$name.smi log=$OUT/$name.log
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$smi" 2>/dev/null &
  local sampler=$! t0=$SECONDS
  timeout --kill-after=20 "$limit" "$@" > "$log" 2>&1
  local rc=$? wall=$((SECONDS - t0))
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  local peak
  peak=$(awk -F, '{for (i = 1; i <= NF; i++) if ($i + 0 > m) m = $i + 0} END {print m + 0}' "$smi")
  local status=ok
  [ $rc = 0 ] || status="FAILED (exit $rc$([ $rc = 124 ] && echo ', time limit'))"
  grep -qiE "CUDA out of memory|OutOfMemoryError" "$log" && status="$status, OUT OF MEMORY"
  say "step $name: $status in ${wall}s, peak GPU memory ${peak} MiB (nvidia-smi, all GPUs' max)"
  [ $rc = 0 ] || tail -n 25 "$log"
  "$PY" - "$name" "$status" "$wall" "$peak" "$log" "$OUT" "$*" >> "$JSONL" <<'EOF'
import json, sys
from pathlib import Path
name, status, wall, peak, log, out, cmd = sys.argv[1:]
row = {"step": name, "status": status, "wall_s": int(wall), "nvidia_smi_peak_mib": int(float(peak)), "command": cmd}
run = Path(out) / "runs" / name / "main"
stages = {}
for link in sorted(run.glob("[0-9][0-9]-*")) if run.is_dir() else []:
    art = link / "artifact.json"
    if art.exists():
        m = json.loads(art.read_text()).get("metrics", {})
        keep = ("peak_gpu_memory_mib", "tokens_per_s", "train_runtime", "tokens_seen", "first_loss", "last_loss",
                "zero_stage", "world_size", "activation_checkpointing", "reward_accuracy", "reward_margin")
        stages[link.name] = {k: m[k] for k in keep if k in m}
        if (link / "deepspeed.json").exists():
            stages[link.name]["deepspeed_json_bf16"] = json.loads((link / "deepspeed.json").read_text()).get("bf16")
        if (link / "ref_probe.pt").exists():
            stages[link.name]["ref_probe"] = True
if stages:
    row["stages"] = stages
lines = [l for l in Path(log).read_text(errors="replace").splitlines() if l.startswith("{") and l.endswith("}")]
if lines:  # the benchmarks' and gpu_7b_sft.py's JSON result line
    try:
        row["result"] = json.loads(lines[-1])
    except ValueError:
        pass
print(json.dumps(row))
EOF
}

if [ $DRY = 1 ]; then  # what a CPU can check of each step
  say "dry run: composing each recipe as the steps run it"
  "${MEDPIPE[@]}" show recipe=qilin $GC_QILIN | grep -E "^# (groups|stages)|^#  [0-9]" || exit 1
  "${MEDPIPE[@]}" show "recipe=$OUT/dpo_zero2.yaml" launcher=deepspeed "launcher.num_gpus=$RANKS" \
    | grep -E "launch:|^#  [0-9]" || exit 1
  "${MEDPIPE[@]}" show recipe=medcare $GC_MEDCARE | grep -E "^#  [0-9]" || exit 1
  for b in bench/bench_medcare_layer.py bench/bench_cpoly_layer.py; do
    flags=$("$PY" "$b" --help 2>&1)
    for f in --device --dtype --tokens; do
      echo "$flags" | grep -q -- "$f" || say "WARNING: $b has no $f flag on this branch (added by the gpu-model work)"
    done
  done
  "$PY" bench/gpu_7b_sft.py --out "$OUT/sft_7b" --steps 6 --dry-run || exit 1
fi

store() { echo "run.root=$OUT/runs/$1" "run.dir=$OUT/runs/$1/main"; }  # each pipeline its own store
run_step qilin 100 "${MEDPIPE[@]}" run recipe=qilin $GC_QILIN $(store qilin)
run_step dpo_zero2 80 "${MEDPIPE[@]}" run "recipe=$OUT/dpo_zero2.yaml" launcher=deepspeed "launcher.num_gpus=$RANKS" \
  $(store dpo_zero2)
run_step medcare 90 "${MEDPIPE[@]}" run recipe=medcare $GC_MEDCARE $(store medcare)
run_step medcare_layer 45 "$PY" bench/bench_medcare_layer.py --device cuda --dtype bf16 --tokens 4096 --reps 5
run_step cpoly_layer 45 "$PY" bench/bench_cpoly_layer.py --device cuda --dtype bf16 --tokens 4096 --reps 10
run_step sft_7b 170 "$PY" bench/gpu_7b_sft.py --out "$OUT/sft_7b" --steps 6

# ---- summary ----------------------------------------------------------------------------------------------
"$PY" - "$JSONL" "$OUT/versions.json" "$SUMMARY" "$DRY" <<'EOF'
import json, sys
from pathlib import Path
rows = [json.loads(l) for l in Path(sys.argv[1]).read_text().splitlines() if l.strip()]
versions = json.loads(Path(sys.argv[2]).read_text())
lines = ["# bench/gpu_check.sh summary" + (" (dry run: nothing ran on a GPU)" if sys.argv[4] == "1" else ""), "",
         "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "mismatches"), ""]
lines += [f"- VERSION: {m}" for m in versions.get("mismatches", [])]
lines += ["", "| step | status | wall s | peak GPU MiB (nvidia-smi) | figures |", "| --- | --- | --- | --- | --- |"]
for r in rows:
    figures = []
    for stage, m in (r.get("stages") or {}).items():
        figures.append(f"{stage}: " + ", ".join(f"{k}={v}" for k, v in m.items()))
    if "result" in r:
        figures.append(json.dumps(r["result"]))
    lines.append(f"| {r['step']} | {r['status']} | {r.get('wall_s', '')} | {r.get('nvidia_smi_peak_mib', '')} | "
                 + "<br>".join(figures).replace("|", "/") + " |")
Path(sys.argv[3]).write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
say "summary: $SUMMARY"
grep -q '"status": "FAILED' "$JSONL" && exit 1
exit 0
