"""Dense-cell join benchmark: celljoin.join_cell_dense on cells made of one giant copy group's rows
(a placeholder crawled many times: the cells the search joins as components), this checkout and
optionally a git revision side by side, same box, same run.

    python -m bench.dense [--rev REV] [--sizes 300,800,2000,8000] [--out dense]

The corpus: bench.corpora.write_clip_like, 60,000 rows with one group of 20,000 copies (cosine
0.95-0.999 to their source, pairs between copies down to ~0.9: not a clique). A cell of n rows is
n of those copies (seeded), projected with a projection trained on the corpus (r = 128) and
stored as the search stores it (fp16, pack_zr). Per size: the forest edges, the products
computed or bounded (the join's work: a count, the same on any box), and the least of
--rounds process-CPU seconds. Writes bench/results/NAME.json and NAME.md.
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

import numpy as np

from bench.corpora import write_clip_like
from bench.stages import REPO, RESULTS, checkout, shim

CORPUS = Path(tempfile.gettempdir()) / "dedup2b-bench-dense"


def corpus() -> Path:
    if not (CORPUS / "ground_truth.parquet").exists():
        write_clip_like(CORPUS, 60_000, 768, dup_frac=0.3, seed=0, max_group=500, rows_per_shard=60_000,
                        giant=(20_000,))
    return CORPUS


def measure(sizes: list[int], rounds: int) -> dict:
    """join_cell_dense of the code `import dedup2b` finds, per cell size."""
    import pyarrow.parquet as pq
    from dedup2b.lib import celljoin
    root = corpus()
    truth = pq.read_table(root / "ground_truth.parquet").to_pandas()
    x_all = np.concatenate([np.load(f).astype(np.float32) for f in sorted((root / "img_emb").glob("*.npy"))])
    x_all /= np.linalg.norm(x_all, axis=1, keepdims=True)
    gid = truth["gid"].to_numpy()
    row = (gid >> 32) * 60_000 + (gid & 0xFFFFFFFF)
    top = truth["source"].value_counts().index[0]
    copies = np.sort(row[truth["source"].to_numpy() == top])
    proj = celljoin.train_projection(x_all[::3], 128)
    out = {}
    for n in sizes:
        pick = np.sort(np.random.default_rng(n).choice(copies, min(n, len(copies)), replace=False))
        x = np.ascontiguousarray(x_all[pick])
        zr = celljoin.unpack_zr(celljoin.pack_zr(celljoin.project_zr(x, proj)))
        secs = []
        for _ in range(rounds):
            t0 = time.process_time()
            i, j, sim, work = celljoin.join_cell_dense(x, zr, 0.95, seed=1)
            secs.append(time.process_time() - t0)
        out[n] = {"edges": int(len(i)), "products": int(work), "products_per_row": round(work / len(x), 1),
                  "cpu_ms": round(1000 * min(secs), 1)}
        print(n, out[n], flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", default=None, help="a git revision to measure side by side")
    ap.add_argument("--sizes", default="300,800,2000,8000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="dense")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)   # the child process's part
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.measure:
        print("JSON " + json.dumps(measure(sizes, args.rounds)))
        return 0
    sides = {"ours": REPO}
    if args.rev:
        sides = {args.rev: checkout(args.rev, Path(tempfile.mkdtemp()) / "code"), **sides}
    corpus()
    res = {}
    for name, code in sides.items():
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim(code)), str(REPO)]), "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "bench.dense", "--measure", "--sizes", args.sizes,
                               "--rounds", str(args.rounds)], cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        res[name] = {int(k): v for k, v in json.loads(proc.stdout.split("JSON ", 1)[1]).items()}
    names = list(res)
    lines = ["| cell rows | " + " | ".join(f"{s}: products a row, CPU ms, edges" for s in names) + " |",
             "|---|" + "---|" * len(names)]
    for n in sizes:
        lines.append(f"| {n:,} | " + " | ".join(f"{res[s][n]['products_per_row']}, {res[s][n]['cpu_ms']}, "
                                                f"{res[s][n]['edges']}" for s in names) + " |")
    md = "\n".join(lines)
    cmd = "python -m bench.dense " + " ".join(sys.argv[1:] if argv is None else argv)
    print(md)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"command": cmd, "date": time.strftime("%Y-%m-%d"),
                                                         "results": res}, indent=2))
    (RESULTS / f"{args.out}.md").write_text(f"Command: `{cmd}` ({os.cpu_count()} cores, one thread, "
                                            f"{time.strftime('%Y-%m-%d')})\n\n{md}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
