# The README names these targets. Everything runs in a local virtual environment (.venv).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Hubs are unreachable here and in CI; the default backbone needs none.
export HF_HUB_OFFLINE := 1

.PHONY: install test demo photos system-packages bench clean

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

# System packages for the benchmark (cairo renders the SVGs) and the demo photos (darknet's).
APT_PACKAGES := libcairo2 openclipart-svg darknet
DATA := data/openclipart
MODEL := models/openclipart-default
# Expanded when the recipe runs, after system-packages has installed darknet.
PHOTOS = $(wildcard /usr/share/darknet/data/*.jpg) tests/data/chelsea-cat.jpg
VOCABULARY := dog,cat,horse,bird,person,car,tree,flower,animal,mammal,food,building,boat,sport,clothing,weather

system-packages:
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $(APT_PACKAGES); }

$(DATA)/stats.json: | install system-packages
	$(BIN)/clip-decoder data openclipart --out $(DATA)

# The main job: build the benchmark, extract features, train CLIP-Decoder and the baselines for
# 3 seeds on both label splits, write docs/RESULTS.md, then tag real photos with a free vocabulary.
demo: install system-packages $(DATA)/stats.json
	$(BIN)/clip-decoder bench --data $(DATA) --splits $(DATA)/splits/default.json $(DATA)/splits/second.json \
		--seeds 0 1 2 --markdown docs/RESULTS.md --json docs/results.json
	$(BIN)/clip-decoder train --data $(DATA) --split $(DATA)/splits/default.json --out $(MODEL)
	$(MAKE) --no-print-directory photos

photos: install system-packages
	$(BIN)/clip-decoder predict --model $(MODEL) --labels "$(VOCABULARY)" $(PHOTOS)

# Rewrites the tables in docs/BENCHMARKS.md (about 25 min on 2 cores; the data as for demo).
BENCH_SCRIPTS := inference training_epoch extraction shortlist_quality load
bench: install system-packages $(DATA)/stats.json
	@for script in $(BENCH_SCRIPTS); do echo "== bench.$$script"; $(BIN)/python -m bench.$$script --data $(DATA) || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache $(DATA) models
