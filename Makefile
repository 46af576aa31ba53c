# Two commands: `make repro` (set up + run the embedded `tiny` pipeline) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned so pip never swaps it; 2.13.0 is the CPU build this
# project's machines carry. On a GPU host, install your CUDA build of torch into $(VENV) first.
TORCH_SPEC ?= torch==2.13.0
VBENCH_SPEC ?= vbench==0.1.5

.PHONY: setup repro test test-fast lint screenshots gpu-wheels carry-size clean-outputs
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip wheel setuptools
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	# DeepSpeed ships only an sdist whose setup imports torch: build against the torch above
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "deepspeed>=0.15"
	$(BIN)/pip install -q -e ".[dev]"
	# VBench's own AMT-S network code for motion smoothness; its pins (transformers 4.33, numpy<2)
	# conflict with ours and we import only its AMT modules, so its dependencies are not installed
	$(BIN)/pip install -q --no-deps "$(VBENCH_SPEC)"
	touch $@

repro: setup
	$(BIN)/python -m flows repro

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check udpdiff flows tests benchmarks

# docs/images/mlflow-*.png for the README: the MLflow UI test's screenshots (needs chromium + chromium-driver)
screenshots: setup
	UDPDIFF_SCREENSHOT_DIR=docs/images $(BIN)/python -m pytest tests/test_mlflow_ui.py -q

# .whl/: what a lent GPU machine lacks, for benchmarks/small_gpu_device.sh (carry it with `run`)
gpu-wheels: setup
	$(BIN)/python benchmarks/gpu_wheels.py --out .whl

# what run(carry=[".whl"]) would take, against the device's 64 MiB (the checkout included, with its committed .gpu-carry/vae-small.tar.xz; an ignored file put in .gpu-carry/ counts when carried too)
carry-size:
	$(BIN)/python benchmarks/carry_size.py .whl $(wildcard .gpu-carry)

clean-outputs:
	rm -rf data/*/ models/*/ outputs/*/ mlruns.db mlartifacts
