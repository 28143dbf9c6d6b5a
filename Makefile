# Set-up and the two everyday commands. `make run` and `make test` each create and fill the
# virtual environment .venv when it is missing; nothing is downloaded at run time.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=            # Jetson: VENV_FLAGS=--system-site-packages to reuse JetPack's torch
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.qframe-installed

.PHONY: run test install clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# torch first, and only when none is there: a Jetson or CUDA user keeps the torch they have.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	# pin whatever torch is installed so that no later install replaces it
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt --no-build-isolation -e ".[dev]"
	touch $@

run: $(STAMP)
	$(BIN)/python -m qframe $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
