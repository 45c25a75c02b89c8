"""The IVF-PQ index at scale: trained once on a sample, each shard's vectors encoded by a task of
its own into a part file (its inverted lists only), the parts merged into one file of on-disk
inverted lists (FAISS OnDiskInvertedLists) that searches memory-map. No step holds more than one
shard's codes, and the encoding runs on every worker of the executor: the exact coarse
quantizer's nlist x d products a row (65,536 lists at LAION-2B: 10^8 flops, 0.8 ms of a core
here) are spread over every core of the cluster instead of one process.

Files, beside the index file NAME.faiss:
  NAME.faiss             the index: codec, quantizer, and where each list lies in the lists' file
  NAME.BUILD.ivfdata     every list's codes and ids (BUILD: the build's fingerprint; read from
                         the index file's own folder, wherever the folder has moved)
  NAME.parts/    while building only: trained.faiss, a part per shard, done markers
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..core.io import Marker, write_bytes
from ..core.vectors import VectorStore

CHUNK = 65536            # vectors added at a time


def read(path, writable: bool = False):
    """An index file with its on-disk lists (memory-mapped by FAISS; read-only unless `writable`),
    looked up beside the index file when the folder has moved since it was built."""
    import faiss
    flags = 0 if writable else faiss.IO_FLAG_READ_ONLY
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError:
        with _quiet():                 # FAISS prints where it now looks
            return faiss.read_index(str(path), flags | faiss.IO_FLAG_ONDISK_SAME_DIR)


@contextmanager
def _quiet():
    """FAISS's own progress lines on stdout (file resizing, moved lists) kept off the CLI's output."""
    import os
    import sys
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def train(store, counts: dict[int, int], codec: dict):
    """An empty IVF-PQ index of `codec`, trained on a seeded sample of `store`."""
    import faiss

    from .codec import sample
    seed = codec.get("seed", 0)
    index = faiss.index_factory(codec["d"], codec["factory"], faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed = seed
    xt = sample(store, counts, codec["train_size"], seed)
    need = max(1 << codec["bits"], codec["nlist"])
    if len(xt) < need:   # a corpus of a handful of rows: repeat it so every codebook can be trained
        xt = np.tile(xt, (-(-need // len(xt)), 1))
    # index_factory turns on polysemous training for IVF-PQ; search here uses ADC only, and that
    # training (simulated annealing on the codes) was 99.9% of train time (9.5 s vs 0.01 s, demo).
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False
    pq = getattr(ivf, "pq", None)
    if pq is not None:
        pq.cp.seed = seed
        if len(xt) < 39 * (1 << codec["bits"]):   # small corpus: train anyway, without the warning
            pq.cp.min_points_per_centroid = 1
    index.train(xt)
    return index


def encode_part(job: dict) -> dict:
    """One shard's vectors added to a copy of the trained index; its inverted lists written as
    a part file (the quantizer left out: an empty stand-in, the trained one is in trained.faiss)."""
    import faiss
    t0 = time.time()
    index = faiss.read_index(job["trained"])
    store = VectorStore(Path(job["embed_dir"]), {job["index"]: job["name"]})
    gids, vecs = store.shard(job["index"])
    for i in range(0, len(gids), CHUNK):
        index.add_with_ids(np.asarray(vecs[i:i + CHUNK], dtype=np.float32), gids[i:i + CHUNK])
    store.release(job["index"])
    ivf = faiss.extract_index_ivf(index)
    stand_in = faiss.IndexFlatIP(ivf.d)
    ivf.own_fields = False                 # the trained quantizer is freed with `index` below
    quantizer, ivf.quantizer = ivf.quantizer, stand_in
    path = Path(job["out"])
    write_bytes(path, faiss.serialize_index(index).tobytes())
    ivf.quantizer = quantizer
    Marker(path.parent, job["name"]).write(job["fp"], [path], rows=len(gids))
    return {"rows": len(gids), "seconds": time.time() - t0}


def merge(trained, lists: list, path: Path, data: Path) -> int:
    """The trained index with every list of `lists` (InvertedLists, in order) merged into the
    on-disk lists `data` (beside `path`), written as `path`; returns the rows it holds."""
    import faiss
    ivf = faiss.extract_index_ivf(trained)
    data.unlink(missing_ok=True)
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(data))
    vec = faiss.InvertedListsPtrVector()
    for il in lists:
        vec.push_back(il)
    n = ondisk.merge_from_multiple(vec.data(), vec.size(), False)
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()
    trained.ntotal = ivf.ntotal = n
    write_bytes(path, faiss.serialize_index(trained).tobytes())
    return int(n)


def build(path, store, counts: dict[int, int], codec: dict, ex=None, base=None) -> dict:
    """The IVF-PQ index of `codec` over `store`'s shards `counts` at `path` (and PATH.ivfdata),
    trained on a sample, encoded a shard per task on `ex` (in this process without one),
    resumable per shard. With `base` (an index file), the rows are added to a copy of that
    index's lists with its trained codec (an incremental run; `base` is never written).
    Returns codec with the row count and timings."""
    import faiss
    path = Path(path)
    parts = path.with_suffix(".parts")
    parts.mkdir(parents=True, exist_ok=True)
    shards = {i: store.source(i) for i in sorted(counts)}
    fp = hashlib.sha256(json.dumps([codec.get("factory"), codec.get("seed"), codec.get("train_size"),
                                    str(base), sorted(shards.items())], default=str).encode()).hexdigest()[:16]
    t0 = time.time()
    trained_file = parts / "trained.faiss"
    if not Marker(parts, "trained").valid(fp):
        if base is not None:        # the earlier index's codec, its lists emptied
            empty = read(base, writable=True)
            ivf = faiss.extract_index_ivf(empty)
            fresh = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
            ivf.replace_invlists(fresh, True)
            fresh.this.disown()         # the index owns it now
            empty.ntotal = ivf.ntotal = 0
        else:
            empty = train(store, counts, codec)
        write_bytes(trained_file, faiss.serialize_index(empty).tobytes())
        Marker(parts, "trained").write(fp, [trained_file])
    train_s = time.time() - t0
    jobs = [{"trained": str(trained_file), "embed_dir": str(d), "index": i, "name": name,
             "out": str(parts / f"{name}.faiss"), "fp": fp}
            for i, (d, name) in shards.items() if not Marker(parts, name).valid(fp)]
    if ex is not None:
        ex.map(encode_part, jobs, desc="index: IVF-PQ encode", num_cpus=1)
    else:
        for job in jobs:
            encode_part(job)
    add_s = time.time() - t0 - train_s
    t1 = time.time()
    # the parts' lists memory-mapped, not loaded: the merge never holds every shard's codes
    found = [faiss.read_index(str(parts / f"{name}.faiss"), faiss.IO_FLAG_MMAP) for _, name in shards.values()]
    lists = [faiss.extract_index_ivf(p).invlists for p in found]
    old = read(base) if base is not None else None
    if old is not None:
        lists.insert(0, faiss.extract_index_ivf(old).invlists)
    trained = faiss.read_index(str(trained_file))
    code_size = int(faiss.extract_index_ivf(trained).code_size)
    # the lists' file is named by this build: a new index never overwrites the lists the index
    # it replaces (or extends, with `base`) still reads; those go once the new index is in place
    data = path.with_name(f"{path.stem}.{fp}.ivfdata")
    with _quiet():
        n = merge(trained, lists, path, data)
    del found, lists, old
    for stale in path.parent.glob(f"{path.stem}.*.ivfdata"):
        if stale != data:
            stale.unlink()
    shutil.rmtree(parts)
    return {**codec, "ntotal": n, "train_s": round(train_s, 3), "add_s": round(add_s, 3),
            "merge_s": round(time.time() - t1, 3), "bytes_per_vector": code_size + 8, "ivfdata": data.name}
