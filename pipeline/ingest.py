"""ingest: img2dataset shards -> one table per shard with a stable key, a global id and a sha256.

Reads NNNNN.parquet (every row img2dataset tried, failed ones included) and NNNNN.tar
(KEY.jpg|png|webp + KEY.txt + KEY.json). Writes ingest/NNNNN.parquet with one row per input row:
key, shard, row, gid, url, caption, status (ok|failed), error, member, sha256, width, height, nbytes.
The global id is (shard index << 32) | row: stable across reruns, no global pass needed.
"""
from __future__ import annotations

import hashlib
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_SHARD_RE = re.compile(r"^(\d+)\.parquet$")

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


class InputError(ValueError):
    """An input file is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class Shard:
    index: int
    name: str          # zero-padded, as the input names it
    parquet: Path      # img2dataset's NNNNN.parquet, or clip-retrieval's metadata_NNNNN.parquet
    data: Path         # img2dataset's NNNNN.tar, or clip-retrieval's img_emb_NNNNN.npy


def exact_edges(sha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(head, copy) index pairs: every row whose hash equals an earlier row's, linked to the first
    such row (stable: "first" follows the input order). Used to group exact copies and to embed
    each distinct image once."""
    order = np.argsort(sha, kind="stable")
    s = sha[order]
    start = np.r_[0, np.nonzero(s[1:] != s[:-1])[0] + 1]
    head = np.repeat(order[start], np.diff(np.r_[start, len(s)]))
    keep = head != order
    return head[keep], order[keep]


def make_gid(shard_index: int, row: int) -> int:
    return (shard_index << 32) | row


def list_shards(folder: str | Path) -> list[Shard]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: input folder not found")
    shards = []
    for p in sorted(folder.iterdir()):
        m = _SHARD_RE.match(p.name)
        if m:
            shards.append(Shard(int(m.group(1)), p.stem, p, p.with_suffix(".tar")))
    if not shards:
        raise InputError(f"{folder}: no img2dataset shards (NNNNN.parquet + NNNNN.tar) found")
    orphans = sorted(p.name for p in folder.glob("*.tar") if not p.with_suffix(".parquet").exists())
    if orphans:
        raise InputError(f"{folder}: {', '.join(orphans)} without the .parquet sidecar img2dataset "
                         "writes; restore it or move the tar out of the input folder")
    return shards


def check_unique_keys(tables: dict[str, pa.Table]) -> None:
    """Keys identify rows in reports and keep-lists: the same key in two shards is an input error."""
    seen: dict[str, str] = {}
    for name, t in tables.items():
        for key in t["key"].to_pylist():
            if key in seen and seen[key] != name:
                raise InputError(f"key {key!r} appears in shard {seen[key]} and shard {name}; "
                                 "keys must be unique across the input")
            seen[key] = name


def _tar_members(path: Path) -> dict[str, dict[str, tarfile.TarInfo]]:
    """key -> {ext -> member}; refuses member names that would escape a folder."""
    out: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                name = m.name
                if name.startswith("/") or ".." in Path(name).parts:
                    raise InputError(f"{path}: unsafe member name {name!r}")
                stem, _, ext = Path(name).name.rpartition(".")
                out.setdefault(stem, {})[ext.lower()] = m
    except tarfile.TarError as exc:
        raise InputError(f"{path}: unreadable tar ({exc})") from exc
    return out


def ingest_shard(shard: Shard) -> pa.Table:
    """The ingest table of one shard (pure: reads inputs, returns a table)."""
    if not shard.data.exists():
        raise InputError(f"{shard.data}: tar missing beside {shard.parquet.name}")
    try:
        meta = pq.read_table(shard.parquet).to_pylist()
    except Exception as exc:
        raise InputError(f"{shard.parquet}: unreadable parquet ({exc})") from exc
    members = _tar_members(shard.data)
    rows = []
    with tarfile.open(shard.data, "r:*") as tar:
        for i, rec in enumerate(meta):
            key = str(rec.get("key") or f"{shard.name}{i:04d}")
            row = {"key": key, "shard": shard.name, "row": i, "gid": make_gid(shard.index, i),
                   "url": as_text(rec.get("url")), "caption": as_text(rec.get("caption")), "status": "ok", "error": None,
                   "member": None, "sha256": None, "width": rec.get("original_width") or rec.get("width"),
                   "height": rec.get("original_height") or rec.get("height"), "nbytes": None,
                   "uid": as_text(rec.get("uid")) or content_uid(as_text(rec.get("url")), as_text(rec.get("caption")))}
            img = next((m for ext, m in members.get(key, {}).items() if ext in IMAGE_EXTS), None)
            if rec.get("status", "success") != "success":
                row.update(status="failed", error=f"img2dataset: {rec.get('status')}: {rec.get('error_message')}")
            elif img is None:
                row.update(status="failed", error=f"image for key {key} missing from {shard.data.name}")
            else:
                f = tar.extractfile(img)
                data = f.read() if f else b""
                row.update(member=img.name, sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data))
            rows.append(row)
    # images in the tar that no parquet row names: input rows too, never silently dropped
    named = {r["key"] for r in rows}
    for key in sorted(k for k, exts in members.items() if k not in named and set(exts) & set(IMAGE_EXTS)):
        i = len(rows)
        rows.append({"key": key, "shard": shard.name, "row": i, "gid": make_gid(shard.index, i), "url": None,
                     "caption": None, "status": "failed", "member": None, "sha256": None, "width": None,
                     "height": None, "nbytes": None, "uid": content_uid(shard.name, key),
                     "error": f"image {key} is in {shard.data.name} but not in {shard.parquet.name}"})
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def read_images(tar_path: str, wanted: dict[str, int]) -> list[tuple[int, bytes]]:
    """(value, image bytes) for the wanted member names (name -> value, e.g. a gid), in tar order."""
    out = []
    with tarfile.open(tar_path, "r:*") as tar:
        for m in tar:
            gid = wanted.get(m.name)
            if gid is not None:
                f = tar.extractfile(m)
                out.append((gid, f.read() if f else b""))
    return out
