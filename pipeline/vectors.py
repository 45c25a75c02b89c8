"""Read access to the embed stage's vectors by global id (memory-mapped fp16 shards)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


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
        return _by_shard(gids, self.dim, self._get_shard)

    def _get_shard(self, index: int, gids: np.ndarray) -> np.ndarray:
        sg, sv = self.shard(index)
        pos = np.searchsorted(sg, gids)
        if np.any(pos >= len(sg)) or np.any(sg[np.minimum(pos, len(sg) - 1)] != gids):
            raise KeyError(f"shard {self.shards[index]}: some gids have no vector")
        if len(pos) < 2 or np.all(pos[1:] >= pos[:-1]):   # already ascending (the search's gathers)
            return sv[pos].astype(np.float32)
        # read in ascending row order (sequential pages of the memmap)
        order = np.argsort(pos, kind="stable")
        out = np.empty((len(gids), sv.shape[1]), dtype=np.float32)
        out[order] = sv[pos[order]]
        return out


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
        return _by_shard(gids, self.dim, lambda index, g: self._owner[index].get(g))


def _by_shard(gids, dim: int, fetch) -> np.ndarray:
    """float32 vectors of `gids` in the given order, fetched shard by shard (the shard number is
    the high half of the gid): fetch(shard index, that shard's gids) -> their vectors."""
    gids = np.asarray(gids, dtype=np.int64)
    out = np.empty((len(gids), dim), dtype=np.float32)
    which = gids >> 32
    if len(which) < 2 or np.all(which[1:] >= which[:-1]):   # grouped by shard: contiguous slices
        edges = np.r_[0, np.nonzero(which[1:] != which[:-1])[0] + 1, len(gids)]
        for lo, hi in zip(edges[:-1], edges[1:]):
            if hi > lo:
                out[lo:hi] = fetch(int(which[lo]), gids[lo:hi])
        return out
    for index in np.unique(which):
        sel = np.nonzero(which == index)[0]
        out[sel] = fetch(int(index), gids[sel])
    return out
