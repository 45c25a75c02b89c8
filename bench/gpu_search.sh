#!/usr/bin/env bash
# GPU search benchmark (bench/GPU.md, "Search"): the cell join on 100 M virtual CLIP-like 768-d
# vectors on one GPU, recall and precision against exhaustive search on sampled queries.
#
#   bash bench/gpu_search.sh            on the GPU machine, offline: a 2 M-row pass checks the CUDA
#                                       path (~20 s), then the 100 M run; logs and JSON to $OUT
#   bash bench/gpu_search.sh --smoke    here, on CPU: the same code path on 200,000 rows (20-40 s)
# Further arguments go to the 100 M run's `python -m bench.gpu_search` (its --help lists them).
# It needs no wheel (torch and numpy only); wheels carried in .whl/ are installed all the same.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE

WHEELS=.whl
SITE=/tmp/site
LIMIT_S="${LIMIT_S:-560}"   # both passes stop themselves (SIGINT: a traceback in the log) by then

machine() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  echo "cores: $(nproc); python: $(python3 --version 2>&1); torch: $(python3 -c 'import torch; print(torch.__version__)')"
}

# run_pass NAME ARGS...: one run, stopped at the shared deadline; $OUT/NAME.log and NAME.json
run_pass() {
  local name="$1" left=$((LIMIT_S - SECONDS))
  shift
  [ "$left" -gt 10 ] || { echo "no time left for $name"; return 1; }
  timeout -s INT "$left" python3 -m bench.gpu_search --json "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log"
}

case "${1:-}" in
  --smoke)
    shift
    OUT="${OUT:-/tmp/dedup2b-gpu-search-smoke}"
    mkdir -p "$OUT"
    .venv/bin/python -m bench.gpu_search --rows 200000 --device cpu --queries 200 --json "$OUT/gpu_search.json" \
      "$@" 2>&1 | tee "$OUT/gpu_search.log" ;;
  *)
    OUT="${OUT:-bench/results/tmp/gpu_search}"
    mkdir -p "$OUT"
    machine | tee "$OUT/machine.txt"
    PKG="$(mkdir -p "$OUT/pkg" && cd "$OUT/pkg" && pwd)" && ln -sfn "$PWD/pipeline" "$PKG/dedup2b"   # pipeline/ imports as dedup2b
    export PYTHONPATH="$PWD:$PKG${PYTHONPATH:+:$PYTHONPATH}"
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    run_pass gpu_search_2m --rows 2000000 --queries 200
    run_pass gpu_search "$@" ;;
esac
