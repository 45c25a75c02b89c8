"""The codecs an index folder holds: the cell-join codec (projection + cells, see celljoin.py) and
a FAISS IVF-PQ codec ([OPQ] -> IVF -> PQ, inner product) chosen by rule from the row count, the
dimension and a bytes/vector budget, trained once on a seeded sample, every vector added with its
global id. Files (written by their callers, see stages/index.py and stages/register.py):
  projection.npy, centroids.npy [, coarse.npy]   the cell-join codec
  codec.json       factory string, dimension, model spec, fingerprint, bytes per vector
  index.faiss      a populated IVF-PQ index (read memory-mapped by search workers)
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from ..core.io import read_json, write_json, write_npy
from ..core.vectors import VectorStore


class IndexMismatch(RuntimeError):
    """The index on disk does not belong to this run (foreign or stale)."""


def choose_codec(n: int, d: int, nlist: int = 0, m: int = 0, bits: int = 8, opq: bool | None = None,
                 bytes_per_vector: int = 16) -> dict:
    """Codec parameters by rule, from the row count, the dimension and a memory budget.

    IVF cells: about 4 sqrt(n), at least 39 training points each, an exact (flat) coarse
    quantizer: an HNSW graph over the centroids measured slower and lossy here (768-d random
    centroids, 12,649 lists: 84 us a row flat, 463 us at efSearch 128 finding 76 % of a query's
    8 lists; 65,536 lists: 401 us flat, 938 us finding 38 %; trained ones: bench/results/
    ivf_build.md); the build spreads the flat cost over tasks. PQ: the largest number of
    sub-quantizers whose codes plus the 8-byte id fit `bytes_per_vector` and that divides d.
    OPQ (a learned rotation) only when asked: its training dominated the build time.
    """
    if not nlist:
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39, 65536))
    bits = max(1, min(bits, int(math.log2(max(n, 2)))))   # PQ needs >= 2**bits training points
    if not m:
        code_budget = max(1, (bytes_per_vector - 8) * 8 // bits)
        m = max(x for x in range(1, min(code_budget, d) + 1) if d % x == 0)
    if d % m:
        raise ValueError(f"codec.pq_m={m} must divide the vector dimension {d}")
    opq = bool(opq)   # measured: OPQ training on 50k x 768 took 140 s here; opt in with codec.opq
    factory = f"{'OPQ%d,' % m if opq else ''}IVF{nlist},PQ{m}x{bits}"
    code_bytes = (m * bits + 7) // 8
    return {"factory": factory, "d": d, "nlist": nlist, "m": m, "bits": bits, "opq": opq,
            "bytes_per_vector": code_bytes + 8,
            "estimated_index_bytes": n * (code_bytes + 8) + nlist * d * 4 + d * d * 4 * opq}


CELL_SAMPLE = 2_000_000   # projected rows k-means sees at most (64-d float32, search.cell_dim: 0.5 GB)
CELL_POINTS = 100         # and per cell (flat cells; nested: NESTED_POINTS, 4x the cells at the defaults)
NESTED_POINTS = 40
PROJ_ROWS = 20_000        # sample rows the projection is trained on
SAMPLE_RUN = 16           # rows a sample takes together (768-d fp16: 24 KB, six pages)


def sample(store: VectorStore, counts: dict[int, int], size: int, seed: int,
           proj: np.ndarray | None = None) -> np.ndarray:
    """A seeded sample of about `size` vectors, read shard by shard (projected by `proj` as they
    are read, when given): runs of SAMPLE_RUN consecutive rows, each kept with the same chance, so
    a 10 % sample reads 10 % of the vector files' pages (single rows drawn apart touch nearly every
    page: 1.5 KB rows, 4 KB pages). The rows are drawn first and read into one array, 8,192 at a
    time: no float32 copy of a shard's part beside it (the index stage's peak was twice the sample)."""
    total = sum(counts.values())
    frac = min(1.0, size / max(total, 1))
    rng = np.random.default_rng(seed)
    shards = [(index, store.shard(index)[1]) for index in sorted(counts)]
    picks = []
    for _, vecs in shards:
        keep = rng.random(-(-len(vecs) // SAMPLE_RUN)) < frac
        picks.append(np.nonzero(np.repeat(keep, SAMPLE_RUN)[:len(vecs)])[0] if frac < 1 else np.arange(len(vecs)))
    out = np.empty((sum(len(p) for p in picks), store.dim if proj is None else len(proj)), np.float32)
    at = 0
    for (index, vecs), pick in zip(shards, picks):
        for s in range(0, len(pick), 8192):
            part = vecs[pick[s:s + 8192]]
            out[at:at + len(part)] = part if proj is None else np.asarray(part, np.float32) @ proj.T
            at += len(part)
        store.release(index)
    return out


def train_all(store: VectorStore, counts: dict[int, int], c, out, fp: str, model: str,
              cells: int = 0, proj_dim: int = 128, ivfpq: bool = True,
              cell_rows: int = 250, ex=None, cell_dim: int = 64, nested: bool = True) -> tuple[dict, list[Path]]:
    """Train and write what search needs into `out`: the cell-join codec, codec.json, and the
    IVF-PQ index when `ivfpq` (else only its codec is chosen and recorded: a run searched by later
    runs has it built from the registered rows on first use). `cell_dim`: search.cell_dim (the
    same default). Returns codec.json and the files."""
    from . import celljoin
    out = Path(out)
    n = sum(counts.values())
    codec = choose_codec(n, store.dim, c.nlist, c.pq_m, c.pq_bits, c.opq, c.bytes_per_vector)
    codec.update(train_size=c.train_size, seed=c.seed, model=model, fingerprint=fp, ntotal=0)
    for old in [out / "index.faiss", *out.glob("index.*.ivfdata")]:   # never reuse an earlier build
        old.unlink(missing_ok=True)
    files = []
    t0 = time.time()
    # cells of about cell_rows rows; k-means takes `points` points a cell (see train_cells) up to
    # CELL_SAMPLE points, held projected; the projection is trained on >= 20k rows
    n_cells = cells or max(1, round(n / cell_rows))
    points = NESTED_POINTS if nested else CELL_POINTS
    xt = sample(store, counts, min(c.train_size, max(20_000, points * n_cells)), c.seed + 1)
    # the projection from PROJ_ROWS of the sample, evenly spaced: the top directions of 768-d vectors
    # are found as well from 20 k rows as from 100 k (energy kept 0.99147 vs 0.99157 at 1 M rows;
    # the join's candidates 5 % fewer, chance), at a fifth of the product (0.41 -> 0.13 s)
    proj = celljoin.train_projection(xt[::max(1, len(xt) // PROJ_ROWS)], min(proj_dim or store.dim, store.dim))
    want = min(CELL_SAMPLE, points * n_cells)
    head = proj[:cell_dim or None]    # the cells live in the projection's first cell_dim dims
    zt = celljoin.project(xt, head)[0] if want <= len(xt) else sample(store, counts, want, c.seed + 2, head)
    n_cells = min(n_cells, len(zt))
    centroids, coarse = celljoin.train_cells(zt, n_cells, c.seed, two_levels=nested)
    if nested:            # search.assign = nested: always two levels, assigned as celljoin.Nested
        info = {"assign": f"nested {len(coarse)} x {len(centroids) / len(coarse):.0f}"}
    else:
        _, info = celljoin.cell_index(centroids, coarse, zt[:20_000])
    files += [write_npy(out / "projection.npy", proj), write_npy(out / "centroids.npy", centroids)]
    (out / "coarse.npy").unlink(missing_ok=True)
    if coarse is not None and (nested or "assign_nprobe" in info):   # two levels kept (flat: where they prune)
        files.append(write_npy(out / "coarse.npy", coarse))
    codec.update(cells=n_cells, cell_rows=round(n / max(n_cells, 1), 1), proj_dim=int(proj.shape[0]),
                 cell_dim=int(centroids.shape[1]),
                 cells_train_rows=len(zt), **info, cells_train_s=round(time.time() - t0, 3))
    if ivfpq:
        codec = write_ivfpq(out / "index.faiss", store, counts, codec, ex)
        files += [out / "index.faiss", out / codec["ivfdata"]]
    files.append(write_json(out / "codec.json", codec))
    return codec, files


def write_ivfpq(path: Path, store, counts: dict[int, int], codec: dict, ex=None) -> dict:
    """Build the IVF-PQ index of `codec` from `store`'s vectors at `path` (lib/ivfbuild.py: a
    task per shard on `ex`, on-disk lists); returns codec with its size and timings."""
    from . import ivfbuild
    return ivfbuild.build(path, store, counts, codec, ex)


def check(folder, fingerprint: str | None = None) -> dict:
    """The codec.json of this product's index; refuses a foreign or stale index before it is read."""
    folder = Path(folder)
    meta_path = folder / "codec.json"
    if not meta_path.exists():
        raise IndexMismatch(f"{folder}: no codec.json; not an index built by dedup2b")
    meta = read_json(meta_path)
    if fingerprint and meta.get("fingerprint") != fingerprint:
        raise IndexMismatch(f"{folder}: index fingerprint {meta.get('fingerprint')} != this run's "
                          f"{fingerprint} (built with another model/codec/input); rebuild it")
    return meta


def load(folder, fingerprint: str | None = None, mmap: bool = True):
    """Open this product's index (checked first, see `check`)."""
    from . import ivfbuild
    folder = Path(folder)
    meta = check(folder, fingerprint)
    return ivfbuild.read(folder / "index.faiss", writable=not mmap), meta
