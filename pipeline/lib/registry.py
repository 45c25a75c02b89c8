"""A built index that later runs search against: the shared step of incremental dedup
(`dedup2b run --against NAME`) and evaluation-set decontamination (`dedup2b decontaminate`).

An index folder (index_dir) holds the index stage's codecs (codec.json, projection.npy,
centroids.npy) and, written by the register stage alone, registry/:
  registry.parquet   every row the index holds: gid, key, group_id, text (normalised caption), run
  runs.json          the runs whose vectors it holds: run dir, embed dir, shards {index: name}
  index.faiss        the IVF-PQ index of every registered row, once an incremental run extended it
                     (its inverted lists in index.BUILD.ivfdata beside it, lib/ivfbuild.py)
An incremental run extends the folder it searched: its rows are added to registry/index.faiss
(encoded with the trained codec) and to the registry. Rows of the run itself are never read back
as "old" rows, so a rerun after a crash does not match a run against its own rows.

Cross search (per query shard, resumable): each query row's search.cross_k nearest registered rows
by the IVF-PQ estimate (k grows where the k-th still matches), every candidate re-scored exactly
against the target's stored fp16 vectors (knn_matches); pairs with exact cosine >= threshold are
written as search/<kind>/<name>-NNNNN.parquet
(gid = query row, other_gid = target row, similarity). When the target holds no index.faiss yet,
the searching run builds it into its own search/targets/NAME.faiss (never into the target).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.io import Marker, parquet_writer, read_json, write_json, write_parquet
from ..core.vectors import StoreUnion, VectorStore
from . import codec as codec_lib
from . import ivfbuild


class TargetError(RuntimeError):
    """The index searched against is missing, foreign, or made with another model."""


def registry_dir(folder) -> Path:
    return Path(folder) / "registry"


def _runs(folder: Path) -> list[dict]:
    path = registry_dir(folder) / "runs.json"
    return read_json(path)["runs"] if path.exists() else []


class Target(StoreUnion):
    """A built, registered index folder and the stored vectors of the rows it holds (the rows of
    `exclude_run` left out)."""

    def __init__(self, folder, model: str, exclude_run: str | Path | None = None):
        self.folder = Path(folder)
        if not (registry_dir(self.folder) / "registry.parquet").exists():
            if (self.folder / "registry.parquet").exists():
                raise TargetError(f"{self.folder}: an index written by an earlier dedup2b (registry.parquet "
                                  "beside codec.json; this version keeps it in registry/): rebuild it with "
                                  "`dedup2b run` into a new --index-dir")
            raise TargetError(f"{self.folder}: no registry/registry.parquet; build it first with a full "
                              "`dedup2b run` whose --index-dir is this folder")
        meta = read_json(self.folder / "codec.json")
        if meta.get("model") != model:
            raise TargetError(f"{self.folder}: built with model {meta.get('model')!r}, this run uses {model!r}; "
                              "vectors of different models cannot be compared")
        self.skip = str(Path(exclude_run).resolve()) if exclude_run else None
        self.runs = [r for r in _runs(self.folder) if r["run_dir"] != self.skip]
        super().__init__([VectorStore(Path(r["embed_dir"]), {int(k): v for k, v in r["shards"].items()})
                          for r in self.runs])

    @functools.cached_property
    def registry(self):
        """The registered rows (gid, key, group_id, text, run), read on first use only: search
        tasks need the vectors, not the registry."""
        reg = pq.read_table(registry_dir(self.folder) / "registry.parquet").to_pandas()
        return reg[reg["run"] != self.skip].reset_index(drop=True) if self.skip else reg

    def version(self) -> str:
        """A digest of the registered runs: a copy of the index built for another version is stale."""
        path = registry_dir(self.folder) / "runs.json"
        return hashlib.sha256(path.read_bytes() + (self.skip or "").encode()).hexdigest()[:16]

    def index_file(self, run, ex=None) -> Path:
        """The target's IVF-PQ index: its registry's, else one this run built of the registered rows
        (search/targets/NAME.faiss, marked with the registry's version)."""
        own = registry_dir(self.folder) / "index.faiss"
        if own.exists():
            return own
        path = run.target_index_file(self.folder.name)
        done = Marker(path.parent, self.folder.name)
        if not done.valid(self.version()):
            codec = read_json(self.folder / "codec.json")
            counts = {i: len(self.shard(i)[0]) for i in sorted(self.shard_indexes())}
            built = codec_lib.write_ivfpq(path, self, counts, codec, ex)
            done.write(self.version(), [path, path.parent / built["ivfdata"]])
        return path


def check_against(run) -> None:
    """Before any work: the folder is a registered index of the same model, and this run's shard
    numbers (the high half of every gid) are not already in it."""
    target = Target(run.cfg.against, run.cfg.embed.model, run.root)
    clash = {s.index for s in run.shards} & target.shard_indexes()
    if clash:
        raise TargetError(f"{run.cfg.against} already holds shard numbers {sorted(clash)[:5]} from another run; "
                          "an increment's shard files must continue the numbering (rename e.g. 00000.tar/.parquet "
                          "to the next free number): gid = shard << 32 | row must stay unique")


def knn_matches(index, vecs: np.ndarray, other, threshold: float, keep_ids, k: int = 16,
                k_max: int = 4096, batch: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(query row, target gid, exact cosine) for every candidate at or above `threshold`: each
    query's k nearest rows by the index's estimate, re-scored exactly against the stored vectors
    (`other.get`). A nearest-neighbour search, not a range search: a short code's estimates
    shrink (1 M x 768 at 16 B/vector estimates cosines of 0.98 at 0.68-0.76, under any fixed
    radius), but the order they give still puts a copy first. k grows (x4) for the queries whose
    k-th candidate still reaches the threshold exactly, so an earlier group of thousands of
    copies is not cut at k. `keep_ids(ids)` says which target ids count (registered rows).
    The fourth value: how many candidates were re-scored."""
    scored = 0
    rows, ids_out, sims = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for i in range(0, len(vecs), batch):
        q = np.ascontiguousarray(vecs[i:i + batch], dtype=np.float32)
        todo, kk = np.arange(len(q)), min(k, index.ntotal)
        while len(todo) and kk > 0:
            _, ids = index.search(q[todo], kk)
            row = np.repeat(todo, kk)
            flat = ids.reshape(-1).astype(np.int64)
            ok = flat >= 0
            ok[ok] = keep_ids(flat[ok])
            sim = np.full(len(flat), -np.inf, np.float32)
            scored += int(ok.sum())
            if ok.any():
                sim[ok] = np.einsum("ij,ij->i", q[row[ok]], other.get(flat[ok]))
            hit = sim >= threshold
            full = hit.reshape(len(todo), kk)[:, -1] & (kk < min(k_max, index.ntotal))
            done = ~np.repeat(full, kk)         # queries that grow take their larger k's answer
            rows.append(i + row[hit & done]); ids_out.append(flat[hit & done]); sims.append(sim[hit & done])
            todo, kk = todo[full], min(kk * 4, k_max, index.ntotal)
    return np.concatenate(rows), np.concatenate(ids_out), np.concatenate(sims), scored


def search_shard(job: dict) -> dict:
    """Pairs (query row, target row) with exact cosine >= threshold for one query shard."""
    out_dir, unit = Path(job["out_dir"]), job["unit"]
    import faiss
    target = Target(job["target"], job["model"], job["run_dir"])
    store = VectorStore(Path(job["embed_dir"]), {job["index"]: job["shard"]})
    gids, vecs = store.shard(job["index"])
    index = ivfbuild.read(job["index_file"])
    faiss.extract_index_ivf(index).nprobe = job["nprobe"]
    own = np.array(sorted(target.shard_indexes()), np.int64)
    # rows of runs the registry holds (never this run's own rows)
    row, b, sim, scored = knn_matches(index, vecs, target, job["threshold"], lambda ids: np.isin(ids >> 32, own),
                              k=job["k"])
    a = gids[row]
    path = write_parquet(out_dir / f"{unit}.parquet", pa.table(
        {"gid": a, "other_gid": b, "similarity": sim.astype(np.float32)}).sort_by([("gid", "ascending"),
                                                                                ("other_gid", "ascending")]))
    Marker(out_dir, unit).write(job["fp"], [path], candidates=scored, pairs=len(a))
    return {"candidates": scored, "pairs": len(a)}


def cross_search(run, ex, target_folder: Path, kind: str, name: str) -> dict:
    """Cross-search every shard of `run` against `target_folder`; pairs under search/<kind>/."""
    cfg = run.cfg
    target = Target(target_folder, cfg.embed.model, run.root)   # fails early, naming the folder
    index_file = target.index_file(run, ex)
    out_dir = run.cross_dir(kind)
    fp = run.fingerprint("search")
    jobs = [{"target": str(target_folder), "model": cfg.embed.model, "run_dir": str(run.root),
             "embed_dir": str(run.embed_dir()), "index": s.index, "shard": s.name, "out_dir": str(out_dir),
             "unit": f"{name}-{s.name}", "fp": fp, "threshold": cfg.search.threshold, "index_file": str(index_file),
             "k": cfg.search.cross_k, "nprobe": cfg.search.nprobe}
            for s in run.shards if not Marker(out_dir, f"{name}-{s.name}").valid(fp)]
    results = ex.map(search_shard, jobs, desc=f"search: {kind} {name}", num_cpus=1)
    return {"shards": len(jobs), "candidates": sum(r["candidates"] for r in results),
            "pairs": sum(r["pairs"] for r in results)}


def pairs(run, kind: str, name: str | None = None) -> pa.Table:
    folder = run.cross_dir(kind)
    files = sorted(folder.glob(f"{name + '-' if name else ''}*.parquet")) if folder.exists() else []
    empty = pa.table({"gid": pa.array([], pa.int64()), "other_gid": pa.array([], pa.int64()),
                      "similarity": pa.array([], pa.float32())})
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else empty


REGISTRY_SCHEMA = pa.schema([("gid", pa.int64()), ("key", pa.string()), ("group_id", pa.int64()),
                             ("text", pa.string()), ("run", pa.string())])


def register(run, n_rows: int, shard_rows, ex=None) -> dict:
    """Make this run searchable by later runs: the registry of its own index folder, or, for an
    incremental run, of the folder it searched against (rows added to index.faiss and the registry).
    `shard_rows` yields (gids, keys, group ids, texts) a shard at a time; the registry is written
    as they come (an earlier registry's rows first, row group by row group), so memory holds one
    shard's strings. Writes only run.dir("register"); returns its stats."""
    cfg = run.cfg
    out = run.dir("register")
    me = str(run.root.resolve())
    # a run's own index folder holds that run alone; an incremental run adds itself to the list
    runs = [r for r in _runs(Path(cfg.against)) if r["run_dir"] != me] if cfg.against else []
    entry = {"run_dir": me, "embed_dir": str(run.embed_dir().resolve()),
             "shards": {str(s.index): s.name for s in run.shards}, "rows": n_rows}
    if cfg.against and not any(r.get("added") == me for r in _runs(Path(cfg.against))):
        base = Target(cfg.against, cfg.embed.model, run.root).index_file(run, ex)   # add this run's vectors once
        codec = read_json(Path(cfg.against) / "codec.json")
        store = run.vectors()
        counts = {s.index: len(store.shard(s.index)[0]) for s in run.shards}
        ivfbuild.build(out / "index.faiss", store, {i: n for i, n in counts.items() if n}, codec, ex, base=base)
    if cfg.against:
        entry["added"] = me
    total = 0
    with parquet_writer(out / "registry.parquet", REGISTRY_SCHEMA) as w:
        if cfg.against and (out / "registry.parquet").exists():
            old = pq.ParquetFile(out / "registry.parquet")
            for g in range(old.num_row_groups):
                t = old.read_row_group(g).select(REGISTRY_SCHEMA.names)
                t = t.filter(pa.compute.not_equal(t["run"], me)).cast(REGISTRY_SCHEMA)
                w.write_table(t)
                total += t.num_rows
        for gids, keys, group_ids, texts in shard_rows:
            w.write_table(pa.table({"gid": pa.array(gids, pa.int64()), "key": keys,
                                    "group_id": pa.array(group_ids, pa.int64()), "text": texts,
                                    "run": pa.array([me] * len(gids), pa.string())}, schema=REGISTRY_SCHEMA))
            total += len(gids)
    write_json(out / "runs.json", {"runs": runs + [entry]})
    return {"registered": str(Path(out).parent), "rows": total}
