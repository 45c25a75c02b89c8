# dedup2b — make targets. The virtual environment is built from nothing and reused.
PY_BOOT ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false
export OMP_WAIT_POLICY := PASSIVE

.PHONY: help install demo test browser bench-search bench-embed clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml
	$(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## build .venv and install dedup2b with its pinned dependencies

demo: $(STAMP)  ## build the embedded demo corpus and run the whole pipeline offline on CPU
	$(VENV)/bin/dedup2b demo --out reports/demo

test: $(STAMP) browser  ## run the test suite (CPU, offline)
	$(PY) -m pytest -q tests

browser:  ## Debian's chromium for the HTML report test (installed when absent and apt can)
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq chromium >/dev/null) || echo "note: chromium not installed; the browser test will skip"

bench-search: $(STAMP)  ## search benchmark: ratios vs exhaustive FAISS and SemDeDup-style (~7 min), writes bench/results/
	$(PY) -m bench.search --sizes 250000,1000000 --queries 4000 --unionfind 10000000,100000000

bench-embed: $(STAMP)  ## embed benchmark: stage vs bare model throughput, exact-copy skipping (~5 min)
	$(PY) -m bench.embed --rows 1500

clean:  ## remove demo outputs (keeps .venv)
	rm -rf reports/demo indexes/demo
