"""Ray job entrypoint for a removal request (`dedup2b remove`): the rows are found on the driver,
the registered runs' report and export stages run on the cluster.

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python -m jobs.remove --index indexes/NAME --keys takedown.txt --base-dir $PWD

--images and --keys as for `dedup2b remove`; relative paths against --base-dir (a submitted job runs
in a copy of the working dir). Inside a submitted job it attaches to the cluster; run directly, it
starts an embedded local Ray.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dedup2b import removal
from dedup2b.core.config import RayConfig
from dedup2b.core.executor import RayExecutor

from .dedup import in_submitted_job, log


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jobs.remove")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", nargs="+", metavar="IMAGE_OR_DIR")
    what.add_argument("--keys", metavar="FILE", help="keys, one a line")
    ap.add_argument("--index", required=True, help="the index folder")
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--no-pixels", action="store_true")
    ap.add_argument("--base-dir", default=".", help="folder that relative paths are resolved against")
    args = ap.parse_args(argv)
    base = Path(args.base_dir).resolve()
    images = [str(base / p) for p in args.images] if args.images else None
    keys = removal.read_keys(base / args.keys) if args.keys else None
    verify = None
    if not args.no_pixels:
        from dedup2b.lib import pixels
        verify = lambda q, row: pixels.verify_bytes(q, row["image"])   # noqa: E731
    import torch  # noqa: F401  (before Ray's threads: see jobs/dedup.py)
    if in_submitted_job():
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    ex = RayExecutor(RayConfig(address="auto" if in_submitted_job() else ""))
    try:
        out = removal.remove(base / args.index, images=images, keys=keys, threshold=args.threshold,
                             verify=verify, ex=ex, log=log)
    finally:
        ex.shutdown()
    log(json.dumps(out, indent=2, default=str))
    return 0 if all("error" not in r for r in out["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
