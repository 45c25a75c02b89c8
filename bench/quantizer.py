"""Coarse quantizers for the IVF-PQ index: does a cheaper one still put a copy in a list its
original's search probes?

    python -m bench.quantizer --corpus /tmp/corpora/plain-corpus [--rows 500000] [--lists 12649]

On the first --rows rows of a released-style corpus (bench.scale --corpora writes one, with its
ground_truth.parquet): --lists spherical k-means centroids in the vectors' own 768 dims (the
index's lists; 12,649 is what choose_codec takes at 10 M rows), and up to 20,000 copy pairs
(same source, cosine >= 0.95). Per quantizer: microseconds a row to find a row's 8 lists (what a
search probes at search.nprobe 8; two threads), and the share of copy pairs whose second row's
list (what the add chose) is among the first row's 8: a copy the index can find. Quantizers: the
exact one (the product's: every centroid), an IVF over the centroids (sqrt(lists) groups, nprobe
of them scanned: sublinear in lists) and an HNSW graph over them. Writes bench/results/quantizer.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    import faiss
    import pyarrow.parquet as pq
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--lists", type=int, default=12_649)
    args = ap.parse_args(argv)
    corpus = Path(args.corpus)
    parts, n = [], 0
    for f in sorted((corpus / "img_emb").glob("*.npy")):
        parts.append(np.load(f)[: args.rows - n].astype(np.float32))
        n += len(parts[-1])
        if n >= args.rows:
            break
    x = np.concatenate(parts)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = pq.read_table(corpus / "ground_truth.parquet", columns=["source"])["source"].to_numpy()[: len(x)]
    by = defaultdict(list)
    for i, s in enumerate(src):
        by[s].append(i)
    pairs = np.array([(v[0], v[j]) for v in by.values() if len(v) > 1 for j in range(1, min(len(v), 3))])
    a, b = pairs[:, 0], pairs[:, 1]
    close = np.einsum("ij,ij->i", x[a], x[b]) >= 0.95
    a, b = a[close][:20_000], b[close][:20_000]
    km = faiss.Kmeans(x.shape[1], args.lists, niter=5, spherical=True, seed=1, max_points_per_centroid=16,
                      min_points_per_centroid=1)
    km.train(x)
    cents = km.centroids
    rows = []

    def measure(name: str, index) -> None:
        t0 = time.time()
        _, probed = index.search(x[a], 8)
        us = (time.time() - t0) / len(a) * 1e6
        _, added = index.search(x[b], 1)
        found = float(np.mean((probed == added).any(axis=1)))
        rows.append((name, round(us), round(found, 5)))
        print(rows[-1], flush=True)

    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(cents)
    measure("exact (every centroid)", flat)
    groups = int(round(np.sqrt(args.lists)))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], groups, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.min_points_per_centroid = 1
    ivf.train(cents)
    ivf.add(cents)
    for p in (4, 8, 16):
        ivf.nprobe = p
        measure(f"IVF over the centroids, {p} of {groups} groups", ivf)
    graph = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    graph.add(cents)
    for ef in (32, 128):
        graph.hnsw.efSearch = ef
        measure(f"HNSW32, efSearch {ef}", graph)
    cmd = "python -m bench.quantizer " + " ".join(sys.argv[1:] if argv is None else argv)
    md = "\n".join([f"Command: `{cmd}` ({os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; {len(x):,} rows, "
                    f"{args.lists:,} lists, {len(a):,} copy pairs)", "",
                    "| quantizer | us a row (8 lists) | copies in a list the original probes |", "|---|---|---|"]
                   + [f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows])
    print(md)
    (RESULTS / "quantizer.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
