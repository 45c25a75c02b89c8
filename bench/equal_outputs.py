"""Outputs of this checkout against another git revision's, same corpora, same box: the report
tables must be table-equal (a refactor that claims "behaviour unchanged" proves it here).

    python -m bench.equal_outputs --baseline REV [--rows 1000000]

Two corpora: the demo (real photos, `dedup2b demo`) and `--rows` released-style 768-d embeddings
(groups of up to 5,000 copies). Each goes through the whole pipeline once with REV's code (git
archive into a temporary folder) and once with this checkout's, local executor. Compared:
samples, pairs, groups and histogram parquet (wherever each layout keeps them), exactly: same
schema, same rows, same order. Writes bench/results/equal_outputs.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
TABLES = ("samples", "pairs", "groups", "histogram")


def cli_module(code: Path) -> str:
    """The CLI module of a checkout: `dedup2b.cli` once the package is installed under that name."""
    return "dedup2b.cli" if (code / "pipeline" / "stages").is_dir() else "pipeline" + ".cli"


def corpus_module(code: Path) -> str:
    """Where a checkout keeps the seeded corpus generators (inside the package before dedup2b)."""
    return "bench.corpora" if (code / "bench" / "corpora.py").exists() else "pipeline" + ".synthetic"


def sh(code: Path, args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_WAIT_POLICY": "PASSIVE"}
    t0 = time.time()
    done = subprocess.run([sys.executable, *args], cwd=code, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{args} ({code}) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return round(time.time() - t0, 1)


def run_side(code: Path, out: Path, corpus: Path) -> dict:
    mod = cli_module(code)
    common = ["--executor", "local"]
    demo = sh(code, ["-m", mod, "demo", "--out", str(out / "demo"), "--index-dir", str(out / "demo-index"),
                     "--no-calibrate", *common])
    big = sh(code, ["-m", mod, "run", "--input", str(corpus), "--input-format", "embeddings",
                    "--run-dir", str(out / "big"), "--index-dir", str(out / "big-index"), "--threshold", "0.95",
                    "--set", "export.formats=[\"keep\"]", *common])
    return {"demo_s": demo, "big_s": big}


def table(run_dir: Path, name: str):
    found = sorted(run_dir.glob(f"*/{name}.parquet"))
    if len(found) != 1:
        raise FileNotFoundError(f"{run_dir}: expected one {name}.parquet, found {found}")
    return pq.read_table(found[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, help="git revision to compare with")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--work", default="/tmp/dedup2b-equal-outputs")
    ap.add_argument("--keep-baseline", action="store_true",
                    help="reuse the baseline's outputs already under --work (same revision and rows)")
    ap.add_argument("--only-baseline", action="store_true", help="build the baseline's outputs and stop")
    args = ap.parse_args(argv)
    work = Path(args.work)
    base_out, ours_out, corpus = work / "baseline", work / "ours", work / "corpus"
    if not args.keep_baseline:
        shutil.rmtree(work, ignore_errors=True)
        code = work / "code"
        code.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", args.baseline], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
        # the corpus is written by the baseline's own generator: both sides read the same files
        sh(code, ["-c", f"from {corpus_module(code)} import write_clip_like as w; "
                  f"w({str(corpus)!r}, {args.rows}, 768, dup_frac=0.3, seed=0, max_group=5000, rows_per_shard=125_000)"])
        base_t = run_side(code, base_out, corpus)
        (work / "baseline.json").write_text(json.dumps(base_t))
    base_t = json.loads((work / "baseline.json").read_text())
    if args.only_baseline:
        return 0
    shutil.rmtree(ours_out, ignore_errors=True)
    ours_t = run_side(REPO, ours_out, corpus)
    lines = [f"| corpus | table | rows | {args.baseline} == ours |", "|---|---|---|---|"]
    ok = True
    for corpus_name in ("demo", "big"):
        for name in TABLES:
            a, b = table(base_out / corpus_name, name), table(ours_out / corpus_name, name)
            same = a.equals(b)
            ok &= same
            lines.append(f"| {corpus_name} | {name} | {a.num_rows:,} | {'equal' if same else 'DIFFERENT'} |")
    cmd = "python -m bench.equal_outputs " + " ".join(sys.argv[1:] if argv is None else argv)
    md = "\n".join(lines)
    head = (f"Command: `{cmd}` ({os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}); demo and {args.rows:,} "
            f"released-style rows, local executor; wall s baseline {base_t}, ours {ours_t}\n\n")
    print(head + md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "equal_outputs.md").write_text(head + md + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
