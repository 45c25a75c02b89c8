"""Precomputed embeddings as input (LAION's released CLIP vectors, clip-retrieval layout).

    FOLDER/img_emb/img_emb_NNNN.npy        float16/float32, one row per sample
    FOLDER/metadata/metadata_NNNN.parquet  rows aligned with the npy (url, caption, key, ...)

Validated before any work: paired files, row counts, 2-D shape, one dimension for all shards,
dtype. Per row: non-finite or zero vectors are failed rows with a reason; norms off 1 by more
than `norm_tolerance` are an error naming the file unless `input.renormalize` is set. Files are
memory-mapped and processed in chunks: a 2-billion-row corpus is never held in RAM.
Keys come from the metadata's `key` column, else NNNN_ROW; the uid from its `uid`, else
blake2b(url + caption), so keep-lists survive reordering.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core.io import load_npy
from .base import SCHEMA, InputError, Shard, as_text, content_uid, make_gid, normalize_uid

FORMAT = "embeddings"
HAS_IMAGES = False    # vectors only: nothing to decode, nothing to copy on export
TAR_SHARDS = False

_NPY_RE = re.compile(r"^img_emb_(\d+)\.npy$")
CHUNK = 65536


LOOKS_FOR = "img_emb/img_emb_NNNN.npy + metadata/metadata_NNNN.parquet (clip-retrieval embeddings)"


def detect(folder: Path) -> bool:
    """Whether a folder holds released embeddings: img_emb/ with an img_emb_NNNN.npy, and metadata/."""
    emb = Path(folder) / "img_emb"
    return emb.is_dir() and (Path(folder) / "metadata").is_dir() and any(_NPY_RE.match(p.name) for p in emb.iterdir())


def list_shards(folder: str | Path) -> list[Shard]:
    folder = Path(folder)
    emb_dir, meta_dir = folder / "img_emb", folder / "metadata"
    if not emb_dir.is_dir() or not meta_dir.is_dir():
        raise InputError(f"{folder}: not a clip-retrieval folder (needs img_emb/ and metadata/)")
    shards = []
    for p in sorted(emb_dir.iterdir()):
        m = _NPY_RE.match(p.name)
        if m:
            name = m.group(1)
            meta = meta_dir / f"metadata_{name}.parquet"
            if not meta.exists():
                raise InputError(f"{p}: no matching {meta}")
            shards.append(Shard(int(name), name, meta, p))
    if not shards:
        raise InputError(f"{folder}/img_emb: no img_emb_NNNN.npy files")
    return shards


def open_vectors(shard: Shard) -> np.ndarray:
    try:
        x = load_npy(shard.data, mmap=True)
    except Exception as exc:
        raise InputError(f"{shard.data}: unreadable npy ({exc})") from exc
    if x.ndim != 2:
        raise InputError(f"{shard.data}: expected a 2-D array, got shape {x.shape}")
    if x.dtype not in (np.float16, np.float32):
        raise InputError(f"{shard.data}: dtype {x.dtype}; expected float16 or float32")
    return x


def count_rows(shard: Shard) -> int:
    """Input rows of a shard counted from its files alone: the vectors in its npy."""
    return int(open_vectors(shard).shape[0])


def validate(shards: list[Shard]) -> int:
    """Check every pair of files before any work; returns the common dimension."""
    dims = {}
    for s in shards:
        x = open_vectors(s)
        rows = pq.ParquetFile(s.parquet).metadata.num_rows
        if rows != len(x):
            raise InputError(f"{s.data}: {len(x)} vectors but {s.parquet} has {rows} rows")
        dims.setdefault(x.shape[1], s.data)
    if len(dims) > 1:
        raise InputError("vector dimensions differ: " + ", ".join(f"{d} in {p}" for d, p in dims.items()))
    return next(iter(dims))


def _norms(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(finite mask, L2 norms in float64) of a chunk; non-finite rows get norm 0. Squares are
    summed in float32 and only rows that overflow it (|x_i| > 1.8e19, float32 input) again in
    float64, so a chunk is never widened whole."""
    x = np.asarray(x, dtype=np.float32)
    finite = np.isfinite(x).all(axis=1)
    sq = np.einsum("ij,ij->i", x, x, dtype=np.float32).astype(np.float64)
    big = finite & ~np.isfinite(sq)
    if big.any():
        xb = x[big].astype(np.float64)
        sq[big] = np.einsum("ij,ij->i", xb, xb)
    sq[~finite] = 0
    return finite, np.sqrt(sq)


def _errors(ok: np.ndarray, finite: np.ndarray) -> list:
    out = [None] * len(ok)
    for i in np.flatnonzero(~ok):
        out[i] = "vector: non-finite values" if not finite[i] else "vector: zero norm"
    return out


def _check_norms(norms, ok, renormalize: bool, tolerance: float, path) -> None:
    off = ok & (np.abs(norms - 1) > tolerance)
    if off.any() and not renormalize:
        raise InputError(f"{path}: {int(off.sum())} vectors have norms off 1 by more than {tolerance} "
                         f"(e.g. {norms[off][0]:.4f}); set input.renormalize: true to normalise them")


def row_status(x: np.ndarray, renormalize: bool, tolerance: float, path) -> tuple[np.ndarray, np.ndarray, list]:
    """(unit float32 vectors, ok mask, error per row) for one chunk."""
    finite, norms = _norms(x)
    ok = finite & (norms > 1e-6)
    _check_norms(norms, ok, renormalize, tolerance, path)
    x = np.asarray(x, dtype=np.float32)
    unit = np.zeros_like(x)
    unit[ok] = (x[ok] / norms[ok, None]).astype(np.float32)
    return unit, ok, _errors(ok, finite)


def _text(meta: pa.Table, name: str) -> pa.Array:
    """A metadata column as strings: string columns as they are, anything else (binary captions,
    numbers) through as_text; a missing column is all null."""
    if name not in meta.column_names:
        return pa.nulls(meta.num_rows, pa.string())
    col = meta[name].combine_chunks()
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.cast(pa.string())
    return pa.array([as_text(v) for v in col.to_pylist()], pa.string())


def ingest_shard(shard: Shard, cfg) -> pa.Table:
    """`cfg`: the run's InputConfig (renormalize, norm_tolerance). Columnar: per-row Python only
    for the uids (a hash per row)."""
    renormalize, tolerance = cfg.renormalize, cfg.norm_tolerance
    meta = pq.read_table(shard.parquet)
    x = open_vectors(shard)
    n = meta.num_rows
    if n != len(x):
        raise InputError(f"{shard.data}: {len(x)} vectors but {shard.parquet} has {n} rows")
    ok = np.zeros(n, bool)
    errors: list = []
    for s in range(0, n, CHUNK):
        finite, norms = _norms(x[s:s + CHUNK])
        ok[s:s + CHUNK] = finite & (norms > 1e-6)
        _check_norms(norms, ok[s:s + CHUNK], renormalize, tolerance, shard.data)
        errors += _errors(ok[s:s + CHUNK], finite)
    url, caption, key = _text(meta, "url"), _text(meta, "caption"), _text(meta, "key")
    rows = np.arange(n, dtype=np.int64)
    missing = pc.fill_null(pc.equal(key, ""), True)
    if pc.any(missing).as_py():
        names = pa.array([f"{shard.name}_{r:07d}" for r in np.flatnonzero(missing.to_numpy(zero_copy_only=False))],
                         pa.string())
        key = pc.replace_with_mask(key, missing, names)
    uids = [normalize_uid(g) for g in meta["uid"].to_pylist()] if "uid" in meta.column_names else [None] * n
    urls, caps = url.to_pylist(), caption.to_pylist()
    uids = [u or content_uid(urls[r], caps[r]) for r, u in enumerate(uids)]
    nulls_s, nulls_i = pa.nulls(n, pa.string()), pa.nulls(n, pa.int64())
    cols = {"key": key, "shard": pa.array([shard.name] * n, pa.string()), "row": pa.array(rows),
            "gid": pa.array(make_gid(shard.index, 0) + rows), "url": url, "caption": caption,
            "status": pa.array(np.where(ok, "ok", "failed").tolist(), pa.string()),
            "error": pa.array(errors, pa.string()), "member": nulls_s, "sha256": nulls_s,
            "width": nulls_i, "height": nulls_i, "nbytes": nulls_i, "uid": pa.array(uids, pa.string())}
    return pa.Table.from_arrays([cols[f.name] for f in SCHEMA], schema=SCHEMA)


def in_place(shard: Shard, ok_rows: np.ndarray, cfg) -> Path | None:
    """The shard's own vector file when the run can read it as it is (memory-mapped, never copied):
    every row valid, float16/float32, norms already within tolerance (no renormalisation), and
    the config does not ask for a copy (`input.copy_vectors`). None: copy."""
    x = open_vectors(shard)
    if cfg.copy_vectors or cfg.renormalize or len(ok_rows) != len(x):
        return None
    return shard.data


def unit_vectors(shard: Shard, ok_rows: np.ndarray, cfg) -> np.ndarray:
    """fp16 unit vectors of the ok rows, read chunk by chunk from the memory-mapped npy."""
    renormalize, tolerance = cfg.renormalize, cfg.norm_tolerance
    x = open_vectors(shard)
    parts = []
    for s in range(0, len(x), CHUNK):
        unit, _, _ = row_status(x[s:s + CHUNK], renormalize, tolerance, shard.data)
        sel = ok_rows[(ok_rows >= s) & (ok_rows < s + CHUNK)] - s
        parts.append(unit[sel].astype(np.float16))
    return np.concatenate(parts) if parts else np.zeros((0, x.shape[1]), np.float16)
