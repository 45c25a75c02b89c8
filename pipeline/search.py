"""search: per query shard, PQ range-search candidates, then exact re-scoring.

Candidates are the index entries whose ADC score is above (threshold - margin): PQ scores are
biased, so the net is wider than the threshold. Every candidate pair is then re-scored with the
stored fp16 vectors; pairs keep their exact cosine. Range search never truncates big groups the
way a fixed k does. Writes search/NNNNN.parquet: gid_a < gid_b, pq_score, similarity.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from . import index as index_mod
from .io import write_parquet
from .run import Run
from .vectors import VectorStore

_INDEX_CACHE: dict = {}


def _index(folder, fp: str):
    """One index per worker process, memory-mapped from disk."""
    key = (str(folder), fp)
    if key not in _INDEX_CACHE:
        _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = index_mod.load(folder, fp)[0]
    return _INDEX_CACHE[key]


def candidates(index, queries: np.ndarray, qgids: np.ndarray, radius: float, nprobe: int,
               batch: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gid_a, gid_b, pq_score) with gid_a < gid_b, deduplicated, for all ADC scores > radius."""
    import faiss
    faiss.extract_index_ivf(index).nprobe = nprobe
    a, b, s = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for i in range(0, len(queries), batch):
        q = np.ascontiguousarray(queries[i:i + batch], dtype=np.float32)
        lims, dist, ids = index.range_search(q, radius)
        owner = np.repeat(qgids[i:i + batch], np.diff(lims).astype(np.int64))
        keep = ids != owner
        a.append(owner[keep]); b.append(ids[keep]); s.append(dist[keep])
    a, b, s = (np.concatenate(x) for x in (a, b, s))
    lo, hi = np.minimum(a, b).astype(np.int64), np.maximum(a, b).astype(np.int64)
    order = np.lexsort((-s, hi, lo))
    lo, hi, s = lo[order], hi[order], s[order]
    first = np.ones(len(lo), bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return lo[first], hi[first], s[first].astype(np.float32)


def rescore(store: VectorStore, a: np.ndarray, b: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    out = np.empty(len(a), dtype=np.float32)
    for i in range(0, len(a), chunk):
        out[i:i + chunk] = np.einsum("ij,ij->i", store.get(a[i:i + chunk]), store.get(b[i:i + chunk]))
    return out


def search_shard(job: dict) -> dict:
    """One query shard (runs in a worker). Pure function of its inputs; writes its own outputs."""
    run: Run = job["run"]
    cfg = run.cfg.search
    store = VectorStore(run.dir("embed"), {s.index: s.name for s in run.shards})
    shard = run.shard_by_index[job["index"]]
    gids, vecs = store.shard(shard.index)
    if not len(gids):
        vecs = np.zeros((0, 1), np.float32)
    index = _index(run.dir("index"), run.cfg.fingerprint("index"))
    a, b, pq_score = candidates(index, vecs, gids, cfg.threshold - cfg.margin, cfg.nprobe, cfg.query_batch)
    sim = rescore(store, a, b)
    table = pa.table({"gid_a": a, "gid_b": b, "pq_score": pq_score, "similarity": sim})
    path = write_parquet(run.dir("search") / f"{shard.name}.parquet", table)
    run.marker("search", shard.name).write(run.cfg.fingerprint("search"), [path], candidates=len(a),
                                           verified=int((sim >= cfg.threshold).sum()))
    return {"candidates": len(a), "verified": int((sim >= cfg.threshold).sum())}


def run_stage(run: Run, ex) -> dict:
    pending = set(run.pending("search", run.shard_names()))
    jobs = [{"run": run, "index": s.index} for s in run.shards if s.name in pending]
    results = ex.map(search_shard, jobs, desc="search", num_cpus=1)
    return {"shards": len(jobs), "candidates": sum(r["candidates"] for r in results),
            "verified": sum(r["verified"] for r in results)}
