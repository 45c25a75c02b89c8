"""Search benchmark: dedup2b's cell-join search vs exhaustive FAISS and a SemDeDup-style baseline.

    make bench-search                      # sizes 250k and 1M (about 15 min on 2 cores)
    python -m bench.search --sizes 250000  # any sizes

Per size, on CLIP-like synthetic 768-d vectors (pipeline/synthetic.py) written in clip-retrieval
layout, same box, same run:
  ours       index stage (IVF-PQ + cell-join codec) + search stage on a local Ray (2 tasks)
  exhaustive FAISS IndexFlatIP range search at the threshold for a random sample of queries,
             extrapolated to all rows (its cost is linear in queries)
  semdedup   spherical k-means (same cell count, trained on the same sample size) + exact GEMM
             inside each cluster, no border handling
Recall and precision are measured on the sampled queries against the exhaustive result: a pair
counts from the query's side. Union-find is timed on random edges at 10 M and 100 M.
Writes bench/results/search.json and bench/results/search.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline import index
from pipeline.config import CodecConfig, RayConfig, SearchConfig
from pipeline.executor import RayExecutor
from pipeline.search import SearchJob, pair_files, search
from pipeline.synthetic import clip_like, write_corpus
from pipeline.unionfind import UnionFind
from pipeline.vectors import VectorStore

RESULTS = Path(__file__).parent / "results"
THRESHOLD = 0.95


def neighbours(pairs_a, pairs_b, queries: np.ndarray) -> dict[int, set[int]]:
    """For each sampled query gid, the set of gids it is paired with."""
    qs = set(queries.tolist())
    out: dict[int, set[int]] = {q: set() for q in qs}
    for a, b in ((pairs_a, pairs_b), (pairs_b, pairs_a)):
        sel = np.isin(a, queries)
        for x, y in zip(a[sel].tolist(), b[sel].tolist()):
            out[x].add(y)
    return out


def score(found: dict[int, set[int]], truth: dict[int, set[int]]) -> dict:
    tp = sum(len(found[q] & truth[q]) for q in truth)
    n_true = sum(len(v) for v in truth.values())
    n_found = sum(len(v) for v in found.values())
    return {"recall": tp / n_true if n_true else 1.0, "precision": tp / n_found if n_found else 1.0,
            "true_pairs_sampled": n_true}


def exhaustive(x: np.ndarray, gids: np.ndarray, qidx: np.ndarray) -> tuple[dict, float]:
    import faiss
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    t0 = time.time()
    lims, _, ids = flat.range_search(np.ascontiguousarray(x[qidx]), THRESHOLD - 1e-6)
    secs = time.time() - t0
    truth = {}
    for k, q in enumerate(qidx):
        nb = ids[lims[k]:lims[k + 1]]
        truth[int(gids[q])] = set(gids[nb[nb != q]].tolist())
    return truth, secs * len(x) / len(qidx)


def semdedup(x: np.ndarray, gids: np.ndarray, n_cells: int, train_size: int, seed: int = 1):
    import faiss
    t0 = time.time()
    rng = np.random.default_rng(seed)
    xt = x[rng.choice(len(x), min(train_size, len(x)), replace=False)]
    km = faiss.Kmeans(x.shape[1], n_cells, niter=20, spherical=True, seed=seed, verbose=False)
    km.train(xt)
    _, cell = km.index.search(x, 1)
    cell = cell[:, 0]
    order = np.argsort(cell, kind="stable")
    starts = np.r_[0, np.nonzero(np.diff(cell[order]))[0] + 1, len(order)]
    a, b = [], []
    for lo, hi in zip(starts[:-1], starts[1:]):
        m = order[lo:hi]
        s = x[m] @ x[m].T
        i, j = np.nonzero(np.triu(s >= THRESHOLD, 1))
        a.append(gids[m[i]]); b.append(gids[m[j]])
    return np.concatenate(a), np.concatenate(b), time.time() - t0


def bench_size(n: int, work: Path, ex, n_queries: int, seed: int = 0) -> dict:
    print(f"== {n:,} rows", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.time()
    x, src = clip_like(n, 768, dup_frac=0.3, seed=seed, max_group=5000)
    names = write_corpus(work / "embed", x, src, rows_per_shard=125_000)
    del x, src
    shards = {i: name for i, name in enumerate(names)}
    store = VectorStore(work / "embed", shards)
    gids = np.concatenate([store.shard(i)[0] for i in shards])
    xs = store.get(gids)                                  # the fp16-rounded vectors every method sees
    print(f"   data {time.time() - t0:.0f}s", flush=True)

    t0 = time.time()
    counts = {i: len(store.shard(i)[0]) for i in shards}
    codec = index.build_all(store, counts, CodecConfig(train_size=100_000), work / "index", "bench", "synthetic")
    index_s = codec["cells_train_s"]          # what the search needs: projection + cells
    print(f"   index {time.time() - t0:.0f}s (IVF-PQ train {codec['train_s']}s, add {codec['add_s']}s; "
          f"cell codec {index_s}s) {codec['factory']} cells={codec['cells']}", flush=True)
    job = SearchJob(work / "embed", shards, work / "index", work / "search",
                    SearchConfig(threshold=THRESHOLD, band=0.0, cells_per_task=max(8, codec["cells"] // 16)),
                    "bench", "bench-search")
    t0 = time.time()
    stats = search(job, ex)
    search_s = time.time() - t0
    print(f"   ours search {search_s:.0f}s pairs={stats['verified']:,}", flush=True)
    pa_, pb_ = [], []
    for p in pair_files(job.out_dir):
        t = pq.read_table(p, columns=["gid_a", "gid_b"])
        pa_.append(t["gid_a"].to_numpy()); pb_.append(t["gid_b"].to_numpy())
    ours_a, ours_b = np.concatenate(pa_), np.concatenate(pb_)

    rng = np.random.default_rng(seed + 1)
    qidx = np.sort(rng.choice(n, min(n_queries, n), replace=False))
    truth, exh_s = exhaustive(xs, gids, qidx)
    print(f"   exhaustive (extrapolated from {len(qidx):,} queries) {exh_s:.0f}s", flush=True)
    sem_a, sem_b, sem_s = semdedup(xs, gids, codec["cells"], 100_000)
    print(f"   semdedup {sem_s:.0f}s", flush=True)
    queries = gids[qidx]
    ours = score(neighbours(ours_a, ours_b, queries), truth)
    sem = score(neighbours(sem_a, sem_b, queries), truth)
    return {
        "rows": n, "threshold": THRESHOLD, "codec": codec["factory"], "cells": codec["cells"],
        "bytes_per_vector": codec["bytes_per_vector"], "index_s": round(index_s, 1),
        "ivfpq_train_s": codec["train_s"], "ivfpq_add_s": codec["add_s"],
        "search_s": round(search_s, 1), "ours_total_s": round(index_s + search_s, 1),
        "exhaustive_s": round(exh_s, 1), "semdedup_s": round(sem_s, 1),
        "ratio_search_vs_exhaustive": round(search_s / exh_s, 4),
        "ratio_total_vs_exhaustive": round((index_s + search_s) / exh_s, 4),
        "ratio_total_vs_semdedup": round((index_s + search_s) / sem_s, 3),
        "ours": ours, "semdedup": sem, "pairs_found": int(len(ours_a)), "candidates": stats["candidates"],
        "worker_peak_rss_mb": stats["worker_peak_rss_mb"], "queries_sampled": int(len(qidx)),
    }


def bench_unionfind(n_edges: int, n_nodes: int = 10_000_000, chunk: int = 10_000_000) -> dict:
    rng = np.random.default_rng(0)
    uf = UnionFind(n_nodes)
    secs = 0.0
    for s in range(0, n_edges, chunk):
        m = min(chunk, n_edges - s)
        a = rng.integers(0, n_nodes, m)
        b = rng.integers(0, n_nodes, m)
        t0 = time.time()
        uf.union(a, b)
        secs += time.time() - t0
    labels = uf.labels()
    return {"edges": n_edges, "nodes": n_nodes, "seconds": round(secs, 1),
            "components": int(len(np.unique(labels)))}


def table(results: list[dict], uf: list[dict]) -> str:
    lines = ["| rows | codec | B/vector (target <= 16) | ours cell-codec train + search s | exhaustive s (extrap.) | ratio (target <= 1/100) | SemDeDup-style s | ratio to it (target <= 0.33) | recall (ours / SemDeDup; target >= 0.98) | precision (target >= 0.98) | worker peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['rows']:,} | {r['codec']} | {r['bytes_per_vector']} | {r['index_s']} + {r['search_s']} | "
                     f"{r['exhaustive_s']:,} | 1/{1 / r['ratio_total_vs_exhaustive']:.0f} | {r['semdedup_s']} | "
                     f"{r['ratio_total_vs_semdedup']} | {r['ours']['recall']:.4f} / {r['semdedup']['recall']:.4f} | "
                     f"{r['ours']['precision']:.4f} | {r['worker_peak_rss_mb']} |")
    lines += ["", "| union-find edges | nodes | seconds (target: 100 M in <= 120) | components |", "|---|---|---|---|"]
    lines += [f"| {u['edges']:,} | {u['nodes']:,} | {u['seconds']} | {u['components']:,} |" for u in uf]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="250000,1000000")
    ap.add_argument("--queries", type=int, default=4000)
    ap.add_argument("--unionfind", default="10000000,100000000")
    ap.add_argument("--work", default="/tmp/dedup2b-bench")
    args = ap.parse_args(argv)
    ex = RayExecutor(RayConfig(num_cpus=os.cpu_count(), object_store_mb=1024))
    results = []
    try:
        for n in [int(s) for s in args.sizes.split(",") if s]:
            results.append(bench_size(n, Path(args.work) / str(n), ex, args.queries))
    finally:
        ex.shutdown()
        shutil.rmtree(args.work, ignore_errors=True)
    uf = [bench_unionfind(int(e)) for e in args.unionfind.split(",") if e]
    md = table(results, uf)
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    import sys
    meta = {"command": "python -m bench.search " + " ".join(sys.argv[1:] if argv is None else argv), "machine": f"{os.cpu_count()} cores, "
            f"{platform.processor() or platform.machine()}", "date": time.strftime("%Y-%m-%d")}
    (RESULTS / "search.json").write_text(json.dumps({**meta, "sizes": results, "unionfind": uf}, indent=2))
    (RESULTS / "search.md").write_text(f"Command: `{meta['command']}` ({meta['machine']}, {meta['date']})\n\n{md}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
