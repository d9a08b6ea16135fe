# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv (pip, the torch/torchvision/jax builds that lie on this machine's disk).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1 jax==0.10.2
	$(PY) -m pip install -e '.[examples,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/kernel_demo.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pip install -e '.[bench]'
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/bridge.py

clean:
	rm -rf $(VENV) outputs
