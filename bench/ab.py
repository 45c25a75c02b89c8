"""A/B of single stages: this checkout against a git revision, on one finished run folder, same
box, same run, rounds alternating so drift on the box hits both sides alike.

    python -m bench.ab --rev d0d35be --stages ingest,search,register --rounds 2 [--rows 1000000]
    python -m bench.ab --rev 3e6752c --stages search --corpus /tmp/corpora/giant-corpus   # a corpus kept by bench.scale

The corpus (bench.corpora.write_clip_like, released-style embeddings, 125 k rows a shard) goes
through every stage once with this checkout; then, per round and stage, the stage's done markers
are removed and the stage runs again in a process of its own, first by REV's code (git archive,
imported through a shim so the editable install of this checkout does not answer for it), then by
ours. `--corpus DIR`: an existing corpus in the same layout (kept), e.g. one
bench.scale --corpora wrote with a giant group. `ingest` runs into a fresh folder each time (rerunning it would invalidate the later stages
of the shared run). Wall seconds include the process start (imports), as a user's `dedup2b STAGE`
does. Writes bench/results/ab.json and ab.md (`--out NAME`: NAME.json and NAME.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from bench.stages import REPO, RESULTS, STAGES, checkout, fresh_corpus, run_stage


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", required=True, help="git revision to compare with")
    ap.add_argument("--stages", default="ingest,search,register")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--corpus", default=None, help="an existing corpus folder (released-style layout) instead of "
                    "generating one of --rows rows")
    ap.add_argument("--work", default="/tmp/dedup2b-bench-ab")
    ap.add_argument("--out", default="ab", help="results file name under bench/results (no suffix)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    if args.corpus:
        shutil.rmtree(work, ignore_errors=True)
        corpus, run_dir = Path(args.corpus), work / "run"
        args.rows = sum(pq.ParquetFile(f).metadata.num_rows for f in sorted((corpus / "metadata").glob("*.parquet")))
    else:
        corpus, run_dir = fresh_corpus(work, args.rows)
    base = checkout(args.rev, Path(tempfile.mkdtemp()) / "code")
    wanted = [s for s in STAGES if s in args.stages.split(",")]
    times: dict[str, dict[str, list]] = {s: {"rev": [], "ours": []} for s in wanted}
    try:
        for stage in STAGES:
            run_stage(stage, corpus, run_dir, REPO)
        for r in range(args.rounds):
            for stage in wanted:
                for side, code in (("rev", base), ("ours", REPO)):
                    target = work / f"ingest-{side}" if stage == "ingest" else run_dir
                    if stage == "ingest":
                        shutil.rmtree(target, ignore_errors=True)
                    for done in (target / stage / "_done", target / "index" / "registry" / "_done"):
                        shutil.rmtree(done, ignore_errors=True)
                    out = run_stage(stage, corpus, target, code)
                    times[stage][side].append(out)
                    print(f"round {r} {stage:8s} {side:4s} {out}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(base.parent, ignore_errors=True)
    lines = [f"| stage | {args.rev} wall s (each round) | ours wall s | ratio (least of each side) | {args.rev} peak RSS MB | ours |",
             "|---|---|---|---|---|---|"]
    for stage in wanted:
        a = [o["seconds"] for o in times[stage]["rev"]]
        b = [o["seconds"] for o in times[stage]["ours"]]
        ra = max(o["peak_rss_mb"] for o in times[stage]["rev"])
        rb = max(o["peak_rss_mb"] for o in times[stage]["ours"])
        lines.append(f"| {stage} | {', '.join(map(str, a))} | {', '.join(map(str, b))} | {min(b) / min(a):.2f} | {ra} | {rb} |")
    md = "\n".join(lines)
    cmd = "python -m bench.ab " + " ".join(sys.argv[1:] if argv is None else argv)
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"command": cmd, "date": time.strftime("%Y-%m-%d"),
                                                 "cores": os.cpu_count(), "rows": args.rows, "times": times}, indent=2))
    (RESULTS / f"{args.out}.md").write_text(f"Command: `{cmd}` ({os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, "
                                   f"{args.rows:,} rows)\n\n{md}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
