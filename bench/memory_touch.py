"""The allocator setting (core/memory.py: KEEP_FREED, set by the CLI as it starts) off and on, same
code, same run folder, same box, rounds alternating so drift on the box hits both sides alike:

    python -m bench.memory_touch --corpus /tmp/corpora/giant-corpus --stages index,search,group --rounds 3

The corpus (released-style layout, e.g. one bench.scale --corpora kept) goes through every stage
once; then, per round and stage, the stage's done markers are removed and the stage runs again in
a process of its own, with DEDUP2B_KEEP_FREED=0 (glibc's defaults: freed blocks go back to the
kernel) and then with the setting. Per side: wall seconds, user and kernel CPU seconds, minor page
faults, peak RSS. Writes bench/results/memory_touch.json and .md (`--out NAME`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from bench.stages import REPO, RESULTS, STAGES, run_stage

SIDES = (("off", {"DEDUP2B_KEEP_FREED": "0"}), ("kept", {}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True, help="a corpus folder (released-style layout)")
    ap.add_argument("--stages", default="index,search,group")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/dedup2b-bench-touch")
    ap.add_argument("--out", default="memory_touch")
    args = ap.parse_args(argv)
    work, corpus = Path(args.work), Path(args.corpus)
    shutil.rmtree(work, ignore_errors=True)
    run_dir = work / "run"
    wanted = [s for s in STAGES if s in args.stages.split(",")]
    times = {s: {side: [] for side, _ in SIDES} for s in wanted}
    try:
        for stage in STAGES:
            run_stage(stage, corpus, run_dir, REPO)
        for r in range(args.rounds):
            for stage in wanted:
                for side, env in SIDES:
                    shutil.rmtree(run_dir / stage / "_done", ignore_errors=True)
                    out = run_stage(stage, corpus, run_dir, REPO, env=env)
                    times[stage][side].append(out)
                    print(f"round {r} {stage:8s} {side:4s} {out}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = ["| stage | side | wall s (each round) | user s | kernel s | minor faults | peak RSS MB | wall ratio kept/off (least of each) |",
             "|---|---|---|---|---|---|---|---|"]
    for stage in wanted:
        least = {side: min(o["seconds"] for o in times[stage][side]) for side, _ in SIDES}
        for side, _ in SIDES:
            runs = times[stage][side]
            col = lambda key: ", ".join(str(o[key]) for o in runs)   # noqa: E731
            ratio = f"{least['kept'] / least['off']:.2f}" if side == "kept" else ""
            lines.append(f"| {stage} | {side} | {col('seconds')} | {col('user_s')} | {col('sys_s')} | "
                         f"{col('minor_faults')} | {max(o['peak_rss_mb'] for o in runs)} | {ratio} |")
    md = "\n".join(lines)
    cmd = "python -m bench.memory_touch " + " ".join(sys.argv[1:] if argv is None else argv)
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"command": cmd, "date": time.strftime("%Y-%m-%d"),
                                                          "cores": os.cpu_count(), "times": times}, indent=2))
    (RESULTS / f"{args.out}.md").write_text(f"Command: `{cmd}` ({os.cpu_count()} cores, "
                                            f"{time.strftime('%Y-%m-%d')})\n\n{md}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
