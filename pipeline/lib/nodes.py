"""The group stage's nodes (rows with a vector): per-row numbers for the representative rank
and the node map.

The rank compares a 16-byte prefix of each key (most pixels, the padding of a frame discounted
where the pixel check measured it: picture_pixels; then most bytes, then the smallest key); only
rows whose prefixes tie (with equal pixels and bytes) and run past 16 bytes have their full keys
read back, a tied run at a time. sha256 digests are held as 32 raw bytes. GidIndex maps
gids to node positions by arithmetic; Keys maps given rows' gids to their keys.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

PREFIX = 16          # bytes of the key kept per row for the rank

_HEX = np.zeros(256, np.uint8)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def key_prefix(keys: list) -> np.ndarray:
    """The first PREFIX UTF-8 bytes of each key (byte order is the keys' sort order)."""
    return np.array([(k or "").encode()[:PREFIX] for k in keys], dtype=f"S{PREFIX}")


def fixed_width(column: pa.ChunkedArray) -> np.ndarray:
    """A string column of equal-length values (hex digests) as a numpy fixed-width bytes array:
    the bytes themselves, with no Python object per row."""
    width = max((len(v) for v in column.slice(0, 1).to_pylist()), default=1)
    parts = []
    for chunk in column.chunks:
        offsets = np.frombuffer(chunk.buffers()[1], np.int32, len(chunk) + 1, chunk.offset * 4)
        if not np.all(np.diff(offsets) == width):
            return np.array(column.to_pylist(), dtype=f"S{width}") if width else np.zeros(len(column), "S1")
        data = chunk.buffers()[2]
        parts.append(np.frombuffer(data, f"S{width}", len(chunk), int(offsets[0])))
    return np.concatenate(parts) if parts else np.zeros(0, f"S{width}")


def raw_digest(hexes: pa.ChunkedArray) -> np.ndarray:
    """Hex sha256 strings -> S32 raw bytes (half the memory, no Python object per row)."""
    h = fixed_width(hexes)
    if not len(h):
        return np.zeros(0, "S32")
    u = _HEX[np.frombuffer(h.tobytes(), np.uint8).reshape(len(h), -1)]
    raw = np.ascontiguousarray((u[:, 0::2] << 4) | u[:, 1::2])
    return raw.view(f"S{raw.shape[1]}").ravel()


SHARE_STEPS = 16     # picture shares are compared in steps of 1/16: noise (a JPEG's ringing on a
                     # plain fill) does not outrank the bytes rule between two copies of one frame


def picture_pixels(pixels: np.ndarray, share: np.ndarray) -> np.ndarray:
    """The pixels the rank counts where the pixel check measured how much of each frame is picture
    (`share`, 1 where unknown): width x height x share^2, the picture's pixels discounted by the
    share of the frame it fills. The same photo pasted on a canvas or between letterbox bars
    has as many picture pixels as the photo alone, and more pixels in all; the photo is kept. A
    larger version of the photo (twice the side: four times the pixels) still wins."""
    q = np.round(np.clip(share, 0.0, 1.0) * SHARE_STEPS) / SHARE_STEPS
    return np.round(pixels * q * q).astype(np.int64)


def quality_rank(gids, pixels, nbytes, prefix, full_keys) -> np.ndarray:
    """Rank per node, lower is better: most pixels, then most bytes, then the smallest key, then
    input order (gid). `full_keys(gids)` returns the keys of the given gids (same order): asked only
    for runs of rows that tie on pixels, bytes and a key prefix that fills all PREFIX bytes."""
    n = len(gids)
    order = np.lexsort((gids, prefix, -nbytes, -pixels))
    same = np.zeros(max(n - 1, 0), bool)      # row k ties with row k + 1 (in rank order)
    for i in range(0, n - 1, 1 << 20):        # in slices: no sorted copy of the three columns
        o = order[i:i + (1 << 20) + 1]
        sp, sn, sk = pixels[o], nbytes[o], prefix[o]
        same[i:i + len(o) - 1] = (sp[1:] == sp[:-1]) & (sn[1:] == sn[:-1]) & (sk[1:] == sk[:-1])
    if same.any():
        tied = np.zeros(n, bool)
        tied[1:] |= same
        tied[:-1] |= same
        pos = np.flatnonzero(tied)
        pos = pos[np.char.str_len(prefix[order[pos]]) >= PREFIX]   # shorter prefixes are whole keys: truly equal
        if len(pos):
            run_id = np.cumsum(np.r_[True, ~same])[pos]   # one id per tied run
            rows = order[pos]
            keys = full_keys(gids[rows])
            resort = sorted(range(len(pos)), key=lambda i: (run_id[i], keys[i], gids[rows[i]]))
            order[pos] = rows[resort]
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    return rank


def keys_of(run, gids: np.ndarray) -> list:
    """The keys of the given gids (any order), read from the ingest files of their shards."""
    return column_of(run, gids, "key")


def column_of(run, gids: np.ndarray, column: str) -> list:
    """An ingest column's values of the given gids (any order), read from their shards' files."""
    gids = np.asarray(gids, np.int64)
    found: dict[int, str] = {}
    for shard in run.shards:
        sel = gids[(gids >> 32) == shard.index]
        if not len(sel):
            continue
        t = pq.read_table(run.ingest_file(shard.name), columns=["gid", column])
        t = t.filter(pc.is_in(t["gid"], pa.array(sel, pa.int64())))
        found.update(zip(t["gid"].to_pylist(), t[column].to_pylist()))
    return [found[int(g)] for g in gids]


class GidIndex:
    """Positions of gids in a sorted array of gids: by arithmetic in the shards whose rows are all
    there (gid = shard << 32 | row, so the position is the shard's start + row), by binary search
    in the others. A binary search per edge over 10 M gids (random reads over 80 MB) was 16 s of
    the group stage at 10 M rows. Every gid looked up must be in the array."""

    def __init__(self, gids: np.ndarray):
        self.gids = gids
        # the shards' runs in the sorted gids, found by one binary search per shard (no per-row
        # temporary: a shard and a row array of every gid were 160 MB at 10 M rows)
        ids, starts = [], []
        at = 0
        while at < len(gids):
            sid = int(gids[at]) >> 32
            ids.append(sid)
            starts.append(at)
            at = int(np.searchsorted(gids, (sid + 1) << 32)) if sid < (1 << 30) else len(gids)
        ids, starts = np.array(ids, np.int64), np.array(starts, np.int64)
        counts = np.diff(np.r_[starts, len(gids)])
        row = lambda i: gids[i] & 0xFFFFFFFF      # noqa: E731
        # ascending and unique, first row 0 and last row count - 1: the rows 0 .. count - 1
        whole = (row(starts) == 0) & (row(starts + counts - 1) == counts - 1) if len(ids) else np.zeros(0, bool)
        size = int(ids.max()) + 1 if len(ids) and ids.max() < (1 << 24) and ids.min() >= 0 else 0
        self.start = np.full(size, -1, np.int64)
        if size:
            self.start[ids[whole]] = starts[whole]

    def __call__(self, g: np.ndarray) -> np.ndarray:
        g = np.asarray(g, dtype=np.int64)
        if not len(self.start):
            return np.searchsorted(self.gids, g)
        shard = g >> 32
        inside = (shard >= 0) & (shard < len(self.start))
        pos = np.where(inside, self.start[np.where(inside, shard, 0)], -1)
        slow = pos < 0
        pos += g & 0xFFFFFFFF
        if slow.any():
            pos[slow] = np.searchsorted(self.gids, g[slow])
        return pos


class Keys:
    """gid -> key of given rows (the group stage's bucket, the report's borderline pairs): the gids
    sorted, their keys one Arrow string array (about 4 B a key beside its text; a pandas Series of
    Python strings held about 60 B more a key), looked up a batch at a time by one binary search
    per gid."""

    def __init__(self, gid: np.ndarray, key: pa.Array):
        self.gid = gid
        self.key = pa.concat_arrays([key, pa.nulls(1, key.type)])   # position len(gid): not found

    def find(self, gids: np.ndarray) -> np.ndarray:
        """Position of each gid, len(gid) where it is not there."""
        return find_sorted(self.gid, gids)

    def take(self, gids) -> pa.Array:
        """The keys of `gids` (an array or a Series with NA), null where unknown or NA."""
        g = gids.to_numpy(np.int64, na_value=-1) if isinstance(gids, pd.Series) else np.asarray(gids, np.int64)
        return self.key.take(self.find(g))

    def objects(self, gids) -> np.ndarray:
        """The keys of `gids` as a numpy object array (None where unknown): for one shard's rows."""
        return self.take(gids).to_numpy(zero_copy_only=False)


def find_sorted(sorted_gids: np.ndarray, gids: np.ndarray) -> np.ndarray:
    """Position of each gid in `sorted_gids` by binary search, len(sorted_gids) where it is not there."""
    pos = np.searchsorted(sorted_gids, gids)
    there = pos < len(sorted_gids)
    there[there] = sorted_gids[pos[there]] == gids[there]
    return np.where(there, pos, len(sorted_gids))
