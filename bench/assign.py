"""Cell assignment at scale: do copies still share a cell when rows are assigned to cells in
fewer products than rows x cells, and what does the join pay for it?

    python -m bench.assign --corpus /tmp/corpora/plain10000000-corpus --rows 10000000

The flat assignment scores each row against every cell: rows x cells x dims products, the one
step of the search whose cost per row grows with rows (cells of search.cell_rows rows). This
benchmark measures the alternatives on a released-style corpus (bench.corpora.write_clip_like;
its ground_truth.parquet names each row's source): copy pairs (two rows of one source, cosine at
or above 0.92, the search's floor), whether they share a cell, the cells a row sits in, the
microseconds a row costs, and the join's work that follows: the products of memberships that
share a cell, per row of an `--rows`-row corpus (estimated from 100,000 sampled rows).
  flat          every cell scored, the best + those within border; cells in all 128 dims of the
                projection, in its first 64 (search.cell_dim), or its first 32; rows / 1,000 cells
  prefiltered   the flat cells scored in the first `dims` dims only, the best `short` re-scored in 64
  two-level     celljoin.TwoLevel: the nprobe best coarse cells, the best fine cells inside them
  nested        celljoin.Nested (search.assign = nested, the default): the coarse cells within
                delta of the best coarse score, in each the best fine cell and those within border
                of it, up to 6 cells; rows / 250 cells (search.cell_rows)
Cells are trained as the index stage trains them (celljoin.train_cells on a projected sample).
One thread. Writes bench/results/assign.md and assign.json.
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


class Prefiltered:
    """Flat cells at a fraction of the product: every cell scored in the first `dims` dims, the
    best `short` of those re-scored in all of them (measured, not taken: see the results)."""

    def __init__(self, centroids: np.ndarray, dims: int, short: int):
        import faiss
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.ntotal, self.d = self.centroids.shape
        self.dims, self.short = min(dims, self.d), min(short, self.ntotal)
        self.head = faiss.IndexFlatIP(self.dims)
        self.head.add(np.ascontiguousarray(self.centroids[:, :self.dims]))

    def search(self, q: np.ndarray, k: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        q = np.asarray(q, dtype=np.float32)
        k = min(k, self.short)
        scores, cells = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
        for a in range(0, len(q), chunk):
            qa = q[a:a + chunk]
            _, cand = self.head.search(np.ascontiguousarray(qa[:, :self.dims]), self.short)
            s = np.matmul(self.centroids[np.maximum(cand, 0)], qa[:, :, None])[:, :, 0]
            s[cand < 0] = -np.inf
            pick = np.argsort(-s, axis=1, kind="stable")[:, :k]
            scores[a:a + chunk] = np.take_along_axis(s, pick, axis=1)
            cells[a:a + chunk] = np.take_along_axis(cand, pick, axis=1)
        return scores, cells


def main(argv=None) -> int:
    import faiss
    from threadpoolctl import threadpool_limits

    from dedup2b.lib import celljoin
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True, help="a bench.corpora.write_clip_like folder (e.g. bench.scale --corpora)")
    ap.add_argument("--rows", type=int, default=10_000_000, help="the corpus size the cells are made for: "
                    "rows / 1,000 flat cells, rows / 250 nested (the search's defaults)")
    ap.add_argument("--sample", type=int, default=200_000, help="rows the cells are trained on")
    ap.add_argument("--pairs", type=int, default=40_000, help="copy pairs drawn from the ground truth")
    ap.add_argument("--border", type=float, default=0.01, help="flat and two-level (search.assign = flat's border)")
    ap.add_argument("--nested-border", type=float, default=0.007, help="nested (search.border's default)")
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
    xa, xb = copy_pairs(corpus, args.pairs, 0.92, args.seed)
    za, zb = celljoin.project(xa, proj)[0], celljoin.project(xb, proj)[0]
    big = np.iinfo(np.int64).max
    rows, ref = [], {}
    n_flat, n_nested = max(1, args.rows // 1000), max(1, args.rows // 250)

    def measure(name: str, assign, n_cells: int, same_as: str | None = None) -> None:
        t0 = time.perf_counter()
        ca, cb = assign(za), assign(zb)
        us = 1e6 * (time.perf_counter() - t0) / (2 * len(za))
        shared = float(np.mean(celljoin.first_shared_cell(ca, cb) < big))
        ref.setdefault(name, ca)
        agree = None if same_as is None else float(np.mean(np.all(np.sort(ca, 1) == np.sort(ref[same_as], 1), axis=1)))
        cs = assign(zs[:100_000])       # the join's work: memberships per cell, scaled to --rows rows
        per_cell = np.bincount(cs[cs >= 0].ravel(), minlength=n_cells) * (args.rows / min(100_000, len(zs)))
        rows.append({"assignment": name, "copy_pairs_sharing_a_cell": round(shared, 5),
                     "cells_per_row": round(float((ca >= 0).sum(1).mean()), 2), "us_per_row": round(us, 1),
                     "join_products_per_row": round(float((per_cell ** 2).sum() / 2 / args.rows)),
                     "same_cells_as_flat": None if agree is None else round(agree, 5)})
        print(rows[-1], flush=True)

    def cells_in(dims: int, n: int):
        zd = zs[:, :dims] / np.linalg.norm(zs[:, :dims], axis=1, keepdims=True)
        return celljoin._kmeans(zd, n, 1234, 5)

    with threadpool_limits(1):
        flat128, _ = celljoin.cell_index(cells_in(128, n_flat))
        measure("flat, cells in all 128 dims (search.cell_dim 0)",
                lambda z: celljoin.assign(z, flat128, args.border, 3), n_flat)
        c64 = cells_in(64, n_flat)
        flat64, _ = celljoin.cell_index(c64)
        base = "flat, cells in the first 64 dims (search.assign = flat, search.cell_dim 64)"
        measure(base, lambda z: celljoin.assign(z, flat64, args.border, 3), n_flat, same_as=base)
        flat32, _ = celljoin.cell_index(cells_in(32, n_flat))
        measure("flat, cells in the first 32 dims", lambda z: celljoin.assign(z, flat32, args.border, 3), n_flat)
        for dims, short in ((32, 8), (32, 16)):
            pre = Prefiltered(c64, dims, short)
            measure(f"prefiltered: the flat 64-dim cells scored in their first {dims} dims, the best {short} in all 64",
                    lambda z: celljoin.assign(z, pre, args.border, 3), n_flat, same_as=base)
        fine, coarse = celljoin.train_cells(zs[:, :64], n_flat, 1234, two_levels=True)
        two = celljoin.TwoLevel(fine, coarse)
        for p in (4, 16):
            two.nprobe = p
            measure(f"two-level, nprobe {p} of {len(coarse)}", lambda z: celljoin.assign(z, two, args.border, 3), len(fine))
        fine, coarse = celljoin.train_cells(zs[:, :64], n_nested, 1234, two_levels=True)
        for delta in (0.005, 0.0075, 0.01):
            nest = celljoin.Nested(fine, coarse, delta)
            measure(f"nested, {len(fine):,} cells ({len(nest.coarse)} coarse), coarse within {delta}, fine within "
                    f"{args.nested_border}, up to 6 cells" + (" (the search's default)" if delta == 0.0075 else ""),
                    lambda z: celljoin.assign(z, nest, args.nested_border, 6), len(fine))
    res = {"command": "python -m bench.assign " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d"), "corpus_rows": n_rows, "rows": args.rows,
           "copy_pairs": len(za), "results": rows}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"Command: `{res['command']}` ({res['date']}, one thread); {n_rows:,}-row corpus, cells for "
             f"{args.rows:,} rows, trained on {len(sample):,} rows; {len(za):,} copy pairs (cosine >= 0.92). "
             "Join products per row: pairs of memberships sharing a cell, per row of that many rows (the "
             "join's bound work).", "",
             "| assignment | copy pairs sharing a cell | cells per row | us per row | join products per row | "
             "rows given the flat 64-dim cells |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['assignment']} | {r['copy_pairs_sharing_a_cell']:.5f} | {r['cells_per_row']} | {r['us_per_row']} | "
              f"{r['join_products_per_row']:,} | {'' if r['same_cells_as_flat'] is None else r['same_cells_as_flat']} |"
              for r in rows]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
