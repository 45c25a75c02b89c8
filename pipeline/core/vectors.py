"""Read access to the embed stage's vectors by global id (memory-mapped fp16 shards)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

GATHER_CHUNK = 4096     # rows converted fp16 -> float32 at a time


def emb_path(embed_dir: Path, shard: str) -> Path:
    return Path(embed_dir) / "img_emb" / f"img_emb_{shard}.npy"


def meta_path(embed_dir: Path, shard: str) -> Path:
    return Path(embed_dir) / "metadata" / f"metadata_{shard}.parquet"


class VectorStore:
    """gid -> vector. Shard files are opened lazily and memory-mapped; nothing is copied whole."""

    def __init__(self, embed_dir: Path, shards: dict[int, str]):
        self.embed_dir = Path(embed_dir)
        self.shards = shards            # shard index -> shard name
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def shard(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(gids sorted ascending, vectors fp16 memmap) of one shard."""
        if index not in self._cache:
            name = self.shards[index]
            gids = pq.read_table(meta_path(self.embed_dir, name), columns=["gid"])["gid"].to_numpy()
            vecs = np.load(emb_path(self.embed_dir, name), mmap_mode="r", allow_pickle=False)
            if len(gids) != len(vecs):
                raise ValueError(f"{emb_path(self.embed_dir, name)}: {len(vecs)} vectors but "
                                 f"{len(gids)} metadata rows")
            self._cache[index] = (gids, vecs)
        return self._cache[index]

    @property
    def dim(self) -> int:
        return int(self.shard(next(iter(self.shards)))[1].shape[1])

    def get(self, gids: np.ndarray) -> np.ndarray:
        """float32 vectors of the given gids, in the given order."""
        return _by_shard(gids, self.dim, self._fill)

    def _fill(self, index: int, gids: np.ndarray, out: np.ndarray) -> None:
        """out[k] = float32 vector of gids[k], all in shard `index`."""
        sg, sv = self.shard(index)
        pos = np.searchsorted(sg, gids)
        if np.any(pos >= len(sg)) or np.any(sg[np.minimum(pos, len(sg) - 1)] != gids):
            raise KeyError(f"shard {self.shards[index]}: some gids have no vector")
        # rows are read in ascending order (sequential pages of the memmap) and converted to float32
        # a cache-sized chunk at a time, straight into `out` (a whole-array fp16 gather + astype makes
        # two more copies; up to 2x slower in a micro-benchmark here, on par when the pages are warm)
        order = None if len(pos) < 2 or np.all(pos[1:] >= pos[:-1]) else np.argsort(pos, kind="stable")
        for s in range(0, len(pos), GATHER_CHUNK):
            if order is None:
                out[s:s + GATHER_CHUNK] = np.take(sv, pos[s:s + GATHER_CHUNK], axis=0)
            else:
                sel = order[s:s + GATHER_CHUNK]
                out[sel] = np.take(sv, pos[sel], axis=0)


class StoreUnion:
    """gid -> vector over the stores of several runs (each owns the shard numbers in its gids)."""

    def __init__(self, stores: list[VectorStore]):
        self.stores = stores
        self._owner = {i: st for st in stores for i in st.shards}

    def shard_indexes(self) -> set[int]:
        return set(self._owner)

    def shard(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self._owner[index].shard(index)

    @property
    def dim(self) -> int:
        return self.stores[0].dim

    def get(self, gids: np.ndarray) -> np.ndarray:
        return _by_shard(gids, self.dim, lambda index, g, out: self._owner[index]._fill(index, g, out))


def _by_shard(gids, dim: int, fill) -> np.ndarray:
    """float32 vectors of `gids` in the given order, read shard by shard (the shard number is
    the high half of the gid): fill(shard index, that shard's gids, out) writes their vectors."""
    gids = np.asarray(gids, dtype=np.int64)
    out = np.empty((len(gids), dim), dtype=np.float32)
    which = gids >> 32
    if len(which) < 2 or np.all(which[1:] >= which[:-1]):   # grouped by shard: contiguous slices
        edges = np.r_[0, np.nonzero(which[1:] != which[:-1])[0] + 1, len(gids)]
        for lo, hi in zip(edges[:-1], edges[1:]):
            if hi > lo:
                fill(int(which[lo]), gids[lo:hi], out[lo:hi])
        return out
    for index in np.unique(which):
        sel = np.nonzero(which == index)[0]
        part = np.empty((len(sel), dim), dtype=np.float32)
        fill(int(index), gids[sel], part)
        out[sel] = part
    return out
