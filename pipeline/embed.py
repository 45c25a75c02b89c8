"""embed: image bytes -> L2-normalised fp16 vectors per shard, in clip-retrieval layout.

Streaming: tar reads and decode+preprocess run as CPU tasks, the model runs in an actor pool, and
batches come back to the driver as they finish. A shard's files are written (temp name, replace,
done marker last) as soon as its last row arrives, so a crash loses at most the shards in flight.
Rows that cannot be decoded come back with their reason and land in embed/failed/NNNNN.parquet.
"""
from __future__ import annotations

import time
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .images import preprocess_bytes
from .ingest import read_images
from .io import write_json, write_npy, write_parquet
from .models import Embedder, Preprocess, preprocess_for
from .run import Run
from .vectors import emb_path, meta_path

META_COLUMNS = ["key", "gid", "url", "caption", "sha256"]


def read_rows(item: dict) -> list[dict]:
    """Ray flat_map: one shard item -> rows of (gid, shard, image bytes)."""
    wanted = dict(zip(item["members"], item["gids"]))
    return [{"gid": gid, "shard": item["shard"], "data": data}
            for gid, data in read_images(item["tar"], wanted)]


def preprocess_batch(batch: dict, pp: Preprocess) -> dict:
    """Decode + preprocess a batch; a row that fails keeps its place with zero pixels and a reason."""
    n = len(batch["gid"])
    pixels = np.zeros((n, 3, pp.size, pp.size), dtype=np.float32)
    errors = np.full(n, "", dtype=object)
    for i, data in enumerate(batch["data"]):
        try:
            pixels[i] = preprocess_bytes(bytes(data), pp)
        except Exception as exc:  # any decoder error becomes the row's failure reason
            errors[i] = f"decode: {type(exc).__name__}: {exc}"
    return {"gid": np.asarray(batch["gid"], dtype=np.int64), "shard": np.asarray(batch["shard"]),
            "pixels": pixels, "error": errors}


class EmbedActor:
    """Model actor: loads the spec once per worker and embeds the decodable rows of each batch."""

    def __init__(self, spec: str, threads: int = 0):
        # Ray pins OMP_NUM_THREADS to the actor's CPU request; on a CPU-only node the model
        # should use the cores the light decode tasks leave, so default to all of them.
        import os
        self.embedder = Embedder(spec, threads=threads or os.cpu_count() or 1)

    def __call__(self, batch: dict) -> dict:
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        vectors = np.zeros((len(ok), self.embedder.dim), dtype=np.float16)
        if ok.any():
            vectors[ok] = self.embedder(batch["pixels"][ok]).astype(np.float16)
        return {"gid": batch["gid"], "shard": batch["shard"], "vector": vectors,
                "error": batch["error"].astype(str)}


def _write_shard(run: Run, name: str, ingest: pa.Table, got: dict, fp: str, spec: str, dim: int) -> dict:
    gids = np.array(got["gid"], dtype=np.int64)
    order = np.argsort(gids)
    gids = gids[order]
    errors = np.array(got["error"], dtype=object)[order]
    vecs = np.stack(got["vector"])[order] if len(gids) else np.zeros((0, dim), np.float16)
    ok = errors == ""
    meta = ingest.filter(pa.compute.is_in(ingest["gid"], pa.array(gids[ok]))).sort_by("gid")
    out = run.dir("embed")
    files = [write_npy(emb_path(out, name), np.ascontiguousarray(vecs[ok], dtype=np.float16)),
             write_parquet(meta_path(out, name), meta.select(META_COLUMNS)),
             write_parquet(out / "failed" / f"{name}.parquet",
                           pa.table({"gid": pa.array(gids[~ok], pa.int64()),
                                     "error": pa.array(errors[~ok].tolist(), pa.string())}))]
    run.marker("embed", name).write(fp, files, rows=int(ok.sum()), failed=int((~ok).sum()), model=spec)
    return {"rows": int(ok.sum()), "failed": int((~ok).sum())}


def _copy_precomputed(job: dict) -> dict:
    """Embeddings input: validated unit fp16 vectors of the ok rows, in the embed layout."""
    from .embeddings import unit_vectors
    run, name = job["run"], job["name"]
    shard = next(s for s in run.shards if s.name == name)
    ingest = pq.read_table(run.dir("ingest") / f"{name}.parquet")
    ok = ingest.filter(pa.compute.equal(ingest["status"], "ok")).sort_by("gid")
    vecs = unit_vectors(shard, ok["row"].to_numpy(), run.cfg.input.renormalize, run.cfg.input.norm_tolerance)
    out = run.dir("embed")
    files = [write_npy(emb_path(out, name), vecs), write_parquet(meta_path(out, name), ok.select(META_COLUMNS)),
             write_parquet(out / "failed" / f"{name}.parquet",
                           pa.table({"gid": pa.array([], pa.int64()), "error": pa.array([], pa.string())}))]
    run.marker("embed", name).write(run.cfg.fingerprint("embed"), files, rows=ok.num_rows, failed=0,
                                    model=run.cfg.embed.model)
    return {"rows": ok.num_rows, "dim": int(vecs.shape[1])}


def run_stage(run: Run, ex) -> dict:
    if run.cfg.input.format == "embeddings":
        t0 = time.time()
        pending = run.pending("embed", run.shard_names())
        res = ex.map(_copy_precomputed, [{"run": run, "name": n} for n in pending], desc="embed", num_cpus=1)
        if res:
            write_json(run.dir("embed") / "model.json", {"model": run.cfg.embed.model, "dim": res[0]["dim"]})
        return {"shards": len(pending), "rows": sum(r["rows"] for r in res), "failed": 0,
                "seconds": round(time.time() - t0, 3)}
    cfg = run.cfg.embed
    fp = run.cfg.fingerprint("embed")
    pending = run.pending("embed", run.shard_names())
    pp = preprocess_for(cfg.model)
    t0 = time.time()
    ingests = {name: pq.read_table(run.dir("ingest") / f"{name}.parquet") for name in pending}
    by_name = {s.name: s for s in run.shards}
    items, expected = [], {}
    for name in pending:
        ok = ingests[name].filter(pa.compute.equal(ingests[name]["status"], "ok"))
        expected[name] = ok.num_rows
        items.append({"tar": str(by_name[name].data), "shard": name,
                      "members": ok["member"].to_pylist(), "gids": ok["gid"].to_pylist()})
    received = {name: {"gid": [], "vector": [], "error": []} for name in pending}
    dim = 0
    stats = {"rows": 0, "failed": 0, "shards": len(pending)}

    def flush(name: str) -> None:
        s = _write_shard(run, name, ingests[name], received.pop(name), fp, cfg.model, dim)
        stats["rows"] += s["rows"]
        stats["failed"] += s["failed"]

    for name in [n for n in pending if expected[n] == 0]:
        flush(name)
    live = [it for it in items if expected[it["shard"]] > 0]
    if live:
        stream = ex.stream(live, read_rows, partial(preprocess_batch, pp=pp), EmbedActor,
                           (cfg.model, cfg.threads), cfg.batch_size, actors=cfg.actors,
                           decode_cpus=cfg.decode_cpus)
        for batch in stream:
            dim = batch["vector"].shape[1]
            for i, name in enumerate(batch["shard"]):
                got = received[str(name)]
                got["gid"].append(int(batch["gid"][i]))
                got["vector"].append(batch["vector"][i])
                got["error"].append(str(batch["error"][i]))
                if len(got["gid"]) == expected[str(name)]:
                    flush(str(name))
    if received:
        raise RuntimeError(f"embed: shards {sorted(received)} did not receive all their rows")
    if dim:
        write_json(run.dir("embed") / "model.json", {"model": cfg.model, "dim": dim, "preprocess": pp.to_dict()})
    stats["seconds"] = round(time.time() - t0, 3)
    stats["images_per_s"] = round(stats["rows"] / max(stats["seconds"], 1e-9), 2)
    return stats
