# Entry points: `make demo`, `make experiment` and `make test`. Each creates .venv and install on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo experiment test lint figures bench bench-gpu

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m unip_train.demo --preset demo --out demo_out

experiment: $(STAMP)
	$(BIN)/python -m unip_train.demo --preset experiment --out demo_out --readme README.md

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --durations=15

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

figures: $(STAMP)
	$(BIN)/python -m unip_train.demo --preset experiment --out demo_out --figures-dir figures --readme README.md

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_analysis.py
	$(BIN)/python benchmarks/bench_pretrain.py
	$(BIN)/python benchmarks/bench_pretrain_loop.py --out benchmarks/results_pretrain_loop.json
	$(BIN)/python benchmarks/bench_finetune.py --out benchmarks/results_finetune.json
	$(BIN)/python benchmarks/bench_predict.py --out benchmarks/results_predict.json

# Every GPU check in one command (at most 8 minutes on one H100); rewrites RESULTS.md's GPU section.
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/bench_gpu.py --out benchmarks/results_gpu.json --results-md benchmarks/RESULTS.md
