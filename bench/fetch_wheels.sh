#!/usr/bin/env bash
# The pure-Python wheels bench/gpu_check.sh installs on a GPU machine that has no network, for an
# image with Python 3.12, torch, transformers, accelerate, PEFT, tokenizers, pyarrow, numpy, typer,
# rich, sacrebleu, scikit-learn (the 'cuda' image: /work/.library/device/KINDS.md) but not what medpipe
# adds: TRL, DeepSpeed, datasets, Hydra/OmegaConf, the data and metric helpers, and transformers
# at the version medpipe is tested with. Versions = this checkout's .venv (the tested set).
#   bash bench/fetch_wheels.sh [DIR]        # default .whl/ (git-ignored); prints the total size
# Binary wheels are fetched for cp312 manylinux x86-64; the four packages PyPI has only as sdists
# (deepspeed, antlr4-python3-runtime, jieba, rouge-score) are built here into py3-none-any wheels
# (DeepSpeed with DS_BUILD_OPS=0: its ops JIT-build on first use, and medpipe's configs use none).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PY:-.venv/bin/python}
mkdir -p "$DIR"
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
# what the image lacks (medpipe's dependency closure minus the image's package list), as needed by
# the check: training, eval metrics; the server (fastapi/uvicorn) and RAG (bm25s, faiss) are left out
BINARY="trl datasets hydra-core omegaconf dill multiprocess hjson pydantic pydantic-core annotated-types
typing-inspection datasketch nltk defusedxml transformers"
SDIST="deepspeed antlr4-python3-runtime jieba rouge-score"
specs=()
for n in $BINARY; do specs+=("$n==$(version "$n")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DIR" "${specs[@]}"
for n in $SDIST; do
  v=$(version "$n")
  ls "$DIR" | grep -qi "^${n//-/_}-$v-" && continue
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "$n==$v"
done
ls -l "$DIR"
total=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
echo "total: $((total / 1024 / 1024)) MiB in $(ls "$DIR"/*.whl | wc -l) wheels (device carry limit: 64 MiB)"
[ "$total" -le $((64 * 1024 * 1024)) ] || { echo "over 64 MiB" >&2; exit 1; }
