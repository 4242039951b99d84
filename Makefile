# CPU setup, demo and tests. GPU users: see Dockerfile and docs/.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-gpu bench-cpu

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'

demo:
	$(BIN)/python tools/demo.py

test:
	$(BIN)/python -m pytest -q

bench-cpu:
	$(BIN)/python tools/benchmark.py train --config configs/cpu_bench.yaml --sharing 0,0.25,0.5 \
		--mode qk --device cpu --json docs/bench_cpu_qk.json

test-gpu:
	$(BIN)/python -m pytest -q -m gpu
