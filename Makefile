# The README names these targets. Everything runs in a local virtual environment (.venv).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Hubs are unreachable here and in CI; the default backbone needs none.
export HF_HUB_OFFLINE := 1

.PHONY: install test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first: this pin takes the CPU wheel that lies on this machine's disk.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest

# Until the training pipeline lands this is a smoke run: an UNTRAINED head on the default
# offline backbone scores a few labels for the sample photo.
demo: install
	$(BIN)/clip-decoder predict --labels "cat,dog,car,tree,person" tests/data/chelsea-cat.jpg

# Rewrites the tables in docs/BENCHMARKS.md.
bench: install
	$(BIN)/python bench/predict_latency.py

clean:
	rm -rf $(VENV) .pytest_cache
