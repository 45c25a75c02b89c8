"""What every input source shares: the shard, the ingest table's schema, gids, uids, input errors."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

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


def check_unique_keys(tables: dict[str, pa.Table]) -> None:
    """Keys identify rows in reports and keep-lists: the same key in two shards is an input error."""
    seen: dict[str, str] = {}
    for name, t in tables.items():
        for key in t["key"].to_pylist():
            if key in seen and seen[key] != name:
                raise InputError(f"key {key!r} appears in shard {seen[key]} and shard {name}; "
                                 "keys must be unique across the input")
            seen[key] = name
