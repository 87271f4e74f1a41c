# Two commands do everything on a fresh machine: `make run` (the quickstart fine-tune)
# and `make test` (the test suite). Both create the virtualenv and fetch what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
CONFIG ?= configs/quickstart.yaml

.PHONY: run test test-fast install data benchmarks clean

run: install data
	$(BIN)/lit-ft fit --config $(CONFIG)

test: install data
	$(BIN)/python -m pytest

# The quick loop while developing: everything but the tests marked slow (subprocesses, DDP,
# notebooks, real data, TensorBoard server). CI runs `make test`, all of them.
test-fast: install data
	$(BIN)/python -m pytest -m "not slow"

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'
	touch $@

# Fashion-MNIST's idx files from Debian (no network needed beyond the package mirror).
data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update
	$(SUDO) apt-get install -y dataset-fashion-mnist

clean:
	rm -rf $(VENV) runs .pytest_cache
