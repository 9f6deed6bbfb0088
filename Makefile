# Two entry points do all set-up on a fresh machine:  `make demo`  and  `make test`.
# TORCH selects the PyTorch build: the default pins 2.13.0; on a CUDA machine with torch already present, use
# `make demo TORCH=` to keep it (an empty TORCH makes the environment see the system's packages).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# The example scripts call `moonforge` and `python3`: put the environment's first on PATH.
RUN := PATH="$(abspath $(BIN)):$$PATH"

.PHONY: demo test setup clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(if $(TORCH),,--system-site-packages) $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q "$(TORCH)")
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(RUN) $(BIN)/moonforge demo --workdir demo-work

test: $(VENV)/.installed
	$(RUN) $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) demo-work
