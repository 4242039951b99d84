# CPU setup, demo and tests. GPU users: see Dockerfile and docs/.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo demo-finetune test test-gpu test-slurm bench-cpu

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'

# The embedded default: build the demo corpus (offline), train the tiny CPU preset on it while its
# sharing region grows, then plot the run. A finished run is left as it is (delete checkpoints/tiny_cpu
# and runs/tiny_cpu to train again).
demo:
	$(BIN)/python tools/build_demo_corpus.py --output-dir data/demo
	$(BIN)/python pretrain_epas.py --config configs/tiny_cpu.yaml
	$(BIN)/python tools/plot_runs.py runs/tiny_cpu --output runs/tiny_cpu/plots --smooth 0.6

# The Hugging Face path after `make demo`: export the demo model, continue its training with the
# Trainer on two processes with DeepSpeed ZeRO-2 while the region grows again, then plot the run.
demo-finetune:
	test -d exports/tiny_cpu || $(BIN)/python tools/convert_checkpoint.py megatron-to-hf \
		--input checkpoints/tiny_cpu --output exports/tiny_cpu
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node 2 finetune_epas.py \
		--config configs/finetune/tiny_cpu.yaml training.deepspeed=configs/deepspeed/zero2.json
	$(BIN)/python tools/plot_runs.py runs/finetune_tiny_cpu --output runs/finetune_tiny_cpu/plots

test:
	$(BIN)/python -m pytest -q

bench-cpu:
	$(BIN)/python tools/benchmark.py train --config configs/cpu_bench.yaml --sharing 0,0.25,0.5 \
		--mode qk --device cpu --rounds 15 --json runs/bench_cpu_qk.json

test-gpu:
	$(BIN)/python -m pytest -q -m gpu

# A real two-node SLURM cluster on this machine (root; installs Debian's slurm and munge).
test-slurm:
	PYTHON=$(BIN)/python bash tests/slurm/run.sh
