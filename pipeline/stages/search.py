"""search: all near-duplicate pairs, verified exactly against the stored fp16 vectors.

Two methods (search.method):
  cells (default)  cell join (see celljoin.py): assign every vector to its cell(s) per shard, then
                   join cell blocks with a lossless projected bound + exact re-score. No fixed k,
                   so groups of thousands of copies are never truncated.
  pq               IVF-PQ range search (ADC scores > threshold - margin) per query shard, every
                   candidate re-scored exactly. Lean on memory, slower; kept for comparison and for
                   searching new rows against a built index.
Both write search/pairs/*.parquet (gid_a < gid_b, similarity, and pq_score for pq) holding every
pair with exact cosine >= threshold - band, resumable per unit of work (a shard or a cell block).
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.arrays import unique
from ..core.config import SearchConfig
from ..core.io import Marker, load_npy, npy_writer, parquet_writer, write_parquet
from ..core.memory import need
from ..core.run import Run
from ..core.vectors import Rows, VectorStore
from ..lib import celljoin
from ..lib import codec as index_mod
from ..lib import registry
from . import index as index_stage

NAME = "search"
FIELDS = ("input", "embed.model", "codec", "search", "verify.method", "verify.low", "against", "decontaminate")

_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


@dataclass
class SearchJob:
    """Everything a search worker needs, with no reference to the run (benchmarks use it too)."""
    embed_dir: Path
    shards: dict            # shard index -> shard name
    index_dir: Path
    out_dir: Path
    cfg: SearchConfig
    index_fp: str           # fingerprint the index must carry
    fp: str                 # fingerprint written into this stage's markers
    low: float | None = None   # candidates for the pixel check from here (verify.low), when it runs

    @property
    def floor(self) -> float:
        floor = self.cfg.threshold - self.cfg.band
        return floor if self.low is None else min(floor, self.low)

    @property
    def dense_min(self) -> int:
        """Cells from this size give a spanning forest of their edges (0: every pair everywhere).
        Not where the pixel check runs: a forest of the descriptor graph is chosen before the
        pixels decide, so a rejected look-alike edge would hide the copies' own edges (measured:
        half the copies of bench.quality lost); there every candidate pair is written."""
        return self.cfg.dense_cell if self.cfg.pairs == "forest" and self.low is None else 0

    def store(self) -> VectorStore:
        return VectorStore(self.embed_dir, self.shards)

    def done(self, unit: str) -> bool:
        return Marker(self.out_dir, unit).valid(self.fp)


def _cached(key, load, slot: str = "codec"):
    """One loaded thing per slot per worker process, shared by its threads: the codec or index
    (memory-mapped from disk), the vector store, the assign files' row groups. A new key
    replaces what the slot held. Held across a worker's tasks, so a join block does not open
    every shard and assign file again: per block that is O(shards), O(rows^2) over a run
    (0.17 s a block at 10 M rows, 80 shards)."""
    with _CACHE_LOCK:
        held = _CACHE.get(slot)
        if held is None or held[0] != key:
            _CACHE[slot] = (key, load())
        return _CACHE[slot][1]


def _files(folder: Path, pattern: str) -> tuple:
    """(name, inode, mtime, size) of a folder's files: every write here goes to a temp name and
    is os.replace'd into place, so a file written again has another inode, whatever the clock's
    grain. A stat each (microseconds), not an open and a footer."""
    out = []
    for path in sorted(Path(folder).glob(pattern)):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        out.append((path.name, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _store(job: SearchJob) -> VectorStore:
    """The worker's vector store for this job (its shards' gids and memory maps opened once),
    opened again when a vector, link or metadata file of the embed folder has been written since."""
    key = (str(job.embed_dir), tuple(sorted(job.shards.items())),
           _files(job.embed_dir / "img_emb", "*"), _files(job.embed_dir / "metadata", "*.parquet"))
    return _cached(key, job.store, slot="store")


def pair_files(out_dir: Path) -> list[Path]:
    return sorted((Path(out_dir) / "pairs").glob("*.parquet"))


def _write_pairs(job: SearchJob, unit: str, a, b, sim, **extra) -> dict:
    cols = {"gid_a": a, "gid_b": b, "similarity": sim, **extra}
    path = write_parquet(job.out_dir / "pairs" / f"{unit}.parquet", pa.table(cols))
    verified = int((sim >= job.cfg.threshold).sum())
    Marker(job.out_dir, unit).write(job.fp, [path], pairs=len(a), verified=verified)
    return {"pairs": len(a), "verified": verified}


# ---- method: cells ---------------------------------------------------------------------------

def _codec(job: SearchJob):
    """(projection, what assigns rows to cells): nested (search.assign's default: the index
    stage trained two levels for it, coarse.npy), exhaustive, or two levels (coarse.npy; the
    nprobe the index stage measured, in codec.json). Where the index stage chose the exhaustive
    assignment (two levels would not prune), it is exhaustive, whatever files the folder holds."""
    meta = index_mod.check(job.index_dir, job.index_fp)
    load = lambda name: load_npy(job.index_dir / name)   # noqa: E731
    if str(meta.get("assign", "")).startswith("nested"):
        return load("projection.npy"), celljoin.Nested(load("centroids.npy"), load("coarse.npy"), job.cfg.coarse_delta)
    two = (job.index_dir / "coarse.npy").exists() and "assign_nprobe" in meta
    coarse = load("coarse.npy") if two else None
    cells, _ = celljoin.cell_index(load("centroids.npy"), coarse)
    if coarse is not None:
        cells.nprobe = int(meta.get("assign_nprobe", 8))
    return load("projection.npy"), cells


def n_cells(index_dir: Path) -> int:
    return len(load_npy(Path(index_dir) / "centroids.npy", mmap=True))


def zr_path(out_dir: Path, shard: str) -> Path:
    return Path(out_dir) / "zr" / f"{shard}.npy"


def assign_shard(args: tuple) -> dict:
    """Cells of every vector of one shard -> search/assign/NNNNN.parquet: a row per (cell, vector)
    (cell, gid, c0..c{k-1}: the vector's whole cell set), sorted by cell, one row group per join
    block, so a join task reads only its block's row groups of each shard (linear I/O in rows).
    Beside it search/zr/NNNNN.npy: each of those rows' projection [z, |r|] (fp16, celljoin.pack_zr:
    258 bytes; the file's row order), which the join reads in one sequential slice per shard
    instead of every member's stored vector (only the rows of candidate pairs are read from the
    vectors then). The join deletes the zr files once every block is joined."""
    job, index = args
    proj, cells = _cached(("cells", str(job.index_dir), job.index_fp), lambda: _codec(job))
    store = job.store()
    gids, vecs = store.shard(index)
    k = job.cfg.max_cells
    sets, zrs = [np.zeros((0, k), np.int64)], [np.zeros((0, proj.shape[0] + 1), np.float16)]
    linked = store.is_linked(index)
    for s in range(0, len(gids), 65536):     # the cells live in the projection's first cells.d dims
        # converted to float32 8,192 rows at a time (Vectors.project_zr), never the chunk's 200 MB:
        # a process's fresh memory is zeroed page by page on first touch (search's CPU was half
        # clear_page before, bench/results/memory_touch.md)
        raw = vecs[s:s + 65536]
        zr = celljoin.Vectors(raw, np.ones(len(raw), bool) if linked else None).project_zr(proj)
        sets.append(celljoin.assign(zr[:, :-1], cells, job.cfg.border, k))
        zrs.append(celljoin.pack_zr(zr))
    store.release(index)
    sets, zrs = np.concatenate(sets), np.concatenate(zrs)
    row, col = np.nonzero(sets >= 0)
    cell = sets[row, col]
    order = np.lexsort((row, cell))
    row, cell = row[order], cell[order]
    unit = f"assign-{job.shards[index]}"
    table = pa.table({"cell": cell.astype(np.int32), "gid": gids[row],
                      **{f"c{i}": sets[row, i].astype(np.int32) for i in range(k)}})
    step = job.cfg.cells_per_task
    bounds = np.searchsorted(cell, np.arange(0, int(cell.max(initial=0)) + step + 1, step))
    path = job.out_dir / "assign" / f"{job.shards[index]}.parquet"
    with parquet_writer(path, table.schema) as w, \
            npy_writer(zr_path(job.out_dir, job.shards[index]), np.float16, (len(row), zrs.shape[1])) as zw:
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if hi > lo:
                w.write_table(table.slice(lo, hi - lo), row_group_size=hi - lo)
                zw(zrs[row[lo:hi]])
    Marker(job.out_dir, unit).write(job.fp, [path], rows=len(gids), assignments=len(cell))
    return {"rows": len(gids), "assignments": len(cell)}


def _row_groups(folder: Path) -> list[tuple[Path, object, np.ndarray]]:
    """Each assign file's footer and its row groups' [min cell, max cell, first row, rows]."""
    out = []
    for path in sorted(folder.glob("*.parquet")):
        md = pq.read_metadata(path)
        col = md.schema.to_arrow_schema().get_field_index("cell")
        groups, at = [], 0
        for g in range(md.num_row_groups):
            st = md.row_group(g).column(col).statistics if col >= 0 else None
            if st is None or not st.has_min_max:
                raise ValueError(f"{path}: row group {g} has no cell statistics (not written by assign_shard)")
            groups.append((st.min, st.max, at, md.row_group(g).num_rows))
            at += md.row_group(g).num_rows
        out.append((path, md, np.array(groups, np.int64).reshape(-1, 4)))
    return out


def _read_block(folder: Path, lo: int, hi: int, columns: list[str]) -> tuple[pa.Table, list]:
    """The rows of cells [lo, hi) of every assign file in `folder`: the row groups whose cell
    range lies in [lo, hi) (assign_shard writes one per join block), found from the footers'
    statistics (read once per worker: _row_groups) and read directly (a filtered read_table
    costs 7x more: 0.54 s against 0.08 s for the 80 files of a 10 M-row run). Also where they
    lie: (file, first row, last row + 1) per file read, in the table's order."""
    parts, spans = [], []
    for path, md, groups in _cached((str(folder), _files(folder, "*.parquet")), lambda: _row_groups(folder),
                                    slot="assign"):
        hit = np.flatnonzero((groups[:, 1] >= lo) & (groups[:, 0] < hi))
        across = hit[(groups[hit, 0] < lo) | (groups[hit, 1] >= hi)]
        if len(across):
            g = int(across[0])
            raise ValueError(f"{path}: row group {g} spans cells {groups[g, 0]}..{groups[g, 1]}, across a "
                             f"join block [{lo}, {hi}) (written with another search.cells_per_task)")
        if len(hit):
            with pq.ParquetFile(path, metadata=md) as f:
                parts.append(f.read_row_groups(hit.tolist(), columns=columns))
            # a block's row groups are consecutive (the file is sorted by cell)
            spans.append((path, int(groups[hit[0], 2]), int(groups[hit[0], 2]) + parts[-1].num_rows))
    if not parts:
        return pa.table({c: pa.array([], pa.int64() if c == "gid" else pa.int32()) for c in columns}), []
    return pa.concat_tables(parts), spans


def _read_zr(job: SearchJob, spans: list, pick: np.ndarray) -> np.ndarray | None:
    """The bound rows `pick` of a block's assignments (spans from _read_block; celljoin.unpack_zr
    of the stored [z, |r|]), read in one sequential slice per shard and unpacked once a row, after
    the pick (a row with several cells in the block is stored once per cell); None where a shard's
    zr file is gone (the block then projects its members' vectors)."""
    parts = []
    for path, lo, hi in spans:
        zp = zr_path(job.out_dir, path.stem)
        if not zp.exists():
            return None
        m = load_npy(zp, mmap=True)
        if hi > len(m):
            return None
        parts.append(m[lo:hi])
    return celljoin.unpack_zr(np.concatenate(parts)[pick]) if parts else None


JOIN_BUFFER = 256 << 20   # a cell's products and candidate pairs, chunk by chunk (celljoin.join_cell)


def join_block(args: tuple) -> dict:
    """Join cells [lo, hi): their members' projections, bound, re-score the candidates with the
    stored vectors of their rows, write verified pairs."""
    job, lo, hi = args
    proj, _ = _cached(("cells", str(job.index_dir), job.index_fp), lambda: _codec(job))
    k = job.cfg.max_cells
    t, spans = _read_block(job.out_dir / "assign", lo, hi, ["gid"] + [f"c{i}" for i in range(k)])
    gids, first = unique(t["gid"].to_numpy(), return_index=True)   # a row once, whatever its cells here
    sets = np.stack([t[f"c{i}"].to_numpy().astype(np.int64)[first] for i in range(k)], axis=1)
    store = _store(job)
    what = f"search: join of cells {lo}-{hi} ({len(gids):,} rows)"
    if len(gids):       # the block's projections (or, where they are gone, its vectors: below)
        need(what, len(gids) * (4 * (proj.shape[0] + 2) + 64) + JOIN_BUFFER)
    zr = _read_zr(job, spans, first) if len(gids) else None
    if zr is not None:              # the members' projections as assigned; vectors read for candidates only
        x = Rows(store, gids, before=lambda n: need(what, n * 4 * store.dim + JOIN_BUFFER))
    elif len(gids):   # the block's vectors as stored, their projection, and the products of a cell's rows
        need(what, len(gids) * (2 * store.dim + 4 * (proj.shape[0] + 1) + 64) + JOIN_BUFFER)
        x = celljoin.Vectors(*store.get_raw(gids))
    else:
        x = np.zeros((0, 1), np.float32)
    dense = {"dense_cells": 0, "dense_products": 0}
    a, b, sim, cand = celljoin.join_members(gids, sets, x, proj, job.floor, cells=(lo, hi),
                                            device=_device(job.cfg.device), dense_min=job.dense_min,
                                            edge_threshold=job.cfg.threshold, stats=dense, zr=zr)
    out = _write_pairs(job, f"cells-{lo:06d}", a, b, sim)
    out.update(candidates=cand, **dense, rows_read=getattr(x, "read", len(gids)), peak_rss_mb=_peak_rss_mb())
    return out


def _device(setting: str) -> str | None:
    """numpy on CPU by default; torch on CUDA where a GPU is visible (auto) or when asked."""
    if setting == "numpy":
        return None
    if setting == "auto":
        import glob
        if not glob.glob("/dev/nvidia[0-9]*"):   # no NVIDIA device: skip importing torch (seconds per worker)
            return None
        try:
            import torch
            return "cuda" if torch.cuda.is_available() else None
        except ImportError:
            return None
    return setting


def _peak_rss_mb() -> float:
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_cells(job: SearchJob, ex) -> dict:
    t0 = time.time()
    todo = [(job, i) for i in sorted(job.shards) if not job.done(f"assign-{job.shards[i]}")]
    assigned = ex.map(assign_shard, todo, desc="search: assign", num_cpus=1)
    t_assign = time.time() - t0
    total = n_cells(job.index_dir)
    step = job.cfg.cells_per_task
    every = [(job, lo, min(lo + step, total)) for lo in range(0, total, step)]
    # new assignments invalidate every joined block; otherwise only unfinished blocks run
    blocks = every if todo else [b for b in every if not job.done(f"cells-{b[1]:06d}")]
    planned = {f"cells-{b[1]:06d}.parquet" for b in every}
    for old in pair_files(job.out_dir):  # blocks of an earlier, larger cell count
        if old.name.startswith("cells-") and old.name not in planned:
            old.unlink()
    results = ex.map(join_block, blocks, desc="search: join", num_cpus=1)
    shutil.rmtree(job.out_dir / "zr", ignore_errors=True)   # every block joined: the projections are spent
    return {"shards": len(todo), "blocks": len(blocks), "assign_s": round(t_assign, 3),
            "assignments": sum(r["assignments"] for r in assigned),      # (row, cell) memberships written
            "join_s": round(time.time() - t0 - t_assign, 3), "candidates": sum(r["candidates"] for r in results),
            "dense_cells": sum(r["dense_cells"] for r in results),
            "dense_products": sum(r["dense_products"] for r in results),
            "pairs": sum(r["pairs"] for r in results), "verified": sum(r["verified"] for r in results),
            "rows_read": sum(r["rows_read"] for r in results),
            "worker_peak_rss_mb": max([r["peak_rss_mb"] for r in results], default=0.0)}


# ---- method: pq ------------------------------------------------------------------------------

def _range_by_knn(index, q: np.ndarray, radius: float, k0: int = 64, k_max: int = 2048, cpu=None):
    """range_search through k-NN search (FAISS GPU indexes have no range search): k grows (x4)
    for the queries whose k-th neighbour still scores above `radius`, so a group of thousands of
    copies is never cut at a fixed k; past `k_max` (the GPU's limit) those queries go to the CPU
    index's range search. Returns range_search's (lims, scores, ids)."""
    k, todo = min(k0, index.ntotal), np.arange(len(q))
    found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    while len(todo):
        if k > k_max and cpu is not None:
            lims, dist, ids = cpu.range_search(np.ascontiguousarray(q[todo]), radius)
            for row, i in enumerate(todo):
                found[int(i)] = (dist[lims[row]:lims[row + 1]], ids[lims[row]:lims[row + 1]])
            break
        dist, ids = index.search(q[todo], k)
        more = (dist[:, -1] > radius) & (k < index.ntotal)
        for row in np.nonzero(~more)[0]:
            sel = (dist[row] > radius) & (ids[row] >= 0)
            found[int(todo[row])] = (dist[row][sel], ids[row][sel])
        todo, k = todo[more], min(k * 4, index.ntotal) if k < index.ntotal else k
    counts = np.array([len(found[i][1]) for i in range(len(q))], np.int64)
    lims = np.r_[0, np.cumsum(counts)]
    dist = np.concatenate([found[i][0] for i in range(len(q))] or [np.zeros(0, np.float32)])
    ids = np.concatenate([found[i][1] for i in range(len(q))] or [np.zeros(0, np.int64)])
    return lims, dist, ids


def _set_nprobe(index, nprobe: int) -> None:
    import faiss
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except Exception:          # a GPU index
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)


def candidates(index, queries: np.ndarray, qgids: np.ndarray, radius: float, nprobe: int,
               batch: int = 4096, knn: bool = False, cpu=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gid_a, gid_b, pq_score) with gid_a < gid_b, deduplicated, for all ADC scores > radius
    (by range search, or by growing k-NN search with `knn`, as on a GPU; `cpu` takes the queries
    past the GPU's largest k)."""
    _set_nprobe(index, nprobe)
    if cpu is not None:
        _set_nprobe(cpu, nprobe)
    a, b, s = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for i in range(0, len(queries), batch):
        q = np.ascontiguousarray(queries[i:i + batch], dtype=np.float32)
        lims, dist, ids = _range_by_knn(index, q, radius, cpu=cpu) if knn else index.range_search(q, radius)
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


def _gpu_index(index):
    """The index on every visible GPU (faiss-gpu, the `gpu` extra), else None."""
    import faiss
    if not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
        return None
    return faiss.index_cpu_to_all_gpus(index)


def rescore(store: VectorStore, a: np.ndarray, b: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    out = np.empty(len(a), dtype=np.float32)
    for i in range(0, len(a), chunk):
        out[i:i + chunk] = np.einsum("ij,ij->i", store.get(a[i:i + chunk]), store.get(b[i:i + chunk]))
    return out


def _load_pq(job: SearchJob):
    index = index_mod.load(job.index_dir, job.index_fp)[0]
    return index, _gpu_index(index) if _device(job.cfg.device) == "cuda" else None


def pq_shard(args: tuple) -> dict:
    job, index_no = args
    store = job.store()
    gids, vecs = store.shard(index_no)
    index, gpu = _cached(("pq", str(job.index_dir), job.index_fp), lambda: _load_pq(job))
    radius = job.cfg.threshold - job.cfg.margin
    a, b, pq_score = candidates(gpu or index, np.asarray(vecs, dtype=np.float32).reshape(len(gids), -1), gids,
                                radius, job.cfg.nprobe, job.cfg.query_batch, knn=gpu is not None, cpu=index)
    sim = rescore(store, a, b)
    keep = sim >= job.floor
    out = _write_pairs(job, f"pq-{job.shards[index_no]}", a[keep], b[keep], sim[keep], pq_score=pq_score[keep])
    out["candidates"] = len(a)
    return out


def run_pq(job: SearchJob, ex) -> dict:
    todo = [(job, i) for i in sorted(job.shards) if not job.done(f"pq-{job.shards[i]}")]
    results = ex.map(pq_shard, todo, desc="search: pq", num_cpus=1)
    return {"shards": len(todo), "candidates": sum(r["candidates"] for r in results),
            "pairs": sum(r["pairs"] for r in results), "verified": sum(r["verified"] for r in results)}


def find_pairs(job: SearchJob, ex) -> dict:
    """Every pair at or above the job's floor, by the configured method, resumable per unit."""
    t0 = time.time()
    for stale in (job.out_dir / "pairs").glob("*.parquet") if (job.out_dir / "pairs").exists() else []:
        prefix = "cells-" if job.cfg.method == "cells" else "pq-"
        if not stale.name.startswith(prefix):
            stale.unlink()                  # pairs of the other method never mix in
    stats = run_cells(job, ex) if job.cfg.method == "cells" else run_pq(job, ex)
    stats["seconds"] = round(time.time() - t0, 3)
    return stats


def search_job(run: Run) -> SearchJob:
    low = run.cfg.verify.low if run.cfg.pixel_check else None
    return SearchJob(run.embed_dir(), {s.index: s.name for s in run.shards}, run.dir("index"),
                     run.dir(NAME), run.cfg.search, run.fingerprint("index"), run.fingerprint(NAME), low)


def cross_targets(run: Run) -> list[tuple[str, Path]]:
    """(kind, index folder) of the other runs' indexes this run is searched against: `against`
    (incremental) and each evaluation set (decontamination)."""
    cross = [("against", Path(run.cfg.against))] if run.cfg.against else []
    return cross + [("leaks", Path(p)) for p in run.cfg.decontaminate.eval]


def units(run: Run) -> list[Marker]:
    if index_stage.indexed_rows(run) == 0:     # every row failed: no vector to search
        return []
    job = search_job(run)
    if job.cfg.method == "pq":
        own = [f"pq-{s.name}" for s in run.shards]
    else:
        own = [f"assign-{s.name}" for s in run.shards]
        if (job.index_dir / "centroids.npy").exists():
            own += [f"cells-{lo:06d}" for lo in range(0, n_cells(job.index_dir), job.cfg.cells_per_task)]
    out = [run.marker(NAME, u) for u in own]
    for kind, folder in cross_targets(run):
        out += [Marker(run.cross_dir(kind), f"{folder.name}-{s.name}") for s in run.shards]
    return out


def run(run: Run, ex, stats: dict) -> dict:
    if index_stage.indexed_rows(run) == 0:
        return {"shards": 0, "pairs": 0, "verified": 0, "candidates": 0}
    out = find_pairs(search_job(run), ex)
    for kind, folder in cross_targets(run):    # new rows against earlier runs' rows / evaluation sets
        got = registry.cross_search(run, ex, folder, kind, folder.name)
        out[f"{kind}_{folder.name}"] = got
        out["shards"] = out.get("shards", 0) + got["shards"]
    return out
