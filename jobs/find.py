"""Ray job entrypoint for `dedup2b find`: which rows of a built index copy the given images.

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python -m jobs.find takedown/ --index indexes/NAME --out find.parquet --base-dir $PWD

The lookup runs on the job's driver (the index's stored vectors are read where the index folder
is: put it on storage the cluster shares). Arguments as for `dedup2b find`; relative paths
(images, --index, --out) against --base-dir, since a submitted job runs in a copy of the working dir.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dedup2b.cli import main as cli


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jobs.find")
    ap.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    ap.add_argument("--index", required=True, help="the index folder")
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--out", default="find.parquet")
    ap.add_argument("--no-pixels", action="store_true")
    ap.add_argument("--base-dir", default=".", help="folder that relative paths are resolved against")
    args = ap.parse_args(argv)
    base = Path(args.base_dir).resolve()
    cmd = ["find", *[str(base / p) for p in args.images], "--index", str(base / args.index),
           "--out", str(base / args.out)]
    cmd += ["--threshold", str(args.threshold)] if args.threshold is not None else []
    cmd += ["--no-pixels"] if args.no_pixels else []
    return cli(cmd)


if __name__ == "__main__":
    sys.exit(main())
