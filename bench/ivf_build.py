"""IVF-PQ build at scale: the index an incremental run or a decontamination searches, built the
way the product builds it (lib/ivfbuild.py: trained on a sample, a task per shard, parts merged
into on-disk lists) against the previous way (every shard added in one process), same corpus,
same box, both through the exact (flat) coarse quantizer.

    python -m bench.ivf_build --sizes 1000000,10000000 [--keep-corpus DIR]

Per size: train / encode / merge seconds and per M rows, peak RSS of the process; the previous
way's add rate on the first 1 M rows with the same lists (measured rather than run whole at
10 M); and an HNSW graph over the trained centroids as the coarse quantizer instead: its time
per row and the share of each sampled row's 8 nearest lists (what a search probes) it finds,
against the exact quantizer.
Writes bench/results/ivf_build.json and ivf_build.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from bench.corpora import write_clip_like

RESULTS = Path(__file__).parent / "results"


def _store(corpus: Path):
    from dedup2b.core.vectors import VectorStore
    names = sorted(p.stem.split("_")[-1] for p in (corpus / "img_emb").glob("img_emb_*.npy"))
    store = VectorStore(corpus, {int(n): n for n in names})
    return store, {int(n): len(store.shard(int(n))[0]) for n in names}


def one(work: Path, rows: int, corpus: Path | None) -> dict:
    import faiss

    from dedup2b.core.executor import LocalExecutor
    from dedup2b.lib import codec as codec_lib
    from dedup2b.lib import ivfbuild
    if corpus is None:
        corpus = work / f"corpus{rows}"
        if not corpus.exists():
            write_clip_like(corpus, rows, 768, dup_frac=0.3, seed=0, max_group=5000, rows_per_shard=125_000)
    store, counts = _store(corpus)
    n = sum(counts.values())
    d = store.dim
    codec = {**codec_lib.choose_codec(n, d), "train_size": 100_000, "seed": 1234}
    out = {"rows": n, "factory": codec["factory"]}
    path = work / f"ix{rows}" / "index.faiss"
    shutil.rmtree(path.parent, ignore_errors=True)
    t0 = time.time()
    built = ivfbuild.build(path, store, counts, codec, LocalExecutor())
    out.update(total_s=round(time.time() - t0, 1), train_s=built["train_s"], encode_s=built["add_s"],
               merge_s=built["merge_s"], ntotal=built["ntotal"],
               index_bytes=sum(f.stat().st_size for f in path.parent.iterdir()),
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    out["encode_s_per_m"] = round(out["encode_s"] / (n / 1e6), 1)
    # the previous way: one process, every row through an exact (flat) quantizer of the same lists
    index = ivfbuild.read(path)
    ivf = faiss.extract_index_ivf(index)
    cents = faiss.downcast_index(ivf.quantizer).reconstruct_n(0, ivf.nlist)
    flat = faiss.IndexFlatIP(d)
    flat.add(cents)
    old = faiss.IndexIVFPQ(flat, d, ivf.nlist, faiss.downcast_index(ivf).pq.M, 8, faiss.METRIC_INNER_PRODUCT)
    old.pq = faiss.downcast_index(ivf).pq
    old.is_trained = True
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t1, added = time.time(), 0
    for i in sorted(counts):
        g, v = store.shard(i)
        for s in range(0, len(g), 65536):
            old.add_with_ids(np.asarray(v[s:s + 65536], np.float32), g[s:s + 65536])
        store.release(i)
        added += len(g)
        if added >= 1_000_000:
            break
    out["flat_serial_add_s_per_m"] = round((time.time() - t1) / (added / 1e6), 1)
    # an HNSW graph over the same centroids as the coarse quantizer: time per row, lists found
    rng = np.random.default_rng(0)
    g, v = store.shard(sorted(counts)[0])
    q = np.asarray(v[np.sort(rng.choice(len(g), min(20000, len(g)), replace=False))], np.float32)
    t2 = time.time()
    _, exact = flat.search(q, 8)
    out["flat_quantizer_us_per_row"] = round((time.time() - t2) / len(q) * 1e6)
    graph = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    graph.add(cents)
    for ef in (32, 128):
        graph.hnsw.efSearch = ef
        t2 = time.time()
        _, got = graph.search(q, 8)
        out[f"hnsw_ef{ef}_us_per_row"] = round((time.time() - t2) / len(q) * 1e6)
        out[f"hnsw_ef{ef}_lists_found"] = round(float(np.mean([len(set(a) & set(b)) / 8 for a, b in zip(exact, got)])), 4)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--corpus", action="append", default=[], help="SIZE=DIR: an existing corpus for that size")
    ap.add_argument("--work", default="/tmp/dedup2b-bench-ivf")
    args = ap.parse_args(argv)
    given = {int(k): Path(v) for k, v in (c.split("=", 1) for c in args.corpus)}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res = {}
    for rows in [int(x) for x in args.sizes.split(",") if x]:
        res[rows] = one(work, rows, given.get(rows))
        print(rows, res[rows], flush=True)
    lines = ["| measure | " + " | ".join(f"{r:,} rows" for r in res) + " |", "|---|" + "---|" * len(res)]
    for key, label in (("factory", "codec"), ("train_s", "train s (sample)"),
                       ("encode_s", "encode s (a task per shard, 2 at a time)"), ("encode_s_per_m", "encode s per M rows"),
                       ("merge_s", "merge into on-disk lists s"), ("total_s", "whole build s"),
                       ("flat_serial_add_s_per_m", "previous way: flat quantizer, one process, add s per M rows"),
                       ("flat_quantizer_us_per_row", "exact coarse quantizer, us a row (8 nearest lists)"),
                       ("hnsw_ef32_us_per_row", "HNSW quantizer efSearch 32, us a row"),
                       ("hnsw_ef32_lists_found", "HNSW efSearch 32: share of the exact 8 lists found"),
                       ("hnsw_ef128_us_per_row", "HNSW quantizer efSearch 128, us a row"),
                       ("hnsw_ef128_lists_found", "HNSW efSearch 128: share of the exact 8 lists found"),
                       ("index_bytes", "index bytes"), ("peak_rss_mb", "peak RSS of the benchmark process MB")):
        lines.append(f"| {label} | " + " | ".join(str(res[r][key]) for r in res) + " |")
    cmd = "python -m bench.ivf_build " + " ".join(sys.argv[1:] if argv is None else argv)
    md = f"Command: `{cmd}` ({os.cpu_count()} cores, {time.strftime('%Y-%m-%d')})\n\n" + "\n".join(lines) + "\n"
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ivf_build.json").write_text(json.dumps({"command": cmd, **{str(k): v for k, v in res.items()}}, indent=2))
    (RESULTS / "ivf_build.md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
