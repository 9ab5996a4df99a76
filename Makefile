# The two commands of the README: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/shakespeare
EXPERIMENT ?= experiments/shakespeare.py

.PHONY: install test test-fast train clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not multiprocess"

train: install
	$(BIN)/herd train --config=$(EXPERIMENT) --workdir=$(WORKDIR)

clean:
	rm -rf $(VENV)
