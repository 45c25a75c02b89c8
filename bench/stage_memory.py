"""Where a stage's memory goes: one stage (group or report) rerun on a finished run folder of
released-style embeddings, its anonymous RSS polled every 5 ms and labelled by the phase it is in
(the stage's own functions, wrapped), the peak per phase printed.

    python -m bench.stage_memory group /tmp/run /tmp/corpus          # this checkout
    PYTHONPATH=OTHER/.shim:OTHER python -m bench.stage_memory ...    # another checkout's code

The run folder comes from `dedup2b run --input CORPUS --input-format embeddings --run-dir RUN
--index-dir RUN/index --threshold 0.95 --executor local`. A label "X>" is the time after X
returned, until the next labelled call. Peaks are of the whole process (the interpreter and the
imports are the "start" phase). Results: bench/results/stage_memory.md.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import threading
import time
from pathlib import Path

from bench.stages import _anon_kb


class Phases:
    def __init__(self):
        self.now, self.peaks, self.stop = "start", {}, False
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self):
        while not self.stop:
            a = _anon_kb(os.getpid())
            self.peaks[self.now] = max(self.peaks.get(self.now, 0), a)
            time.sleep(0.005)

    def wrap(self, owner, name: str, label: str | None = None):
        f = getattr(owner, name)
        label = label or name

        @functools.wraps(f)
        def g(*a, **k):
            self.now = label
            try:
                return f(*a, **k)
            finally:
                self.now = label + ">"
        setattr(owner, name, g)

    def wrap_writer(self, owner):
        """parquet_writer: labelled by the file it writes."""
        orig = owner.parquet_writer

        @contextlib.contextmanager
        def pw(path, schema):
            self.now = f"writing {Path(path).name}"
            with orig(path, schema) as w:
                yield w
            self.now = f"{Path(path).name} written"
        owner.parquet_writer = pw


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["group", "report"])
    ap.add_argument("run_dir")
    ap.add_argument("corpus")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    ph = Phases()
    from dedup2b.stages import group, report
    if args.stage == "group":
        from dedup2b.lib.unionfind import UnionFind
        for name in ("read_nodes", "quality_rank", "components", "representatives", "_rep_similarity",
                     "_group_bucket", "_shard_rows"):
            if hasattr(group, name):      # the phases of this checkout's group stage (or an earlier one's)
                ph.wrap(group, name)
        ph.wrap(UnionFind, "labels", "union-find labels")
        ph.wrap(group.Nearest, "update", "nearest")
        ph.wrap(UnionFind, "forest", "forest")
        ph.wrap_writer(group)
    else:
        from dedup2b.lib import gallery
        for name in ("Groups", "_candidates", "key_lookup", "shard_samples", "invariant", "_pairs_report", "_plot"):
            ph.wrap(report, name)
        ph.wrap(gallery, "write", "gallery")
    shutil.rmtree(run_dir / args.stage / "_done", ignore_errors=True)
    from dedup2b.cli import main as cli
    t0 = time.time()
    rc = cli([args.stage, "--input", args.corpus, "--input-format", "embeddings", "--run-dir", str(run_dir),
              "--index-dir", str(run_dir / "index"), "--threshold", "0.95", "--executor", "local"])
    ph.stop = True
    print(f"{args.stage}: rc {rc}, {time.time() - t0:.1f} s; peak anonymous RSS per phase, MB")
    for k, v in ph.peaks.items():
        print(f"  {k:28s} {v / 1024:8.1f}")
    print(f"  {'peak':28s} {max(ph.peaks.values()) / 1024:8.1f}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
