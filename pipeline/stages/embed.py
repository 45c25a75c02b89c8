"""embed: image bytes -> L2-normalised fp16 vectors per shard, in clip-retrieval layout
(sources without images, such as released embeddings, give their own vectors, validated).

Streaming: tar reads and decode+preprocess run as CPU tasks, the model runs in an actor pool, and
batches come back to the driver as they finish. A shard's files are written (temp name, replace,
done marker last) as soon as its last row arrives, so a crash loses at most the shards in flight.
Rows that cannot be decoded come back with their reason and land in embed/failed/NNNNN.parquet.
"""
from __future__ import annotations

import re
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.io import Marker, load_npy, write_json, write_npy, write_parquet
from ..core.run import Run
from ..core.vectors import emb_path, link_path, link_to, meta_path
from ..lib.images import crop_bytes
from ..lib.models import Embedder, Preprocess, preprocess_for
from ..lib.unionfind import exact_edges
from ..sources import Shard, source_for

NAME = "embed"
FIELDS = ("input", "embed.model")
META_COLUMNS = ["key", "gid", "url", "caption", "sha256"]
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")


def units(run: Run) -> list[Marker]:
    return [run.marker(NAME, s.name) for s in run.shards]


def read_rows(item: dict) -> list[dict]:
    """Ray flat_map: one shard item -> rows of (gid, shard, image bytes)."""
    wanted = dict(zip(item["members"], item["gids"]))
    t0 = time.perf_counter()
    shard = Shard(item["index"], item["shard"], Path(item["parquet"]), Path(item["data"]))
    rows = source_for(item["format"]).read_images(shard, wanted)
    per_row = (time.perf_counter() - t0) / max(len(rows), 1)
    return [{"gid": gid, "shard": item["shard"], "data": data, "t_read": per_row} for gid, data in rows]


def decode_error(exc: Exception) -> str:
    """A decoder's error as a row's reason, the same on every run: object addresses
    (`<_io.BytesIO object at 0x7f…>`) left out."""
    return "decode: " + _ADDRESS.sub(">", f"{type(exc).__name__}: {exc}")


def preprocess_batch(batch: dict, pp: Preprocess) -> dict:
    """Decode, resize and crop a batch to uint8 pixels (the model actor normalises: a quarter of
    the bytes to move); a row that fails keeps its place with zero pixels and a reason."""
    t0 = time.perf_counter()
    n = len(batch["gid"])
    pixels = np.zeros((n, pp.size, pp.size, 3), dtype=np.uint8)
    errors = np.full(n, "", dtype=object)
    for i, data in enumerate(batch["data"]):
        try:
            pixels[i] = crop_bytes(bytes(data), pp)
        except Exception as exc:  # any decoder error becomes the row's failure reason
            errors[i] = decode_error(exc)
    return {"gid": np.asarray(batch["gid"], dtype=np.int64), "shard": np.asarray(batch["shard"]),
            "pixels": pixels, "error": errors, "t_read": np.asarray(batch["t_read"], dtype=np.float64),
            "t_decode": np.full(n, (time.perf_counter() - t0) / max(n, 1))}


class EmbedActor:
    """Model actor: loads the spec once per worker and embeds the decodable rows of each batch."""

    def __init__(self, spec: str, threads: int = 0):
        # Ray pins OMP_NUM_THREADS to the actor's CPU request; on a CPU-only node the model
        # should use the cores the light decode tasks leave, so default to all of them.
        import os
        self.embedder = Embedder(spec, threads=threads or os.cpu_count() or 1)

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        vectors = np.zeros((len(ok), self.embedder.dim), dtype=np.float16)
        if ok.all():
            vectors[:] = self.embedder(batch["pixels"])
        elif ok.any():
            vectors[ok] = self.embedder(batch["pixels"][ok])
        return {"gid": batch["gid"], "shard": batch["shard"], "vector": vectors,
                "error": batch["error"].astype(str), "t_read": batch["t_read"], "t_decode": batch["t_decode"],
                "t_infer": np.full(len(ok), (time.perf_counter() - t0) / max(len(ok), 1))}


def _write_shard(run: Run, name: str, ingest: pa.Table, got: dict, fp: str, spec: str, dim: int) -> dict:
    gids = np.array(got["gid"], dtype=np.int64)
    order = np.argsort(gids)
    gids = gids[order]
    errors = np.array(got["error"], dtype=object)[order]
    vecs = np.stack(got["vector"])[order] if len(gids) else np.zeros((0, dim), np.float16)
    ok = errors == ""
    meta = ingest.filter(pa.compute.is_in(ingest["gid"], pa.array(gids[ok]))).sort_by("gid")
    out = run.embed_dir()
    files = [write_npy(emb_path(out, name), np.ascontiguousarray(vecs[ok], dtype=np.float16)),
             write_parquet(meta_path(out, name), meta.select(META_COLUMNS)),
             write_parquet(run.failed_file(name),
                           pa.table({"gid": pa.array(gids[~ok], pa.int64()),
                                     "error": pa.array(errors[~ok].tolist(), pa.string())}))]
    run.marker(NAME, name).write(fp, files, rows=int(ok.sum()), failed=int((~ok).sum()), model=spec)
    return {"rows": int(ok.sum()), "failed": int((~ok).sum())}


def _copy_precomputed(job: dict) -> dict:
    """A source with its own vectors: validated unit fp16 vectors of the ok rows, in the embed layout."""
    run, name = job["run"], job["name"]
    shard = run.shard_by_name[name]
    ingest = pq.read_table(run.ingest_file(name))
    ok = ingest.filter(pa.compute.equal(ingest["status"], "ok")).sort_by("gid")
    out = run.embed_dir()
    source = run.source.in_place(shard, ok["row"].to_numpy(), run.cfg.input)
    emb_path(out, name).unlink(missing_ok=True)
    link_path(out, name).unlink(missing_ok=True)
    if source is not None:        # read in place: a link, and the input file itself checked by the marker
        dim = int(load_npy(source, mmap=True).shape[1])
        files = [write_json(link_path(out, name), link_to(source)), Path(source)]
    else:
        vecs = run.source.unit_vectors(shard, ok["row"].to_numpy(), run.cfg.input)
        dim = int(vecs.shape[1])
        files = [write_npy(emb_path(out, name), vecs)]
    files += [write_parquet(meta_path(out, name), ok.select(META_COLUMNS)),
              write_parquet(run.failed_file(name),
                            pa.table({"gid": pa.array([], pa.int64()), "error": pa.array([], pa.string())}))]
    run.marker(NAME, name).write(run.fingerprint(NAME), files, rows=ok.num_rows, failed=0,
                                 model=run.cfg.embed.model, in_place=source is not None)
    return {"rows": ok.num_rows, "dim": dim, "in_place": source is not None}


def run(run: Run, ex, stats: dict) -> dict:
    if not run.source.HAS_IMAGES:
        t0 = time.time()
        pending = run.pending(NAME, run.shard_names())
        res = ex.map(_copy_precomputed, [{"run": run, "name": n} for n in pending], desc="embed", num_cpus=1)
        if res:
            write_json(run.embed_dir() / "model.json", {"model": run.cfg.embed.model, "dim": res[0]["dim"]})
        return {"shards": len(pending), "rows": sum(r["rows"] for r in res), "failed": 0,
                "shards_read_in_place": sum(r["in_place"] for r in res), "seconds": round(time.time() - t0, 3)}
    return _embed_images(run, ex)


def plan_copies(ingests: dict[str, pa.Table]) -> tuple[dict[str, pa.Table], dict[int, int]]:
    """Exact-copy skipping: of rows with equal image bytes (sha256) only the first (lowest gid)
    is embedded. Returns the rows to embed per shard and {copy gid: source gid}."""
    tables = [t.filter(pa.compute.equal(t["status"], "ok")).select(["gid", "sha256"]) for t in ingests.values()]
    allok = pa.concat_tables(tables).sort_by("gid") if tables else None
    copy_of: dict[int, int] = {}
    if allok is not None and allok.num_rows:
        gids = allok["gid"].to_numpy()
        head, copy = exact_edges(np.array(allok["sha256"].to_pylist(), dtype=object))
        copy_of = dict(zip(gids[copy].tolist(), gids[head].tolist()))
    todo = {}
    for name, t in ingests.items():
        ok = t.filter(pa.compute.equal(t["status"], "ok"))
        is_copy = np.isin(ok["gid"].to_numpy(), np.fromiter(copy_of, np.int64, len(copy_of)))
        todo[name] = ok.filter(pa.array(~is_copy))
    return todo, copy_of


class _Collector:
    """Gathers streamed rows per shard; writes a shard once its rows and its copies' sources are in."""

    PHASES = ("t_read", "t_decode", "t_infer")

    def __init__(self, run: Run, ingests, todo, copy_of):
        self.run, self.ingests, self.copy_of = run, ingests, copy_of
        self.expected = {n: t.num_rows for n, t in todo.items()}
        self.got = {n: {"gid": [], "vector": [], "error": []} for n in todo}
        self.copies: dict[str, list[int]] = {n: [] for n in todo}
        for c in copy_of:
            self.copies[run.shard_by_index[c >> 32].name].append(c)
        self.waiting = {n for n, c in self.copies.items() if c}   # shards that need others' vectors
        self.sources = {}                         # source gid -> (vector, error), kept for copies
        self.needed = set(copy_of.values())
        self.dim = 0
        self.stats = {"rows": 0, "failed": 0, "shards": len(todo), "copies_skipped": len(copy_of),
                      "read_s": 0.0, "decode_s": 0.0, "infer_s": 0.0, "write_s": 0.0}

    def add(self, batch: dict) -> None:
        self.dim = batch["vector"].shape[1]
        for phase, key in zip(self.PHASES, ("read_s", "decode_s", "infer_s")):
            self.stats[key] += float(np.sum(batch[phase]))
        touched = set()
        for i, name in enumerate(batch["shard"]):
            gid, vec, err = int(batch["gid"][i]), batch["vector"][i], str(batch["error"][i])
            got = self.got[str(name)]
            got["gid"].append(gid); got["vector"].append(vec); got["error"].append(err)
            if gid in self.needed:
                self.sources[gid] = (vec, err)
            touched.add(str(name))
        for name in touched | self.waiting:      # a shard may have waited on sources from others
            if name in self.got:
                self.try_flush(name)

    def try_flush(self, name: str) -> None:
        got = self.got[name]
        if len(got["gid"]) < self.expected[name] or not self.dim:
            return
        if any(self.copy_of[c] not in self.sources for c in self.copies[name]):
            return
        for c in self.copies[name]:
            vec, err = self.sources[self.copy_of[c]]
            got["gid"].append(c); got["vector"].append(vec); got["error"].append(err)
        t0 = time.perf_counter()
        fp = self.run.fingerprint(NAME)
        s = _write_shard(self.run, name, self.ingests[name], self.got.pop(name), fp, self.run.cfg.embed.model,
                         self.dim)
        self.waiting.discard(name)
        self.stats["write_s"] += time.perf_counter() - t0
        self.stats["rows"] += s["rows"]
        self.stats["failed"] += s["failed"]

    def finish(self) -> None:
        for name in list(self.got):
            self.try_flush(name)
        if self.got:
            raise RuntimeError(f"embed: shards {sorted(self.got)} did not receive all their rows")


def batch_size(configured: int, ex) -> int:
    """embed.batch_size, or by rule: 256 rows where the cluster has GPUs (the model actor halves it
    for good on a CUDA out-of-memory error), 32 on CPUs (larger batches only add latency there)."""
    return configured or (256 if getattr(ex, "num_gpus", 0) else 32)


def _embed_images(run: Run, ex) -> dict:
    cfg = run.cfg.embed
    pending = run.pending(NAME, run.shard_names())
    pp = preprocess_for(cfg.model)
    t0 = time.time()
    ingests = {name: pq.read_table(run.ingest_file(name)) for name in pending}
    todo, copy_of = plan_copies(ingests)
    items = [{"format": run.cfg.input.format, "index": run.shard_by_name[n].index, "shard": n,
              "parquet": str(run.shard_by_name[n].parquet), "data": str(run.shard_by_name[n].data),
              "members": t["member"].to_pylist(), "gids": t["gid"].to_pylist()} for n, t in todo.items() if t.num_rows]
    col = _Collector(run, ingests, todo, copy_of)
    if items:
        stream = ex.stream(items, read_rows, partial(preprocess_batch, pp=pp), EmbedActor,
                           (cfg.model, cfg.threads), batch_size(cfg.batch_size, ex), actors=cfg.actors,
                           decode_cpus=cfg.decode_cpus)
        for batch in stream:
            col.add(batch)
    if not col.dim and col.got:      # nothing decodable anywhere: the dimension still has to be known
        col.dim = Embedder(cfg.model).dim
    col.finish()
    if col.dim:
        write_json(run.embed_dir() / "model.json", {"model": cfg.model, "dim": col.dim, "preprocess": pp.to_dict()})
    stats = {k: round(v, 3) if isinstance(v, float) else v for k, v in col.stats.items()}
    stats["seconds"] = round(time.time() - t0, 3)
    stats["images_per_s"] = round(stats["rows"] / max(stats["seconds"], 1e-9), 2)
    return stats
