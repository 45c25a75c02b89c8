"""Scattered row reads from memory-mapped vector files, cold, with and without asking for the
pages first (core/vectors.prefetch: what the search join's candidate reads and every other
gather of given rows go through).

    python -m bench.cold_reads --corpus /tmp/corpora/plain10000000-corpus [--rows 640] [--rounds 2]

Per file of the corpus's img_emb/ (bench.scale --corpora writes one): --rows rows drawn at random
(the density of a join block's candidates at 10 M rows: about 0.5 % of a 125,000-row file), read
in ascending order with np.take from the file's memmap, as VectorStore._gather reads them. The
page cache is dropped before each pass (needs root: `sync; echo 1 > /proc/sys/vm/drop_caches`;
without it the passes are warm and say so). Passes alternate between the two ways. Writes
bench/results/cold_reads.md.
"""
from __future__ import annotations

import argparse
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def one_pass(files: list[Path], rows: int, seed: int, ask: bool) -> float:
    from dedup2b.core.vectors import prefetch
    rng = np.random.default_rng(seed)
    t0 = time.time()
    for f in files:
        m = np.load(f, mmap_mode="r")
        pos = np.sort(rng.choice(len(m), min(rows, len(m)), replace=False))
        if ask:
            prefetch(m, pos)
        np.take(m, pos, axis=0).astype(np.float32)
        m._mmap.madvise(mmap.MADV_DONTNEED)
    return time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--rows", type=int, default=640, help="rows read from each file")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    files = sorted((Path(args.corpus) / "img_emb").glob("*.npy"))
    res: dict[str, list] = {"faulted in": [], "asked for first": []}
    cold = True
    for r in range(args.rounds):
        for name, ask in (("faulted in", False), ("asked for first", True)):
            cold &= drop_caches()
            secs = one_pass(files, args.rows, 1000 * r + ask, ask)
            res[name].append(round(len(files) * args.rows / secs))
            print(name, res[name][-1], "rows/s", flush=True)
    cmd = "python -m bench.cold_reads " + " ".join(sys.argv[1:] if argv is None else argv)
    md = "\n".join([f"Command: `{cmd}` ({os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; {len(files)} files, "
                    f"{args.rows} rows each; page cache {'dropped before each pass' if cold else 'NOT dropped (warm)'})",
                    "", "| read | rows/s, each pass |", "|---|---|"]
                   + [f"| {k} | {', '.join(f'{v:,}' for v in vs)} |" for k, vs in res.items()])
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cold_reads.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
