"""Cell assignment at scale: do copies still share a cell when rows are assigned to cells in
fewer products than rows x cells?

    python -m bench.assign --corpus /tmp/corpora/plain10000000-corpus --cells 10000

The search's assignment (celljoin.assign) is exhaustive below search.cell_rows x 8,192 rows and
wherever the index stage finds that two levels would not prune: each row scored against every
cell, rows x cells x dims products, the one step of the search whose cost per row grows with rows
(10 M rows, 10,000 cells: about half the search). This benchmark measures what a sublinear
assignment would lose, on a released-style corpus (bench.corpora.write_clip_like; its
ground_truth.parquet names each row's source): copy pairs (two rows of one source, cosine at
or above 0.92, the search's floor) and whether they share a cell, under
  flat        exhaustive scores (what the search does), the best cell + those within border; cells
              in all 128 dims of the projection, or in its first 64 (search.cell_dim, the default)
  two-level   celljoin.TwoLevel: the nprobe best coarse cells, the best fine cells inside them
  nested      the coarse cells within `delta` of the best coarse score, the best fine cell of
              each (and those within border of it), up to 6 cells: consistent across coarse
              borders, at more cells a row (more join work)
Cells are trained as the index stage trains them (celljoin.train_cells on a projected sample).
One thread; microseconds per row. Writes bench/results/assign.md and assign.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

RESULTS = Path(__file__).parent / "results"


def read_rows(corpus: Path, gids: np.ndarray) -> np.ndarray:
    """Unit float32 vectors of gids (shard << 32 | row) from the corpus's img_emb shards, in order."""
    out = np.empty((len(gids), 0), np.float32)
    shard = gids >> 32
    for s in np.unique(shard):
        m = np.load(corpus / "img_emb" / f"img_emb_{int(s):05d}.npy", mmap_mode="r")
        if out.shape[1] == 0:
            out = np.empty((len(gids), m.shape[1]), np.float32)
        sel = np.flatnonzero(shard == s)
        rows = gids[sel] & 0xFFFFFFFF
        order = np.argsort(rows)
        out[sel[order]] = m[rows[order]]
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def copy_pairs(corpus: Path, n: int, floor: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to n pairs (a row, the first row of its source) with cosine >= floor: vectors of both."""
    t = pq.read_table(corpus / "ground_truth.parquet").to_pandas()
    t = t[t.groupby("source").gid.transform("size") >= 2]
    first = t.groupby("source").gid.first()
    pick = t.sample(min(n, len(t)), random_state=seed)
    a, b = pick.gid.to_numpy(), first.loc[pick.source].to_numpy()
    a, b = a[a != b], b[a != b]
    xa, xb = read_rows(corpus, a), read_rows(corpus, b)
    keep = np.einsum("ij,ij->i", xa, xb) >= floor
    return xa[keep], xb[keep]


def nested(z: np.ndarray, two, delta: float, border: float, max_cells: int) -> np.ndarray:
    """(n, max_cells) cells: the best fine cell of every coarse cell within delta of the best
    coarse score, with the fine cells within border of it; the best max_cells of those, -1 padded."""
    q = np.ascontiguousarray(z / np.linalg.norm(z, axis=1, keepdims=True), dtype=np.float32)
    coarse = q @ two.coarse.T
    probe = coarse >= coarse.max(axis=1, keepdims=True) - delta
    best_s = np.full((len(q), max_cells), -np.inf, np.float32)
    best_c = np.full((len(q), max_cells), -1, np.int64)
    for c in range(len(two.coarse)):
        who = np.flatnonzero(probe[:, c])
        cells = two.order[two.bounds[c]:two.bounds[c + 1]]
        if not len(who) or not len(cells):
            continue
        s = q[who] @ two.fine[cells].T
        s = np.where(s >= s.max(axis=1, keepdims=True) - border, s, -np.inf)
        all_s = np.concatenate([best_s[who], s], axis=1)
        all_c = np.concatenate([best_c[who], np.broadcast_to(cells, s.shape)], axis=1)
        pick = np.argpartition(-all_s, max_cells - 1, axis=1)[:, :max_cells]
        best_s[who] = np.take_along_axis(all_s, pick, axis=1)
        best_c[who] = np.take_along_axis(all_c, pick, axis=1)
    return np.where(np.isfinite(best_s), best_c, -1)


def main(argv=None) -> int:
    import faiss
    from threadpoolctl import threadpool_limits

    from dedup2b.lib import celljoin
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True, help="a bench.corpora.write_clip_like folder (e.g. bench.scale --corpora)")
    ap.add_argument("--cells", type=int, default=10_000, help="cells (10 M rows at search.cell_rows 1,000)")
    ap.add_argument("--sample", type=int, default=200_000, help="rows the cells are trained on")
    ap.add_argument("--pairs", type=int, default=40_000, help="copy pairs drawn from the ground truth")
    ap.add_argument("--border", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="assign")
    args = ap.parse_args(argv)
    corpus = Path(args.corpus)
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    n_rows = pq.ParquetFile(corpus / "ground_truth.parquet").metadata.num_rows
    per_shard = len(np.load(corpus / "img_emb" / "img_emb_00000.npy", mmap_mode="r"))
    take = np.sort(rng.choice(n_rows, min(args.sample, n_rows), replace=False))
    sample = read_rows(corpus, (take // per_shard) << 32 | (take % per_shard))
    proj = celljoin.train_projection(sample[::max(1, len(sample) // 20_000)], 128)
    zs, _ = celljoin.project(sample, proj)
    fine, coarse = celljoin.train_cells(zs, args.cells, 1234)
    if coarse is None:
        sys.exit(f"--cells {args.cells}: at most {celljoin.FLAT_CELLS} cells are trained in one level; ask for more")
    xa, xb = copy_pairs(corpus, args.pairs, 0.92, args.seed)
    za, zb = celljoin.project(xa, proj)[0], celljoin.project(xb, proj)[0]
    big = np.iinfo(np.int64).max
    rows = []

    def measure(name: str, assign) -> None:
        t0 = time.perf_counter()
        ca, cb = assign(za), assign(zb)
        us = 1e6 * (time.perf_counter() - t0) / (2 * len(za))
        shared = float(np.mean(celljoin.first_shared_cell(ca, cb) < big))
        rows.append({"assignment": name, "copy_pairs_sharing_a_cell": round(shared, 5),
                     "cells_per_row": round(float((ca >= 0).sum(1).mean()), 2), "us_per_row": round(us, 1)})
        print(rows[-1], flush=True)

    with threadpool_limits(1):
        flat, _ = celljoin.cell_index(fine)
        measure("flat, cells in all 128 dims (search.cell_dim 0)", lambda z: celljoin.assign(z, flat, args.border, 3))
        # the search's default: cells trained and assigned in the projection's first 64 dims
        zn = zs[:, :64] / np.linalg.norm(zs[:, :64], axis=1, keepdims=True)
        flat64, _ = celljoin.cell_index(celljoin._kmeans(zn, len(fine), 1234, 5))
        measure("flat, cells in the first 64 dims (search.cell_dim 64: the search)",
                lambda z: celljoin.assign(z, flat64, args.border, 3))
        two = celljoin.TwoLevel(fine, coarse)
        for p in (2, 4, 8, 16, 32):
            two.nprobe = p
            measure(f"two-level, nprobe {p} of {len(coarse)}", lambda z: celljoin.assign(z, two, args.border, 3))
        for d in (0.01, 0.02):
            measure(f"nested, coarse within {d}, up to 6 cells", lambda z: nested(z, two, d, args.border, 6))
    res = {"command": "python -m bench.assign " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d"), "corpus_rows": n_rows, "cells": len(fine), "coarse": len(coarse),
           "copy_pairs": len(za), "rows": rows}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"Command: `{res['command']}` ({res['date']}, one thread); {n_rows:,}-row corpus, {len(fine):,} cells "
             f"({len(coarse)} coarse), trained on {len(sample):,} rows; {len(za):,} copy pairs (cosine >= 0.92)", "",
             "| assignment | copy pairs sharing a cell | cells per row | us per row |", "|---|---|---|---|"]
    lines += [f"| {r['assignment']} | {r['copy_pairs_sharing_a_cell']:.5f} | {r['cells_per_row']} | {r['us_per_row']} |"
              for r in rows]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
