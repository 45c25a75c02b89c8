"""Ray job entrypoint for the whole pipeline.

    ray job submit --working-dir . -- python -m jobs.dedup --config configs/demo.yaml [--build-demo]

Inside a submitted job it attaches to the cluster the job runs on; run directly, it starts an
embedded local Ray. Relative paths in the config are resolved against the working directory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline import config as config_mod
from pipeline.cli import print_summary
from pipeline.executor import RayExecutor
from pipeline.pipeline import STAGES, run_pipeline


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jobs.dedup")
    ap.add_argument("--config", required=True)
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    ap.add_argument("--build-demo", action="store_true", help="write the demo corpus to input.path first")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args(argv)
    cfg = config_mod.load(args.config)
    for field in ("run_dir", "index_dir"):
        if getattr(cfg, field):
            setattr(cfg, field, str(Path(getattr(cfg, field)).resolve()))
    cfg.input.path = str(Path(cfg.input.path).resolve())
    if args.build_demo:
        from pipeline import demo
        demo.build(Path(cfg.input.path).parent)
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        cfg.ray.address = cfg.ray.address or "auto"
    ex = RayExecutor(cfg.ray)
    try:
        run_pipeline(cfg, ex, tuple(args.stages.split(",")), fresh=args.fresh, log=lambda m: print(m, flush=True))
    finally:
        ex.shutdown()
    summary = cfg.run_path / "reports" / "summary.json"
    if summary.exists():
        print_summary(cfg.run_path, json.loads(summary.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
