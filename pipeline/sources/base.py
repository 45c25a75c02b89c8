"""What every input source shares: the shard, the ingest table's schema, gids, uids, input errors."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("row", pa.int64()), ("gid", pa.int64()),
    ("url", pa.string()), ("caption", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("member", pa.string()), ("sha256", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
    ("nbytes", pa.int64()), ("uid", pa.string()),
])


def as_text(value) -> str | None:
    """Captions and urls as str; bytes that are not UTF-8 are decoded with U+FFFD replacements."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return None if value is None else str(value)


def content_uid(url, caption) -> str:
    """A 128-bit content uid (hex) from url + caption: survives reordering and re-sharding."""
    return hashlib.blake2b(f"{url}\t{caption}".encode(), digest_size=16).hexdigest()


def normalize_uid(value) -> str | None:
    """An input's uid as 32 lowercase hex digits (128 bits, what keep-lists and subset.npy hold):
    as given when it is one, else the blake2b-128 of its text, so any uid string stays stable."""
    if value is None or value == "":
        return None
    text = as_text(value)
    if len(text) == 32 and all(c in "0123456789abcdefABCDEF" for c in text):
        return text.lower()
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class InputError(ValueError):
    """An input file is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class Shard:
    index: int
    name: str          # zero-padded, as the input names it
    parquet: Path      # img2dataset's NNNNN.parquet, or clip-retrieval's metadata_NNNNN.parquet
    data: Path         # img2dataset's NNNNN.tar, or clip-retrieval's img_emb_NNNNN.npy


def make_gid(shard_index: int, row: int) -> int:
    return (shard_index << 32) | row


KEY_CHECK_ROWS = 1 << 27     # hashes held at once by the unique-key check: 8 B each (1 GiB)


def _key_hashes(keys: pa.Array) -> np.ndarray:
    import pandas as pd
    return pd.util.hash_array(np.asarray(keys.to_numpy(zero_copy_only=False), dtype=object))


def check_unique_keys(shard_keys: dict, rows: int | None = None, budget: int = KEY_CHECK_ROWS) -> None:
    """Keys identify rows in reports and keep-lists: the same key in two shards is an input error.
    `shard_keys`: shard name -> a function returning that shard's key column (read on demand).
    Memory is bounded: 64-bit hashes of the keys, in passes of at most `budget` hashes (the
    passes split the hash space; each pass reads the key columns again); only keys whose hashes
    repeat are compared as strings."""
    passes = max(1, -(-(rows or 0) // budget))
    for p in range(passes):
        hashes, owners = [], []
        for i, (name, read) in enumerate(shard_keys.items()):
            h = _key_hashes(read())
            h = h[h % np.uint64(passes) == p] if passes > 1 else h
            hashes.append(h)
            owners.append(np.full(len(h), i, np.int32))
        h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        owner = np.concatenate(owners) if owners else np.zeros(0, np.int32)
        order = np.argsort(h, kind="stable")
        h, owner = h[order], owner[order]
        rep = np.flatnonzero(h[1:] == h[:-1])
        suspect = set(h[np.concatenate([rep, rep + 1])].tolist()) if len(rep) else set()
        if not suspect:
            continue
        names = list(shard_keys)
        seen: dict[str, str] = {}
        for i in sorted(set(owner[np.isin(h, list(suspect))].tolist())):
            keys = shard_keys[names[i]]()
            hit = np.isin(_key_hashes(keys), np.fromiter(suspect, np.uint64))
            for key in keys.filter(pa.array(hit)).to_pylist():
                if key in seen and seen[key] != names[i]:
                    raise InputError(f"key {key!r} appears in shard {seen[key]} and shard {names[i]}; "
                                     "keys must be unique across the input")
                seen[key] = names[i]
