# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv (pip, the torch/torchvision/jax builds that lie on this machine's disk).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo data test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install --no-compile torch==2.14.1 torchvision==0.29.1 jax==0.10.2
	$(PY) -m pip install --no-compile -e '.[examples,test]'
	@# pip byte-compiles file by file on one core (a third of the install); compileall does the
	@# same on all cores. A file that does not compile is left to Python, as pip leaves it.
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

# Best effort: Debian's full Fashion-MNIST (an offline source of spike_bridge.data), installed when
# running as root with apt; otherwise (or if it fails) carry on: the data has other sources.
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
data:
	@if [ ! -d $(FASHION_MNIST_DIR) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing Debian's dataset-fashion-mnist (best effort)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		timeout 300 apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
		|| { timeout 120 apt-get update -qq >/dev/null 2>&1 \
		     && timeout 300 apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } \
		|| echo "dataset-fashion-mnist not installed; continuing without it"; \
	fi; true

# Quick MNIST training (3 epochs on 4,000 images, 784-100-100-10 theta neurons, reference
# hyper-parameters otherwise); `python examples/mnist.py --help` for the full setup.
demo: $(STAMP) data
	$(PY) examples/mnist.py --dataset mnist --epochs 3 --batch-size 250 \
		--max-train-samples 4000 --max-test-samples 1000 --out outputs/demo

# Three pytest processes rather than one: each compiles many JAX and torch.compile programs, and
# one process holding all of them aborted once inside XLA's compiler late in the suite. They run
# side by side (most of the time goes to single-threaded compiles and to example subprocesses);
# each group's output is printed when all have finished. `make test TEST_PARALLEL=0` runs them
# one after the other, with live output.
# Files sharing compiled kernels (tests/kernel_stack.py: test_conformance, test_kernels) share a
# group; the subprocess-heavy files (examples, DDP) fill another. Most of the suite's time is XLA
# compiling small programs: tests/conftest.py compiles them at LLVM -O0 (see there).
TEST_GROUPS := "tests/test_compile.py tests/test_examples_mnist.py tests/test_examples_other.py tests/test_models.py tests/test_readme.py tests/test_yin_yang.py" \
	"tests/test_bridge.py tests/test_conformance.py tests/test_conv.py tests/test_data.py tests/test_fusion.py tests/test_kernels.py tests/test_optim.py tests/test_plot.py" \
	"tests/test_library.py tests/test_nn.py tests/test_reliability.py"
TEST_PARALLEL ?= 1
# The slowest tests of each group are listed at the end of its log (where the 10 minutes go).
PYTEST_FLAGS ?= --durations=12
TEST_LOGS := outputs/test-logs
# JAX's persistent compilation cache shared by the pytest processes, in either mode
TEST_JAX_CACHE := outputs/test-jax-cache
test: $(STAMP) data
	@missing=$$(ls tests/test_*.py | grep -v -x -F "$$(printf '%s\n' $(TEST_GROUPS) | tr ' ' '\n')"); \
	if [ -n "$$missing" ]; then echo "test files in no TEST_GROUPS entry: $$missing"; exit 1; fi
	@rm -rf $(TEST_JAX_CACHE); export JAX_COMPILATION_CACHE_DIR=$(abspath $(TEST_JAX_CACHE)); \
	if [ "$(TEST_PARALLEL)" = 0 ]; then \
		status=0; for group in $(TEST_GROUPS); do $(PY) -m pytest -q $(PYTEST_FLAGS) $$group || status=1; done; \
		exit $$status; \
	fi; \
	rm -rf $(TEST_LOGS); mkdir -p $(TEST_LOGS); i=0; \
	for group in $(TEST_GROUPS); do \
		i=$$((i + 1)); \
		{ $(PY) -m pytest -q $(PYTEST_FLAGS) $$group > $(TEST_LOGS)/group$$i.log 2>&1; \
		  echo $$? > $(TEST_LOGS)/group$$i.status; } & \
	done; \
	echo "$$i pytest processes running side by side; logs in $(TEST_LOGS)/"; wait; \
	status=0; for log in $(TEST_LOGS)/group*.log; do \
		echo "=== $$log"; cat $$log; [ "$$(cat $${log%.log}.status)" = 0 ] || status=1; \
	done; exit $$status

bench: $(STAMP) data
	$(PY) -m pip install -e '.[bench]'
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/bridge.py
	$(PY) benchmarks/peers.py

clean:
	rm -rf $(VENV) outputs
