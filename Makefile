# The README names these targets. Everything runs in a local virtual environment (.venv).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Hubs are unreachable here and in CI; the default backbone needs none.
export HF_HUB_OFFLINE := 1

.PHONY: install test demo ablation photos photos-dev model system-packages photo-packages bench clean

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
# The photo check (bench/photos.py): darknet's and scikit-image's sample photos, labelled by eye;
# and the other photos that choices are made on (never the check's), from the packages below.
PHOTO_CHECK := data/photos
PHOTO_DEV := data/photos-dev
# The model that ships in the package (`clip-decoder predict` with no --model): every label seen.
PACKAGED := src/clip_decoder/models/openclipart

# The dev photos' wallpapers and sample photos (`make photos-dev`; `make demo` needs none of them).
DEV_PHOTO_PACKAGES := plasma-workspace-wallpapers opencv-doc mate-backgrounds

system-packages:
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $(APT_PACKAGES); }

photo-packages:
	@dpkg -s $(DEV_PHOTO_PACKAGES) >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq --no-install-recommends $(DEV_PHOTO_PACKAGES); }

$(DATA)/stats.json: | install system-packages
	$(BIN)/clip-decoder data openclipart --out $(DATA)

# The main job: build the benchmark, extract features, train CLIP-Decoder and the baselines for
# 3 seeds on both label splits, write docs/RESULTS.md, then tag real photos with a free vocabulary,
# using the default split's seed-0 CLIP-Decoder that the benchmark kept (no second training).
BENCH_MODELS := models/bench
# Every method but the alignment ablation: the two prior ablations score clip-decoder's own heads, so
# they cost no training. `make ablation` runs the alignment ablation (docs/ABLATION.md).
DEMO_METHODS := clip-decoder clip-decoder-no-prior clip-decoder-one-prior-weight ml-decoder linear conse zero-shot-prior
# The (split, seed) pairs run in BENCH_JOBS worker processes sharing the cores (`bench --jobs`): with 2, the whole
# of `make demo` took 19.4 min from an empty cache on 2 cores (README). BENCH_JOBS=1: one process of two threads.
BENCH_JOBS ?= 2
demo: install system-packages $(DATA)/stats.json photos
	$(BIN)/clip-decoder bench --data $(DATA) --splits $(DATA)/splits/default.json $(DATA)/splits/second.json \
		--seeds 0 1 2 --methods $(DEMO_METHODS) --photos $(PHOTO_CHECK) --markdown docs/RESULTS.md \
		--json docs/results.json --save-models $(BENCH_MODELS) --jobs $(BENCH_JOBS)
	rm -rf $(MODEL) && cp -r $(BENCH_MODELS)/default-clip-decoder-seed0 $(MODEL)
	$(BIN)/clip-decoder predict --model $(MODEL) --format table --top-k 3 \
		--labels-file $(PHOTO_CHECK)/vocabulary.txt $(PHOTO_CHECK)/images

# The alignment ablation, which trains its own heads: 12 CLIP-Decoder trainings of about 75 s each on 2 quiet cores.
ablation: install system-packages $(DATA)/stats.json photos
	$(BIN)/clip-decoder bench --data $(DATA) --splits $(DATA)/splits/default.json $(DATA)/splits/second.json \
		--seeds 0 1 2 --methods clip-decoder clip-decoder-no-alignment --photos $(PHOTO_CHECK) \
		--markdown docs/ABLATION.md --json docs/ablation.json --jobs $(BENCH_JOBS)

photos: install system-packages
	$(BIN)/python -m bench.photos --out $(PHOTO_CHECK)
	$(BIN)/python -m bench.photos --set check-nus81

# The dev photos (40) that prior and decision choices are made on: bench.prior_grid, bench.tune --photos.
# Both photo sets are also built against NUS-WIDE's 81 concepts (a fixed vocabulary; bench/photos.py).
photos-dev: install system-packages photo-packages
	$(BIN)/python -m bench.photos --set dev --out $(PHOTO_DEV)
	$(BIN)/python -m bench.photos --set dev-nus81

# Rebuilds the packaged model: the default recipe on every label of the benchmark (about 3 min).
$(DATA)/splits/all.json: $(DATA)/stats.json
	$(BIN)/python -c "import json; s = json.load(open('$(DATA)/splits/default.json')); \
		json.dump({'seen': sorted(s['seen'] + s['unseen']), 'unseen': []}, open('$@', 'w'), indent=2)"

model: install $(DATA)/splits/all.json photos
	$(BIN)/clip-decoder train --data $(DATA) --split $(DATA)/splits/all.json --out $(PACKAGED)
	rm -f $(PACKAGED)/curves.png
	$(BIN)/clip-decoder predict --format table --top-k 3 --labels-file $(PHOTO_CHECK)/vocabulary.txt $(PHOTO_CHECK)/images

# Rewrites the tables in docs/BENCHMARKS.md (about 43 min on 2 cores; the data as for demo).
BENCH_SCRIPTS := inference training_epoch extraction shortlist_quality load onnx_runtime vit_cpu library
bench: install system-packages $(DATA)/stats.json photos
	@for script in $(BENCH_SCRIPTS); do echo "== bench.$$script"; $(BIN)/python -m bench.$$script --data $(DATA) || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache $(DATA) models
