"""Stage benchmark: every stage's wall time and peak memory on a CLIP-like corpus given as
released-style embeddings, and chosen stages of another checkout side by side.

    python -m bench.stages --rows 1000000 --baseline REV     # REV: a git revision to compare with
    python -m bench.stages --baseline REV --baseline-stages search,group,report

The corpus (bench.corpora.write_clip_like, clip-retrieval layout, duplicate groups of up to
5,000 copies: tens of millions of verified pairs at 1 M rows) goes through `dedup2b run` one stage
at a time (`dedup2b ingest`, `embed`, ... in order, local executor), each stage a process of its
own under /usr/bin/time, so its peak RSS is its own. With --baseline, the same run folder is then
taken through --baseline-stages (default group, report) again by the code of REV (git archive into
a temporary folder, REV's defaults), same box, same run. Writes bench/results/stages.json and stages.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.corpora import write_clip_like
from bench.equal_outputs import cli_module
from dedup2b.stages import NAMES

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
STAGES = tuple(n for n in NAMES if n != "export")


def _anon_kb(pid: int) -> int:
    """Anonymous resident memory of a process (heap, not file pages such as memory-mapped vectors)."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    """The child processes of `pid`, from /proc (its threads' `children` files): no process is
    started to ask (a pgrep every 0.1 s took about 5 % of a core from the stage it measured)."""
    kids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
    except OSError:
        pass
    return kids


def run_stage(stage: str, corpus: Path, run_dir: Path, code: Path, extra: tuple = ()) -> dict:
    """One stage in its own process (the code under `code`): wall seconds, peak RSS in MB (file
    pages of memory-mapped vectors included, as /usr/bin/time counts them), peak anonymous RSS
    (polled every 0.1 s: the memory the stage itself holds), and its user and kernel CPU seconds
    and minor page faults."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", cli_module(code), stage, "--input", str(corpus),
           "--input-format", "embeddings", "--run-dir", str(run_dir), "--index-dir", str(run_dir / "index"),
           "--threshold", "0.95", "--executor", "local", "--set", "embed.batch_size=32", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim(code)), str(code)]), "OMP_WAIT_POLICY": "PASSIVE"}
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=out, stderr=err, text=True)
        anon = 0
        while proc.poll() is None:
            anon = max(anon, sum(_anon_kb(k) for k in _children(proc.pid)))
            time.sleep(0.1)
        secs = time.time() - t0
        out.seek(0); err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        raise RuntimeError(f"{stage} ({code}) failed:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1))
    cpu = {key: float(re.search(rf"{label} \(seconds\): ([\d.]+)", stderr).group(1))
           for key, label in (("user_s", "User time"), ("sys_s", "System time"))}
    faults = int(re.search(r"Minor \(reclaiming a frame\) page faults: (\d+)", stderr).group(1))
    return {"seconds": round(secs, 1), "peak_rss_mb": round(rss_kb / 1024, 1), "peak_anon_mb": round(anon / 1024, 1),
            **cpu, "minor_faults": faults}


def shim(code: Path) -> Path:
    """A folder that makes `import dedup2b` load the checkout under `code`: its pipeline/ under the
    package's name (the editable install of this checkout would otherwise answer for any code)."""
    folder = Path(code) / ".shim"
    if (Path(code) / "pipeline" / "stages").is_dir() and not (folder / "dedup2b").exists():
        folder.mkdir(exist_ok=True)
        (folder / "dedup2b").symlink_to(Path(code).resolve() / "pipeline")
    return folder


def fresh_corpus(work: Path, rows: int) -> tuple[Path, Path]:
    """(corpus, run folder) under an emptied `work`: the CLIP-like corpus of `rows` rows written."""
    shutil.rmtree(work, ignore_errors=True)
    corpus, run_dir = work / "corpus", work / "run"
    write_clip_like(corpus, rows, 768, dup_frac=0.3, seed=0, max_group=5000, rows_per_shard=125_000)
    return corpus, run_dir


def checkout(rev: str, into: Path) -> Path:
    """The tree of git revision `rev`, unpacked (never touching this checkout's index)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--baseline", default="", help="git revision whose stages (--baseline-stages) run beside ours")
    ap.add_argument("--baseline-stages", default="group,report", help="stages REV redoes on the same run folder")
    ap.add_argument("--work", default="/tmp/dedup2b-bench-stages")
    args = ap.parse_args(argv)
    work = Path(args.work)
    corpus, run_dir = fresh_corpus(work, args.rows)
    ours: dict[str, dict] = {}
    base: dict[str, dict] = {}
    try:
        for stage in STAGES:
            ours[stage] = run_stage(stage, corpus, run_dir, REPO)
            print(f"{stage:7s} ours {ours[stage]}", flush=True)
        summary = json.loads((run_dir / "report" / "summary.json").read_text())
        if args.baseline:   # the same run folder, these stages redone by REV's code
            code = checkout(args.baseline, Path(tempfile.mkdtemp()) / "code")
            for stage in [s for s in STAGES if s in args.baseline_stages.split(",")]:
                shutil.rmtree(run_dir / stage / "_done", ignore_errors=True)   # every unit runs again
                # --fresh: REV's defaults may differ from ours; the stages they affect are redone
                base[stage] = run_stage(stage, corpus, run_dir, code, ("--fresh",))
                print(f"{stage:7s} {args.baseline} {base[stage]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"| stage | wall s | peak RSS MB | {args.baseline or 'baseline'} wall s | peak RSS MB | RSS ratio |",
             "|---|---|---|---|---|---|"]
    for stage in STAGES:
        o, b = ours[stage], base.get(stage)
        extra = (f"{b['seconds']} | {b['peak_rss_mb']} | {o['peak_rss_mb'] / b['peak_rss_mb']:.2f}" if b
                 else " | | ")
        lines.append(f"| {stage} | {o['seconds']} | {o['peak_rss_mb']} | {extra} |")
    md = "\n".join(lines)
    facts = {k: summary[k] for k in ("input_rows", "groups", "verified_pairs", "candidate_pairs")}
    print(md, "\n", facts)
    cmd = "python -m bench.stages " + " ".join(sys.argv[1:] if argv is None else argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stages.json").write_text(json.dumps({"command": cmd, "date": time.strftime("%Y-%m-%d"),
                                                     "cores": os.cpu_count(), "corpus": facts,
                                                     "ours": ours, "baseline": base}, indent=2))
    (RESULTS / "stages.md").write_text(f"Command: `{cmd}` ({os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}); "
                                       f"corpus: {facts}\n\n{md}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
