"""Input source: img2dataset shards -> one ingest table per shard, and the shards' images.

Reads NNNNN.parquet (every row img2dataset tried, failed ones included) and NNNNN.tar
(KEY.jpg|png|webp + KEY.txt + KEY.json). Writes ingest/NNNNN.parquet with one row per input row:
key, shard, row, gid, url, caption, status (ok|failed), error, member, sha256, width, height, nbytes.
The global id is (shard index << 32) | row: stable across reruns, no global pass needed.
"""
from __future__ import annotations

import hashlib
import re
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .base import SCHEMA, InputError, Shard, as_text, content_uid, make_gid, normalize_uid

FORMAT = "img2dataset"
HAS_IMAGES = True     # the embed stage decodes them; export copies their original bytes
TAR_SHARDS = True     # the webdataset export copies every member of a kept sample
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_SHARD_RE = re.compile(r"^(\d+)\.parquet$")

LOOKS_FOR = "NNNNN.parquet + NNNNN.tar (img2dataset output)"


def detect(folder: Path) -> bool:
    """Whether a folder looks like img2dataset output: a NNNNN.parquet beside a NNNNN.tar."""
    return any(_SHARD_RE.match(p.name) and p.with_suffix(".tar").exists() for p in Path(folder).iterdir())


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


def _tar_members(path: Path) -> tuple[dict[str, dict[str, tarfile.TarInfo]], dict[str, str]]:
    """(key -> {ext -> member}, key -> why its members are ambiguous); refuses member names that
    would escape a folder. A key is ambiguous when one member name appears twice, or when
    members in different folders share its name (`plain0.jpg`, `other/plain0.jpg`): which bytes
    belong to the row cannot be told, so the row fails with that reason."""
    out: dict[str, dict[str, tarfile.TarInfo]] = {}
    bad: dict[str, str] = {}
    names: dict[str, str] = {}            # member name -> first seen (a repeat is ambiguous)
    folder_of: dict[str, str] = {}        # key -> folder of its members
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                name = m.name
                if name.startswith("/") or ".." in Path(name).parts:
                    raise InputError(f"{path}: unsafe member name {name!r}")
                stem, _, ext = Path(name).name.rpartition(".")
                folder = str(Path(name).parent)
                if name in names:
                    bad.setdefault(stem, f"member {name} appears twice in {path.name}")
                elif folder_of.setdefault(stem, folder) != folder:
                    bad.setdefault(stem, f"key {stem} names members in two folders of {path.name} "
                                         f"({folder_of[stem]!r} and {folder!r})")
                names[name] = name
                out.setdefault(stem, {}).setdefault(ext.lower(), m)
    except tarfile.TarError as exc:
        raise InputError(f"{path}: unreadable tar ({exc})") from exc
    return out, bad


def count_rows(shard: Shard) -> int:
    """Input rows of a shard counted from its files alone (the report's invariant checks the
    samples against it): the parquet's rows, plus the tar's images that no parquet row names."""
    keys = {str(k) for k in pq.read_table(shard.parquet, columns=["key"])["key"].to_pylist() if k not in (None, "")}
    with tarfile.open(shard.data, "r:*") as tar:
        stems = {Path(m.name).name.rpartition(".")[0] for m in tar
                 if m.isfile() and Path(m.name).name.rpartition(".")[2].lower() in IMAGE_EXTS}
    return pq.ParquetFile(shard.parquet).metadata.num_rows + len(stems - keys)


def validate(shards: list[Shard]) -> None:
    """Per-shard problems surface as failed rows or an InputError while each shard is ingested."""


def ingest_shard(shard: Shard, cfg=None) -> pa.Table:
    """The ingest table of one shard (pure: reads inputs, returns a table)."""
    if not shard.data.exists():
        raise InputError(f"{shard.data}: tar missing beside {shard.parquet.name}")
    try:
        table = pq.read_table(shard.parquet)
    except Exception as exc:
        raise InputError(f"{shard.parquet}: unreadable parquet ({exc})") from exc
    if "key" not in table.column_names:
        raise InputError(f"{shard.parquet}: no 'key' column (img2dataset writes each sample's key, the name "
                         "of its tar members); rows cannot be matched to images or exported without it")
    meta = table.to_pylist()
    members, ambiguous = _tar_members(shard.data)
    rows = []
    first_row: dict[str, int] = {}
    with tarfile.open(shard.data, "r:*") as tar:
        for i, rec in enumerate(meta):
            key = str(rec["key"]) if rec.get("key") not in (None, "") else f"{shard.name}{i:04d}"
            row = {"key": key, "shard": shard.name, "row": i, "gid": make_gid(shard.index, i),
                   "url": as_text(rec.get("url")), "caption": as_text(rec.get("caption")), "status": "ok", "error": None,
                   "member": None, "sha256": None, "width": rec.get("original_width") or rec.get("width"),
                   "height": rec.get("original_height") or rec.get("height"), "nbytes": None,
                   "uid": normalize_uid(rec.get("uid")) or content_uid(as_text(rec.get("url")), as_text(rec.get("caption")))}
            img = next((m for ext, m in members.get(key, {}).items() if ext in IMAGE_EXTS), None)
            if key in first_row:
                row.update(status="failed", error=f"key {key} appears twice in {shard.parquet.name} (rows "
                                                  f"{first_row[key]} and {i}): only the first is kept")
            elif rec.get("status", "success") != "success":
                row.update(status="failed", error=f"img2dataset: {rec.get('status')}: {rec.get('error_message')}")
            elif key in ambiguous:
                row.update(status="failed", error=ambiguous[key])
            elif img is None:
                row.update(status="failed", error=f"image for key {key} missing from {shard.data.name}")
            else:
                f = tar.extractfile(img)
                data = f.read() if f else b""
                row.update(member=img.name, sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data))
            first_row.setdefault(key, i)
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


def read_images(shard: Shard, wanted: dict) -> list[tuple[object, bytes]]:
    """(value, image bytes) for the wanted member names of a shard (name -> value), in tar order."""
    return read_tar_members(str(shard.data), wanted)


def read_tar_members(tar_path: str, wanted: dict) -> list[tuple[object, bytes]]:
    """(value, image bytes) for the wanted member names (name -> value, e.g. a gid), in tar order."""
    out = []
    seen = set()
    with tarfile.open(tar_path, "r:*") as tar:
        for m in tar:
            gid = wanted.get(m.name)
            if gid is not None and m.name not in seen:     # a repeated name: its first copy only
                seen.add(m.name)
                f = tar.extractfile(m)
                out.append((gid, f.read() if f else b""))
    return out
