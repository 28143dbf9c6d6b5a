# Set-up and the two everyday commands. `make run` and `make test` each create and fill the
# virtual environment .venv when it is missing; nothing is downloaded at run time.
#
# Installs are reproducible: every dependency is constrained to the versions in requirements/lock.txt
# (the ones the tests pass with); torch to TORCH_SPEC. `make test-latest` installs the newest
# releases into .venv-latest and runs the tests there, so a breaking release shows up here first;
# `make lock` then writes what it took into the lock.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=            # Jetson: VENV_FLAGS=--system-site-packages to reuse JetPack's torch
TORCH_SPEC ?= torch==2.13.0
LOCK ?= requirements/lock.txt
LATEST_VENV ?= .venv-latest
ARGS ?=
PYTEST_ARGS ?=
# make test: pytest-xdist workers, one per core this process may use (at most 8, for memory); each
# computes on one thread (tests/conftest.py). TEST_WORKERS=0: one process, torch's default threads
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(8, len(os.sched_getaffinity(0))))" 2>/dev/null || echo 2)
BIN := $(VENV)/bin
STAMP := $(VENV)/.qframe-installed

.PHONY: run test install test-latest lock clean gpu-wheels

install: $(STAMP)

# $(1): virtual environment; $(2): the lock, or - for none; $(3): extra pip arguments (the lock's
# constraints, or --upgrade)
define setup_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(VENV_FLAGS) $(1)
	# torch first, and only when none is there: a Jetson or CUDA user keeps the torch they have.
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/python -m pip install -q $(3) "$(TORCH_SPEC)"
	# the constraints: whatever torch is installed, with the packages it was installed with (a CUDA
	# torch pins its own triton), and the lock for everything else, so that no later install replaces it
	$(1)/bin/python requirements/constraints.py $(2) $(1)/constraints.txt
	$(1)/bin/python -m pip install -q -c $(1)/constraints.txt $(if $(filter -,$(2)),$(3)) pip setuptools wheel
	$(1)/bin/python -m pip install -q -c $(1)/constraints.txt $(if $(filter -,$(2)),$(3)) --no-build-isolation -e ".[dev]"
endef

# the kernels' sources too: a pull that changes them rebuilds the prebuilt extension
$(STAMP): pyproject.toml setup.py $(LOCK) requirements/constraints.py $(wildcard csrc/*/*)
	$(call setup_venv,$(VENV),$(LOCK),-c $(LOCK))
	touch $@

run: $(STAMP)
	$(BIN)/python -m qframe $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The newest release of every dependency (torch stays at TORCH_SPEC), in its own environment.
test-latest:
	$(call setup_venv,$(LATEST_VENV),-,--upgrade --upgrade-strategy eager)
	$(LATEST_VENV)/bin/python -m pip list --format=freeze | grep -i -E '^(onnx|onnxruntime|onnxscript|triton|numpy|hydra-core)=='
	$(LATEST_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

# Write the versions .venv-latest took (after `make test-latest` passed) into the lock.
lock:
	test -x $(LATEST_VENV)/bin/python || { echo "run 'make test-latest' first"; exit 2; }
	{ sed -n '/^#/p' $(LOCK); $(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v -i '^torch=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

# Hydra and OmegaConf at the lock's versions as wheels in .whl/, for a GPU machine that has torch but not
# these and cannot download (benchmarks/gpu/run.sh installs .whl/*.whl first; pure Python, any Python 3)
gpu-wheels:
	$(PYTHON) -m pip wheel -q --no-deps -w .whl $$(grep -i -E '^(hydra-core|omegaconf|antlr4-python3-runtime)==' $(LOCK))
	ls .whl

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info
