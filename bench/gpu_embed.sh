#!/usr/bin/env bash
# GPU embed benchmark (bench/GPU.md): open_clip ViT-L-14, random weights, end to end through the
# embed stage on synthetic JPEG shards built where it runs.
#
#   bash bench/gpu_embed.sh --wheels   here, with PyPI: the wheels the GPU machine lacks -> .whl/
#   bash bench/gpu_embed.sh            on the GPU machine, offline: install .whl/, run, log to $OUT
#   bash bench/gpu_embed.sh --smoke    here, on CPU: the same code path on 128 rows of ViT-S-32
# Further arguments go to `python -m bench.gpu_embed` (its --help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 OMP_WAIT_POLICY=PASSIVE NO_ALBUMENTATIONS_UPDATE=1 \
       TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

WHEELS=.whl
SITE=/tmp/dedup2b-site
# Versions as in .venv. What the GPU machine's image lacks: Ray with its jsonschema stack,
# open_clip with ftfy. Ray travels slimmed (slim_ray) to fit the 64 MiB working-tree limit.
PINS=(ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
      rpds-py==2026.9.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4)

# Ray's wheel (~76 MiB) without the Java workers' jar and the dashboard's web client: neither is
# loaded by a Python driver with include_dashboard=False. RECORD loses their lines too. A wheel
# already slimmed is left as it is.
slim_ray() {
  python3 - "$1" <<'EOF'
import os, sys, zipfile
drop = ("ray/jars/", "ray/dashboard/client/build/")
path = sys.argv[1]
with zipfile.ZipFile(path) as src:
    if not any(name.startswith(drop) for name in src.namelist()):
        sys.exit(0)
    with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.startswith(drop):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(l for l in data.splitlines(True) if not l.decode().startswith(drop))
            dst.writestr(info, data)
os.replace(path + ".tmp", path)
EOF
}

# Adds the pinned wheels to .whl/ (wheels other benchmarks put there stay) and slims Ray's.
fetch_wheels() {
  grep -qxF "/$WHEELS/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$WHEELS/" >> .git/info/exclude; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "${PINS[@]}"
  slim_ray "$WHEELS"/ray-2.60.0-cp312-*.whl
  du -b "$WHEELS"/*.whl
  echo "total: $(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1) bytes (the working tree travels at most 64 MiB)"
}

install_wheels() {
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
}

machine() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  echo "cores: $(nproc); python: $(python3 --version 2>&1)"
  df -h /dev/shm /tmp | tail -n +2
}

case "${1:-}" in
  --wheels)
    fetch_wheels ;;
  --smoke)
    shift
    OUT="${OUT:-/tmp/dedup2b-gpu-embed-smoke}"
    mkdir -p "$OUT"
    .venv/bin/python -m bench.gpu_embed --rows 128 --rows-per-shard 32 --model open_clip:ViT-S-32 --batch 16 \
      --bare-iters 2 --object-store-mb 512 --work /tmp/dedup2b-gpu-embed-smoke-work --out "$OUT" "$@" \
      2>&1 | tee "$OUT/gpu_embed.log" ;;
  *)
    OUT="${OUT:-bench/results/tmp/gpu_embed}"
    mkdir -p "$OUT"
    machine | tee "$OUT/machine.txt"
    # the package is not installed there: pipeline/ is importable as dedup2b through a link (the Ray
    # workers inherit PYTHONPATH), and bench/ from the working dir
    PKG="$(mkdir -p "$OUT/pkg" && cd "$OUT/pkg" && pwd)" && ln -sfn "$PWD/pipeline" "$PKG/dedup2b"
    export PYTHONPATH="$PWD:$PKG${PYTHONPATH:+:$PYTHONPATH}"
    if [ -d "$WHEELS" ]; then install_wheels; fi
    python3 -m bench.gpu_embed --require-cuda --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_embed.log" ;;
esac
