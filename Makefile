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

.PHONY: help install demo test browser bench-search bench-embed bench-stages bench-ab bench-scale bench-ivf bench-equal \
        bench-quality bench-copies bench-leaks bench-verify-cost clean \
        cluster-up cluster-node submit cluster-status cluster-down

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-15s %s\n", $$1, $$2}'

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

bench-stages: $(STAMP)  ## every stage's wall time + peak RSS on 1 M embeddings; BASELINE_STAGES (group,report) vs BASELINE=rev (~10 min)
	$(PY) -m bench.stages --rows 1000000 $(if $(BASELINE),--baseline $(BASELINE)) $(if $(BASELINE_STAGES),--baseline-stages $(BASELINE_STAGES))

bench-ab: $(STAMP)  ## STAGES (ingest,search,register) of this checkout vs BASELINE=rev on one 1 M run folder, alternating rounds (~12 min)
	$(PY) -m bench.ab --rev $(or $(BASELINE),HEAD) $(if $(STAGES),--stages $(STAGES))

bench-scale: $(STAMP)  ## 1 M rows with and without one group of 100,000 copies, index, search and group twice each (~8 min), then SCALE_SIZES plain (10 M: ~20 min)
	$(PY) -m bench.scale --rows 1000000 --giant 100000 $(if $(SCALE_SIZES),--sizes $(SCALE_SIZES)) $(if $(SCALE_CORPORA),--corpora $(SCALE_CORPORA))

bench-ivf: $(STAMP)  ## IVF-PQ build (a task per shard, on-disk lists) at IVF_SIZES (1 M, 10 M) vs the serial add; an HNSW quantizer measured (~25 min)
	$(PY) -m bench.ivf_build --sizes $(or $(IVF_SIZES),1000000,10000000)

bench-equal: $(STAMP)  ## report tables of this checkout vs BASELINE=rev on the demo and 1 M rows (~6 min)
	$(PY) -m bench.equal_outputs --baseline $(or $(BASELINE),HEAD)

bench-quality: $(STAMP)  ## copies vs look-alikes, real photos from packages: the whole pipeline with and without the pixel check, calibration error (~7 min)
	$(PY) -m bench.quality

bench-copies: $(STAMP)  ## the pixel check alone on the labelled copies set: recall per edit, false accepts per look-alike kind, cost (~2 min)
	$(PY) -m bench.copies

bench-leaks: $(STAMP)  ## decontamination leak precision / recall on a train / evaluation split of the copies set (~6 min)
	$(PY) -m bench.leaks

bench-verify-cost: $(STAMP)  ## what the pixel check adds to the demo's wall time, interleaved rounds (~2 min)
	$(PY) -m bench.verify_cost --rounds 2

clean:  ## remove demo outputs (keeps .venv)
	rm -rf reports/demo indexes/demo

# A Ray cluster on this machine (README, "Running on a cluster"). `cluster-down` stops only the
# processes of the cluster started from RAY_TMP, never another Ray running here.
SCALE_SIZES     ?= 4000000
RAY_TMP         ?= /tmp/dedup2b-ray
RAY_PORT        ?= 6379
DASHBOARD_PORT  ?= 8265
RAY_CPUS        ?= 0
OBJECT_STORE_MB ?= 1024
NODE            ?= node_b
NODE_CPUS       ?= 1
CONFIG          ?= configs/demo.yaml
JOB_ARGS        ?= $(if $(filter configs/demo.yaml,$(CONFIG)),--build-demo)

cluster-up: $(STAMP)  ## Ray head on 127.0.0.1 (RAY_CPUS=0: all cores, OBJECT_STORE_MB=1024), dashboard :8265
	$(PY) -m jobs.cluster up --temp-dir $(RAY_TMP) --port $(RAY_PORT) --dashboard-port $(DASHBOARD_PORT) \
	  --num-cpus $(RAY_CPUS) --object-store-mb $(OBJECT_STORE_MB)

cluster-node: $(STAMP)  ## a second raylet on this machine joined to the head, resource label NODE=node_b
	$(PY) -m jobs.cluster add-node --temp-dir $(RAY_TMP) --name $(NODE) --num-cpus $(NODE_CPUS)

submit: $(STAMP)  ## ray job submit CONFIG=configs/demo.yaml to the cluster, following its logs
	@test -f $(RAY_TMP)/auth_token && export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$(RAY_TMP)/auth_token; \
	set -x; $(VENV)/bin/ray job submit --address http://127.0.0.1:$(DASHBOARD_PORT) --working-dir . \
	  --runtime-env jobs/runtime_env.yaml -- python -m jobs.dedup --config $(CONFIG) --base-dir $(CURDIR) $(JOB_ARGS)

cluster-status: $(STAMP)  ## nodes, resources and jobs of the cluster
	$(PY) -m jobs.cluster status --temp-dir $(RAY_TMP)

cluster-down: $(STAMP)  ## stop the cluster's processes (only those of this cluster)
	$(PY) -m jobs.cluster down --temp-dir $(RAY_TMP)
