"""Read access to the embed stage's vectors by global id (memory-mapped fp16 shards).

A shard is either a vector file of the embed stage (img_emb_NNNNN.npy) or, for released embeddings
that are already what the store holds (every row valid, float16/float32), a link to the input's own
file (img_emb_NNNNN.link.json: path, size, mtime), read in place and never copied; its rows are
normalised as they are read. A linked file that changed since the embed stage is refused.
"""
from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .arrays import unique
from .io import load_npy

GATHER_CHUNK = 4096     # rows converted fp16 -> float32 at a time


def emb_path(embed_dir: Path, shard: str) -> Path:
    return Path(embed_dir) / "img_emb" / f"img_emb_{shard}.npy"


def meta_path(embed_dir: Path, shard: str) -> Path:
    return Path(embed_dir) / "metadata" / f"metadata_{shard}.parquet"


def link_path(embed_dir: Path, shard: str) -> Path:
    return Path(embed_dir) / "img_emb" / f"img_emb_{shard}.link.json"


def link_to(source: Path) -> dict:
    """What a link records of the input file it points at."""
    st = os.stat(source)
    return {"source": str(Path(source).resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _open_linked(link: Path) -> np.ndarray:
    info = json.loads(link.read_text())
    src = Path(info["source"])
    if not src.exists() or link_to(src) != info:
        raise ValueError(f"{src}: the input file this run reads in place changed or is gone since the embed "
                         f"stage ({link}); rerun the embed stage (delete the run's embed/_done) or restore it")
    return load_npy(src, mmap=True)


def _shard_gids(path: Path) -> np.ndarray | tuple[int, int]:
    """A vector shard's gids (ascending, unique): (first, count) where they are one run of
    consecutive numbers (every row has a vector: the usual case), known from the footer's
    statistics, else the column. A search join opens every shard: the footer is read, not 1 MB
    of column, and nothing per row is held."""
    with pq.ParquetFile(path) as f:
        md, col = f.metadata, f.schema_arrow.get_field_index("gid")
        stats = [md.row_group(g).column(col).statistics for g in range(md.num_row_groups)] if col >= 0 else [None]
        if md.num_rows and all(st is not None and st.has_min_max for st in stats):
            lo, hi = min(st.min for st in stats), max(st.max for st in stats)
            if hi - lo + 1 == md.num_rows:    # n unique ascending numbers in [lo, lo + n): all of them
                return int(lo), int(md.num_rows)
        return f.read(columns=["gid"])["gid"].to_numpy()


class VectorStore:
    """gid -> vector. Shard files are opened lazily and memory-mapped; nothing is copied whole."""

    def __init__(self, embed_dir: Path, shards: dict[int, str]):
        self.embed_dir = Path(embed_dir)
        self.shards = shards            # shard index -> shard name
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._linked: set[int] = set()      # shards read in place: rows normalised as they are read

    def shard(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(gids sorted ascending, vectors memmap: fp16, or the input's own dtype when linked)."""
        gids, vecs = self._open(index)
        return (np.arange(gids[0], gids[0] + gids[1], dtype=np.int64) if isinstance(gids, tuple) else gids), vecs

    def _open(self, index: int) -> tuple[np.ndarray | tuple[int, int], np.ndarray]:
        """(_shard_gids: (first, count) or the gids, vectors memmap), opened once."""
        if index not in self._cache:
            name = self.shards[index]
            gids = _shard_gids(meta_path(self.embed_dir, name))
            link = link_path(self.embed_dir, name)
            if link.exists():
                vecs = _open_linked(link)
                self._linked.add(index)
            else:
                vecs = load_npy(emb_path(self.embed_dir, name), mmap=True)
            n = gids[1] if isinstance(gids, tuple) else len(gids)
            if n != len(vecs):
                raise ValueError(f"{emb_path(self.embed_dir, name)}: {len(vecs)} vectors but "
                                 f"{n} metadata rows")
            self._cache[index] = (gids, vecs)
        return self._cache[index]

    @property
    def dim(self) -> int:
        return int(self._open(next(iter(self.shards)))[1].shape[1])

    def source(self, index: int) -> tuple[Path, str]:
        """(embed folder, shard name) of shard `index`: what a task needs to open it alone."""
        return self.embed_dir, self.shards[index]

    def release(self, index: int) -> None:
        """Unmap the pages of shard `index` this process has read (they stay in the page cache, a
        later read maps them again): the process's resident memory is what it computes, not every
        page of every vector file it has read (15 GB at 10 M rows)."""
        mm = getattr(self._cache.get(index, (None, None))[1], "_mmap", None)
        if mm is not None and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED)

    def is_linked(self, index: int) -> bool:
        """Whether shard `index` is the input's own file, read in place (its rows normalised as read)."""
        self._open(index)
        return index in self._linked

    def get(self, gids: np.ndarray) -> np.ndarray:
        """float32 vectors of the given gids, in the given order."""
        return _by_shard(gids, self.dim, self._fill)

    def get_raw(self, gids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The vectors of the given gids as the files hold them (fp16; a linked input file's own
        dtype), and which rows get() normalises as it reads them (the linked files' rows; None:
        no row). Half the memory of get(), no conversion of rows no one multiplies (the search
        join: celljoin.Vectors turns them into get()'s float32 rows, bit for bit)."""
        gids = np.asarray(gids, dtype=np.int64)
        shards = unique(gids >> 32)
        fp16 = all(self._open(int(i))[1].dtype == np.float16 for i in shards)
        linked = [int(i) for i in shards if int(i) in self._linked]
        out = _by_shard(gids, self.dim, self._gather, np.float16 if fp16 else np.float32)
        return out, (np.isin(gids >> 32, linked) if linked else None)

    def _positions(self, index: int, gids: np.ndarray) -> np.ndarray:
        """Row numbers of `gids` in shard `index` (KeyError if one has no vector)."""
        sg = self._open(index)[0]
        if isinstance(sg, tuple):         # consecutive gids: a row's position is arithmetic
            pos = np.asarray(gids, np.int64) - sg[0]
            if len(pos) and (pos.min() < 0 or pos.max() >= sg[1]):
                raise KeyError(f"shard {self.shards[index]}: some gids have no vector")
            return pos
        pos = np.searchsorted(sg, gids)
        if np.any(pos >= len(sg)) or np.any(sg[np.minimum(pos, len(sg) - 1)] != gids):
            raise KeyError(f"shard {self.shards[index]}: some gids have no vector")
        return pos

    def _fill(self, index: int, gids: np.ndarray, out: np.ndarray) -> None:
        """out[k] = float32 vector of gids[k], all in shard `index`."""
        self._gather(index, gids, out)
        if index in self._linked:          # the input's vectors, normalised as the embed stage would
            normalise(out)

    def _gather(self, index: int, gids: np.ndarray, out: np.ndarray) -> None:
        """out[k] = the stored vector of gids[k], all in shard `index`, in out's dtype."""
        sv = self._open(index)[1]
        pos = self._positions(index, gids)
        # rows are read in ascending order (sequential pages of the memmap) and converted to out's
        # dtype a cache-sized chunk at a time, straight into `out` (a whole-array fp16 gather + astype
        # makes two more copies; up to 2x slower in a micro-benchmark here, on par when the pages are warm)
        order = None if len(pos) < 2 or np.all(pos[1:] >= pos[:-1]) else np.argsort(pos, kind="stable")
        if len(pos) * SPARSE < len(sv):
            prefetch(sv, pos if order is None else pos[order])
        for s in range(0, len(pos), GATHER_CHUNK):
            if order is None:
                out[s:s + GATHER_CHUNK] = np.take(sv, pos[s:s + GATHER_CHUNK], axis=0)
            else:
                sel = order[s:s + GATHER_CHUNK]
                out[sel] = np.take(sv, pos[sel], axis=0)
        self.release(index)


SPARSE = 16      # a read of fewer than 1/SPARSE of a file's rows asks for their pages ahead (prefetch)


def prefetch(sv: np.ndarray, pos: np.ndarray) -> None:
    """Ask the kernel for the pages of rows `pos` (ascending) of the memory-mapped file `sv`
    before they are read (posix_fadvise WILLNEED, a call per run of nearby rows): every read goes
    out at once, where a page the mapping faults in is one synchronous read after another. Rows
    scattered over a 10 M-row corpus's files (the search join's candidates, 0.5 % of a file),
    cold: 5,000 rows/s faulted in, 82,000 asked for first (bench/results/cold_reads.md); warm
    reads pay about 20 % more. Not a memmap of a file: no-op."""
    name, offset = getattr(sv, "filename", None), getattr(sv, "offset", None)
    if name is None or offset is None or not hasattr(os, "posix_fadvise") or not len(pos):
        return
    row = sv.itemsize * int(np.prod(sv.shape[1:]))
    gap = max(1, 65536 // row)                      # rows this close share a call
    cut = np.flatnonzero(np.diff(pos) > gap) + 1
    first, last = pos[np.r_[0, cut]], pos[np.r_[cut - 1, len(pos) - 1]]
    try:
        fd = os.open(name, os.O_RDONLY)
    except OSError:
        return
    try:
        for a, b in zip(first.tolist(), last.tolist()):
            os.posix_fadvise(fd, offset + a * row, (b - a + 1) * row, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def normalise(x: np.ndarray, rows: np.ndarray | None = None) -> None:
    """x (float32) scaled in place to unit rows, as the store reads a linked file's rows (the
    rows where `rows` is True; every row without it)."""
    f = 1 / np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x)), 1e-12)
    if rows is not None:
        f[~rows] = 1.0
    x *= f[:, None]


class Rows:
    """The vectors of given gids, read from a store only when indexed: `rows[idx]` gives
    store.get(gids[idx]) (float32). `before(n)` runs before n rows are read (a memory check);
    `read` counts the rows read."""

    def __init__(self, store, gids: np.ndarray, before=None):
        self.store, self.gids, self.before, self.read = store, np.asarray(gids, dtype=np.int64), before, 0

    def __len__(self) -> int:
        return len(self.gids)

    def __getitem__(self, idx) -> np.ndarray:
        return self.store.get(self._take(idx))

    def raw(self, idx) -> tuple[np.ndarray, np.ndarray | None]:
        """store.get_raw of gids[idx]: the rows as stored (fp16), half the memory of rows[idx]."""
        return self.store.get_raw(self._take(idx))

    def _take(self, idx) -> np.ndarray:
        g = self.gids[idx]
        if self.before is not None:
            self.before(len(g))
        self.read += len(g)
        return g


class StoreUnion:
    """gid -> vector over the stores of several runs (each owns the shard numbers in its gids)."""

    def __init__(self, stores: list[VectorStore]):
        self.stores = stores
        self._owner = {i: st for st in stores for i in st.shards}

    def shard_indexes(self) -> set[int]:
        return set(self._owner)

    def release(self, index: int) -> None:
        self._owner[index].release(index)

    def source(self, index: int) -> tuple[Path, str]:
        return self._owner[index].source(index)

    def shard(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self._owner[index].shard(index)

    @property
    def dim(self) -> int:
        return self.stores[0].dim

    def get(self, gids: np.ndarray) -> np.ndarray:
        return _by_shard(gids, self.dim, lambda index, g, out: self._owner[index]._fill(index, g, out))


def _by_shard(gids, dim: int, fill, dtype=np.float32) -> np.ndarray:
    """Vectors of `gids` in the given order, read shard by shard (the shard number is the high
    half of the gid): fill(shard index, that shard's gids, out) writes their vectors."""
    gids = np.asarray(gids, dtype=np.int64)
    out = np.empty((len(gids), dim), dtype=dtype)
    which = gids >> 32
    if len(which) < 2 or np.all(which[1:] >= which[:-1]):   # grouped by shard: contiguous slices
        edges = np.r_[0, np.nonzero(which[1:] != which[:-1])[0] + 1, len(gids)]
        for lo, hi in zip(edges[:-1], edges[1:]):
            if hi > lo:
                fill(int(which[lo]), gids[lo:hi], out[lo:hi])
        return out
    for index in unique(which):
        sel = np.nonzero(which == index)[0]
        part = np.empty((len(sel), dim), dtype=dtype)
        fill(int(index), gids[sel], part)
        out[sel] = part
    return out
