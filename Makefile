# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned, so that nothing else pulls a CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	# triton: the GPU kernels, tested on CPU under its interpreter (TRITON_INTERPRET=1).
	$(PY) -m pip install --quiet -e ".[test,triton]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m w4a8moe.demo

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) demo_out
