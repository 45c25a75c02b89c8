"""Search benchmark: dedup2b's cell-join search vs exhaustive FAISS and a SemDeDup-style baseline.

    make bench-search                      # sizes 250k and 1M (about 15 min on 2 cores)
    python -m bench.search --sizes 250000  # any sizes

Per size, on CLIP-like synthetic 768-d vectors (bench/corpora.py) written in clip-retrieval
layout, same box, same run:
  ours       index stage (IVF-PQ + cell-join codec) + search stage on a local Ray (2 tasks)
  exhaustive FAISS IndexFlatIP range search at the threshold for a random sample of queries,
             extrapolated to all rows (its cost is linear in queries)
  semdedup   spherical k-means (same cell count) + exact GEMM inside each cluster, no border
             handling; run at each k-means budget of SEMDEDUP_SETTINGS, the fastest is the baseline
Recall and precision are measured on the sampled queries against the exhaustive result: a pair
counts from the query's side. Union-find is timed on random edges at 10 M and 100 M.
Writes bench/results/search.json and bench/results/search.md.

    python -m bench.search --scale 4000000 --queries 1000   # scale curve, see scale_size()

--scale runs our method and the exhaustive sample (SemDeDup-style too while all vectors fit in
about 12 GB of RAM) at sizes too big for RAM: the corpus is generated in bounded memory by
bench.corpora.write_clip_like, the exhaustive sample streams shard by shard. It writes
bench/results/search_scale.json/.md: the committed search.json sizes plus the new ones.
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

from dedup2b.lib import codec as index
from dedup2b.core.config import CodecConfig, RayConfig, SearchConfig
from dedup2b.core.executor import RayExecutor
from dedup2b.stages.search import SearchJob, find_pairs, pair_files
from bench.corpora import clip_like, write_clip_like, write_corpus
from dedup2b.lib.unionfind import UnionFind
from dedup2b.core.vectors import VectorStore

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


# SemDeDup-style k-means budgets, run side by side; the fastest is the baseline ("its best setting"):
# FAISS's defaults on a 100k sample, and the budget our cell codec trains with (100 points a cell, 10 it.)
SEMDEDUP_SETTINGS = {"100k sample, 20 it.": (100_000, 20, 256), "100 per cell, 10 it.": (100, 10, 100)}


def semdedup(x: np.ndarray, gids: np.ndarray, n_cells: int, train_size: int, seed: int = 1,
             niter: int = 20, max_points: int = 256):
    import faiss
    t0 = time.time()
    rng = np.random.default_rng(seed)
    xt = x[rng.choice(len(x), min(train_size, len(x)), replace=False)]
    km = faiss.Kmeans(x.shape[1], n_cells, niter=niter, spherical=True, seed=seed, verbose=False,
                      max_points_per_centroid=max_points)
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


def semdedup_best(x, gids, n_cells: int, queries, truth) -> tuple[float, dict, dict]:
    """Every SEMDEDUP_SETTINGS budget, timed: (fastest seconds, its score, {setting: s, recall})."""
    settings, best = {}, None
    for name, (train, niter, max_points) in SEMDEDUP_SETTINGS.items():
        train = train if train > 1000 else train * n_cells
        a, b, secs = semdedup(x, gids, n_cells, train, niter=niter, max_points=max_points)
        sc = score(neighbours(a, b, queries), truth)
        settings[name] = {"seconds": round(secs, 1), "recall": round(sc["recall"], 4)}
        print(f"   semdedup ({name}) {secs:.1f}s recall {sc['recall']:.4f}", flush=True)
        if best is None or secs < best[0]:
            best = (secs, sc)
        del a, b
    return best[0], best[1], settings


def run_ours(work: Path, shards: dict, store: VectorStore, ex, ivfpq: bool = True):
    """Index stage (cell codec, and the IVF-PQ index when `ivfpq`: its build time is reported, not
    counted) and the cell-join search, timed: (codec, cell codec s, stats, search s)."""
    t0 = time.time()
    counts = {i: len(store.shard(i)[0]) for i in shards}
    codec, _ = index.train_all(store, counts, CodecConfig(train_size=100_000), work / "index", "bench", "synthetic",
                            ivfpq=ivfpq)
    index_s = codec["cells_train_s"]          # what the search needs: projection + cells
    print(f"   index {time.time() - t0:.0f}s (IVF-PQ train {codec.get('train_s')}s, add {codec.get('add_s')}s; "
          f"cell codec {index_s}s) {codec['factory']} cells={codec['cells']}", flush=True)
    job = SearchJob(work / "embed", shards, work / "index", work / "search",
                    SearchConfig(threshold=THRESHOLD, band=0.0, cells_per_task=max(8, codec["cells"] // 16),
                                 pairs="all"),   # every pair: what recall is measured on
                    "bench", "bench-search")
    t0 = time.time()
    stats = find_pairs(job, ex)
    search_s = time.time() - t0
    print(f"   ours search {search_s:.0f}s pairs={stats['verified']:,} worker peak RSS "
          f"{stats['worker_peak_rss_mb']} MB", flush=True)
    return codec, index_s, job, stats, search_s


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

    codec, index_s, job, stats, search_s = run_ours(work, shards, store, ex)
    pa_, pb_ = [], []
    for p in pair_files(job.out_dir):
        t = pq.read_table(p, columns=["gid_a", "gid_b"])
        pa_.append(t["gid_a"].to_numpy()); pb_.append(t["gid_b"].to_numpy())
    ours_a, ours_b = np.concatenate(pa_), np.concatenate(pb_)

    rng = np.random.default_rng(seed + 1)
    qidx = np.sort(rng.choice(n, min(n_queries, n), replace=False))
    truth, exh_s = exhaustive(xs, gids, qidx)
    print(f"   exhaustive (extrapolated from {len(qidx):,} queries) {exh_s:.0f}s", flush=True)
    queries = gids[qidx]
    sem_s, sem, settings = semdedup_best(xs, gids, codec["cells"], queries, truth)
    ours = score(neighbours(ours_a, ours_b, queries), truth)
    return {
        "rows": n, "threshold": THRESHOLD, "codec": codec["factory"], "cells": codec["cells"],
        "bytes_per_vector": codec["bytes_per_vector"], "index_s": round(index_s, 1),
        "ivfpq_train_s": codec["train_s"], "ivfpq_add_s": codec["add_s"],
        "search_s": round(search_s, 1), "ours_total_s": round(index_s + search_s, 1),
        "exhaustive_s": round(exh_s, 1), "semdedup_s": round(sem_s, 1), "semdedup_settings": settings,
        "ratio_search_vs_exhaustive": round(search_s / exh_s, 4),
        "ratio_total_vs_exhaustive": round((index_s + search_s) / exh_s, 4),
        "ratio_total_vs_semdedup": round((index_s + search_s) / sem_s, 3),
        "ours": ours, "semdedup": sem, "pairs_found": int(len(ours_a)), "candidates": stats["candidates"],
        "worker_peak_rss_mb": stats["worker_peak_rss_mb"], "queries_sampled": int(len(qidx)),
    }


def exhaustive_stream(store: VectorStore, shards: dict, qgids: np.ndarray, n: int) -> tuple[dict, float]:
    """`exhaustive` without holding all vectors: one IndexFlatIP per shard, range search of the
    sampled queries against it; only range_search time counts, as in `exhaustive`."""
    import faiss
    q = store.get(qgids)
    truth: dict[int, set[int]] = {int(g): set() for g in qgids}
    secs = 0.0
    for i in sorted(shards):
        sg, sv = store.shard(i)
        flat = faiss.IndexFlatIP(q.shape[1])
        flat.add(np.asarray(sv, dtype=np.float32))
        t0 = time.time()
        lims, _, ids = flat.range_search(q, THRESHOLD - 1e-6)
        secs += time.time() - t0
        del flat
        for k, g in enumerate(qgids.tolist()):
            nb = sg[ids[lims[k]:lims[k + 1]]]
            truth[g].update(nb[nb != g].tolist())
    return truth, secs * n / len(qgids)


def _rss_mb() -> float:
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def scale_size(n: int, work: Path, ex, n_queries: int, seed: int = 0, semdedup_gb: float = 12.0) -> dict:
    """bench_size for corpora bigger than RAM: streamed generation and exhaustive sample."""
    print(f"== {n:,} rows (scale mode)", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.time()
    names = write_clip_like(work / "embed", n, 768, dup_frac=0.3, seed=seed, max_group=5000,
                            rows_per_shard=125_000)
    shards = {i: name for i, name in enumerate(names)}
    store = VectorStore(work / "embed", shards)
    gids = np.concatenate([store.shard(i)[0] for i in shards])
    data_s = time.time() - t0
    print(f"   data {data_s:.0f}s (driver peak RSS {_rss_mb()} MB)", flush=True)

    codec, index_s, job, stats, search_s = run_ours(work, shards, store, ex, ivfpq=False)

    rng = np.random.default_rng(seed + 1)
    qidx = np.sort(rng.choice(n, min(n_queries, n), replace=False))
    queries = gids[qidx]
    qs = set(queries.tolist())
    found: dict[int, set[int]] = {q: set() for q in qs}
    n_pairs = 0
    for p in pair_files(job.out_dir):                  # pair by pair file: never all pairs in RAM
        t = pq.read_table(p, columns=["gid_a", "gid_b"])
        a, b = t["gid_a"].to_numpy(), t["gid_b"].to_numpy()
        n_pairs += len(a)
        for k, v in neighbours(a, b, queries).items():
            found[k] |= v
    truth, exh_s = exhaustive_stream(store, shards, queries, n)
    print(f"   exhaustive (extrapolated from {len(qidx):,} queries) {exh_s:.0f}s", flush=True)
    out = {
        "rows": n, "threshold": THRESHOLD, "codec": codec["factory"], "cells": codec["cells"],
        "bytes_per_vector": codec["bytes_per_vector"], "index_s": round(index_s, 1),
        "ivfpq_train_s": codec.get("train_s"), "ivfpq_add_s": codec.get("add_s"), "data_s": round(data_s, 1),
        "search_s": round(search_s, 1), "ours_total_s": round(index_s + search_s, 1),
        "exhaustive_s": round(exh_s, 1),
        "ratio_search_vs_exhaustive": round(search_s / exh_s, 4),
        "ratio_total_vs_exhaustive": round((index_s + search_s) / exh_s, 4),
        "ours": score(found, truth), "pairs_found": int(n_pairs), "candidates": stats["candidates"],
        "worker_peak_rss_mb": stats["worker_peak_rss_mb"], "queries_sampled": int(len(qidx)),
        "generator": "write_clip_like (streamed)",
    }
    if n * 768 * 4 <= semdedup_gb * 2**30:
        xs = store.get(gids)
        sem_s, sem, settings = semdedup_best(xs, gids, codec["cells"], queries, truth)
        del xs
        out.update(semdedup_s=round(sem_s, 1), semdedup=sem, semdedup_settings=settings,
                   ratio_total_vs_semdedup=round((index_s + search_s) / sem_s, 3))
    else:
        out["semdedup_skipped"] = f"needs {n * 768 * 4 / 2**30:.1f} GB of float32 vectors in RAM (> {semdedup_gb} GB)"
    out["driver_peak_rss_mb"] = _rss_mb()
    return out


def scale_table(rows: list[dict]) -> str:
    lines = ["| rows | generator | cells | ours cell-codec train + search s | s per M rows | exhaustive s (extrap.) | "
             "ratio vs exhaustive | SemDeDup-style s | recall / precision (sampled queries) | queries | "
             "worker peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tot = r["index_s"] + r["search_s"]
        lines.append(f"| {r['rows']:,} | {r.get('generator', 'clip_like')} | {r['cells']} | {r['index_s']} + "
                     f"{r['search_s']} = {tot:.1f} | {tot / (r['rows'] / 1e6):.1f} | {r['exhaustive_s']:,} | "
                     f"1/{1 / r['ratio_total_vs_exhaustive']:.0f} | {r.get('semdedup_s', 'skipped')} | "
                     f"{r['ours']['recall']:.4f} / {r['ours']['precision']:.4f} | {r['queries_sampled']:,} | "
                     f"{r['worker_peak_rss_mb']} |")
    return "\n".join(lines)


def main_scale(sizes: list[int], args, argv) -> int:
    import sys
    committed = json.loads((RESULTS / "search.json").read_text())
    ex = RayExecutor(RayConfig(num_cpus=os.cpu_count(), object_store_mb=1024))
    new = []
    try:
        for n in sizes:
            new.append(scale_size(n, Path(args.work) / str(n), ex, args.queries))
    finally:
        ex.shutdown()
        shutil.rmtree(args.work, ignore_errors=True)
    rows = sorted(committed["sizes"] + new, key=lambda r: (r["rows"], "generator" in r))
    md = scale_table(rows)
    print(md)
    meta = {"command": "python -m bench.search " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
            "date": time.strftime("%Y-%m-%d"),
            "earlier_sizes_from": f"bench/results/search.json ({committed['command']}, {committed['date']})"}
    (RESULTS / "search_scale.json").write_text(json.dumps({**meta, "sizes": rows}, indent=2))
    (RESULTS / "search_scale.md").write_text(
        f"Command: `{meta['command']}` ({meta['machine']}, {meta['date']}); rows with generator clip_like come from "
        f"{meta['earlier_sizes_from']}.\n\n{md}\n")
    return 0


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
    lines = ["| rows | codec | B/vector (target <= 16) | ours cell-codec train + search s | exhaustive s (extrap.) | ratio (target <= 1/100) | SemDeDup-style s (fastest k-means budget) | ratio to it (target <= 0.33) | recall (ours / SemDeDup; target >= 0.98) | precision (target >= 0.98) | worker peak RSS MB |",
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
    ap.add_argument("--scale", default="", help="sizes for the scale curve (e.g. 4000000): writes search_scale.*")
    args = ap.parse_args(argv)
    if args.scale:
        return main_scale([int(s) for s in args.scale.split(",") if s], args, argv)
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
