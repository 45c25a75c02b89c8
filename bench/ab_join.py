"""A/B of the search's join alone, on one run folder, sides alternating in rounds, each side a
process of its own joining every cell block on 2 threads as the local executor runs them:

  rev         a git revision's code (--rev)
  ours        this checkout
(bench/results/ab_join.md was made at 354059b, which also had a side `unfiltered`: a filter of
the bound's candidates by their smallest shared cell before the reads, measured and not kept.)

    python -m bench.ab_join --corpus /tmp/corpora/plain10000000-corpus --rev 5642beb --rounds 2

The corpus (a released-style folder, e.g. one bench.scale --corpora kept) goes through ingest,
embed and index once into --work, the search's assign step runs once (this checkout); the
sides' pair counts are compared (a difference is printed). Writes bench/results/NAME.json and NAME.md (--out NAME, default
ab_join).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from bench.stages import REPO, RESULTS, checkout, run_stage, shim

SIDE = r'''
import json, sys, time
from pathlib import Path
from dedup2b.core import config
from dedup2b.core.executor import LocalExecutor
from dedup2b.core.run import Run, read_manifest
from dedup2b.stages import STAGES, search
run_dir, mode = Path(sys.argv[1]), sys.argv[2]
run = Run(config.from_dict(read_manifest(run_dir)["config"]), {s.NAME: s.FIELDS for s in STAGES})
job = search.search_job(run)
total, step = search.n_cells(job.index_dir), job.cfg.cells_per_task
blocks = [(job, lo, min(lo + step, total)) for lo in range(0, total, step)]
t = time.time()
out = LocalExecutor(2).map(search.join_block, blocks, num_cpus=1)
keys = ("pairs", "candidates", "rows_read")
print(json.dumps({"seconds": round(time.time() - t, 1), **{k: sum(o.get(k, 0) for o in out) for k in keys}}))
'''

ASSIGN = r'''
import sys, time
from pathlib import Path
from dedup2b.core import config
from dedup2b.core.executor import LocalExecutor
from dedup2b.core.run import Run, read_manifest
from dedup2b.stages import STAGES, search
run_dir = Path(sys.argv[1])
run = Run(config.from_dict(read_manifest(run_dir)["config"]), {s.NAME: s.FIELDS for s in STAGES})
job = search.search_job(run)
t = time.time()
LocalExecutor(2).map(search.assign_shard, [(job, i) for i in sorted(job.shards)], num_cpus=1)
print(round(time.time() - t, 1))
'''


def _python(code: Path, script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim(code)), str(code)]), "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=code, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"side failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True, help="a released-style corpus folder")
    ap.add_argument("--rev", default="", help="a git revision whose join runs as the side `rev`")
    ap.add_argument("--sides", default="", help="comma-separated, of rev, ours (default: rev,ours with --rev, "
                    "else ours)")
    ap.add_argument("--work", default="/tmp/dedup2b-bench-ab-join")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="ab_join")
    args = ap.parse_args(argv)
    sides = args.sides.split(",") if args.sides else (["rev"] if args.rev else []) + ["ours"]
    code = {"ours": REPO}
    if "rev" in sides:
        code["rev"] = checkout(args.rev, Path(tempfile.mkdtemp()) / "code")
    run_dir = Path(args.work) / "run"
    for stage in ("ingest", "embed", "index"):
        print(stage, run_stage(stage, Path(args.corpus), run_dir, REPO), flush=True)
    assign_s = float(_python(REPO, ASSIGN, str(run_dir)))
    runs: dict[str, list] = {s: [] for s in sides}
    counts: dict[str, dict] = {}
    for r in range(args.rounds):
        for side in sides:
            got = json.loads(_python(code[side], SIDE, str(run_dir), side))
            runs[side].append(got.pop("seconds"))
            counts[side] = got
            print(f"round {r} {side:10s} {runs[side][-1]} s {got}", flush=True)
    if len({c["pairs"] for c in counts.values()}) != 1:
        print(f"note: the sides wrote different pair counts: {counts}")
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in sorted((Path(args.corpus) / "metadata").glob("*.parquet")))
    cmd = "python -m bench.ab_join " + " ".join(sys.argv[1:] if argv is None else argv)
    base = min(runs[sides[0]])
    lines = [f"| measure | {' | '.join(sides)} |", "|---|" + "---|" * len(sides),
             "| join wall s (each round) | " + " | ".join(", ".join(map(str, runs[s])) for s in sides) + " |",
             f"| least, ratio to {sides[0]} | " + " | ".join(f"{min(runs[s])} ({min(runs[s]) / base:.2f})" for s in sides) + " |"]
    for k in ("pairs", "candidates", "rows_read"):
        lines.append(f"| {k} | " + " | ".join(f"{counts[s].get(k, 0):,}" for s in sides) + " |")
    md = "\n".join(lines)
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(
        {"command": cmd, "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "rows": rows,
         "assign_s": assign_s, "runs": runs, "counts": counts}, indent=2))
    (RESULTS / f"{args.out}.md").write_text(
        f"Command: `{cmd}` ({os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, {rows:,} rows; the assign step "
        f"{assign_s} s, run once with this checkout)\n\n{md}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
