"""Input source: Hugging Face parquet files with the image bytes in a column (`datasets`' `Image`
feature, a struct of `bytes` and `path`, or plain binary), plus text columns.

Every `*.parquet` under the input folder (any depth, sorted by relative path; hidden files and
folders left out) is one shard, read in row batches of BATCH_ROWS (never a file's images at once).
A row per parquet row:

    key       the `input.key_column` value where set (a null or empty one: as if unset), else
              `<relative file path without .parquet>/<row index>` (`train/part-00000/17`)
    caption   `input.text_column`, else the first of text, caption, problem the file has (as text:
              binary captions are decoded, other types written as str)
    url, uid  from `url` / `uid` columns where present; the uid else blake2b(key + caption)
    member    `<image column>[<row index>]`: how read_images finds the bytes again
    sha256, nbytes, width, height   of the image bytes (size from the header, no decode)

A null image, a struct without bytes (a `path` that was never embedded), empty bytes or a key
repeated in the file are failed rows with the reason; bytes that do not decode are failed by the
embed stage like any other source's. A file without the image column (or the configured text /
key column) is an InputError naming the file, the column and the columns it has.

The hf export copies the kept rows of each file with the file's own schema and columns (image
column included, bytes untouched): `copy_rows`.
"""
from __future__ import annotations

import bisect
import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .base import SCHEMA, InputError, Shard, as_text, content_uid, make_gid, normalize_uid
from .folder import _size

FORMAT = "hf"
HAS_IMAGES = True       # the embed stage decodes them; the hf export copies the rows with their bytes
TAR_SHARDS = False      # no tar members for the webdataset export (keep / hf exports)
LOOKS_FOR = "*.parquet files with an image column (Hugging Face Image feature {bytes, path}, or binary)"
TEXT_COLUMNS = ("text", "caption", "problem")
BATCH_ROWS = 256


def _parquet_files(root: Path) -> list[Path]:
    """`*.parquet` files under `root` (links to files included, hidden names left out), sorted by
    relative path."""
    out = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(folder, f) for f in files if f.endswith(".parquet") and not f.startswith(".")]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _is_binary(t: pa.DataType) -> bool:
    return (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)
            or getattr(pa.types, "is_binary_view", lambda _: False)(t))


def _image_kind(t: pa.DataType) -> str | None:
    """'struct' for a {bytes, path} struct (the `Image` feature), 'binary' for raw bytes, else None."""
    if pa.types.is_struct(t):
        i = t.get_field_index("bytes")
        return "struct" if i >= 0 and _is_binary(t.field(i).type) else None
    return "binary" if _is_binary(t) else None


def detect(folder: Path) -> bool:
    """Whether a folder holds parquet files with an image column (struct of bytes, or binary).
    img2dataset shards and released embeddings (parquet files too) are theirs, as before."""
    from . import embeddings, img2dataset
    folder = Path(folder)
    if img2dataset.detect(folder) or embeddings.detect(folder):
        return False
    for p in _parquet_files(folder)[:16]:
        try:
            schema = pq.read_schema(p)
        except Exception:       # not parquet, or unreadable: not this format's file
            continue
        if any(_image_kind(f.type) for f in schema):
            return True
    return False


def list_shards(folder: str | Path) -> list[Shard]:
    """A shard per parquet file: parquet = the file, data = the input folder (keys are relative to it)."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise InputError(f"{folder}: input folder not found")
    files = _parquet_files(root)
    if not files:
        raise InputError(f"{root}: no .parquet files in the folder tree")
    for p in files:
        if not p.resolve().is_relative_to(root) or not p.resolve().is_file():
            raise InputError(f"{p}: a link that leads out of {root} (or to no file); move the file into the input folder")
    return [Shard(i, f"{i:05d}", p, root) for i, p in enumerate(files)]


def _file(shard: Shard) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(shard.parquet)
    except Exception as exc:
        raise InputError(f"{shard.parquet}: unreadable parquet ({exc})") from exc


def validate(shards: list[Shard]) -> None:
    """Every file's footer readable before any work; columns are checked per file at ingest."""
    for s in shards:
        _file(s)


def count_rows(shard: Shard) -> int:
    """Input rows of a shard counted from its file alone: the parquet's rows."""
    return _file(shard).metadata.num_rows


def _columns(shard: Shard, schema: pa.Schema, cfg) -> dict:
    """The file's columns for image, text, key, url and uid (None where absent); InputError naming
    the file and the column when a configured one is missing or the image column holds no bytes."""
    names = schema.names
    image = getattr(cfg, "image_column", "") or "image"
    text = getattr(cfg, "text_column", "")
    key = getattr(cfg, "key_column", "")
    has = ", ".join(names)
    if image not in names:
        raise InputError(f"{shard.parquet}: no image column {image!r} (columns: {has}); "
                         "set input.image_column to the column that holds the images")
    kind = _image_kind(schema.field(image).type)
    if kind is None:
        raise InputError(f"{shard.parquet}: column {image!r} is {schema.field(image).type}, not images "
                         "(a struct of bytes and path, or binary); set input.image_column")
    for field, col in (("text_column", text), ("key_column", key)):
        if col and col not in names:
            raise InputError(f"{shard.parquet}: no column {col!r} (input.{field}; columns: {has})")
    if not text:
        text = next((c for c in TEXT_COLUMNS if c in names), None)
    return {"image": image, "kind": kind, "text": text or None, "key": key or None,
            "url": "url" if "url" in names else None, "uid": "uid" if "uid" in names else None}


def _blob(value, kind: str):
    """(bytes or None, why there are none)."""
    if value is None:
        return None, "is null"
    if kind == "struct":
        data = value.get("bytes")
        if data is None:
            path = value.get("path")
            return None, f"has no bytes (path {path!r} was never embedded)" if path else "has no bytes"
        value = data
    if not len(value):
        return None, "holds empty bytes"
    return bytes(value), None


def ingest_shard(shard: Shard, cfg=None) -> pa.Table:
    """The ingest table of one parquet file, read in batches of BATCH_ROWS rows."""
    pf = _file(shard)
    cols = _columns(shard, pf.schema_arrow, cfg)
    rel = shard.parquet.relative_to(shard.data).with_suffix("").as_posix()
    read = list(dict.fromkeys(c for c in (cols["image"], cols["text"], cols["key"], cols["url"], cols["uid"]) if c))
    rows: list[dict] = []
    first_row: dict[str, int] = {}
    i = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=read):
        get = {c: batch.column(c).to_pylist() for c in read if c != cols["image"]}
        images = batch.column(cols["image"])
        for j in range(batch.num_rows):
            value = lambda c: get[c][j] if c else None   # noqa: E731
            key = as_text(value(cols["key"]))
            key = key if key not in (None, "") else f"{rel}/{i}"
            caption, url = as_text(value(cols["text"])), as_text(value(cols["url"]))
            row = {"key": key, "shard": shard.name, "row": i, "gid": make_gid(shard.index, i), "url": url,
                   "caption": caption, "status": "ok", "error": None, "member": None, "sha256": None,
                   "width": None, "height": None, "nbytes": None,
                   "uid": normalize_uid(value(cols["uid"])) or content_uid(key, caption)}
            data, why = _blob(images[j].as_py(), cols["kind"])
            if key in first_row:
                row.update(status="failed", error=f"key {key} appears twice in {shard.parquet.name} (rows "
                                                  f"{first_row[key]} and {i}): only the first is kept")
            elif data is None:
                row.update(status="failed", error=f"image column {cols['image']!r} {why} in "
                                                  f"{shard.parquet.name} row {i}")
            else:
                row.update(member=f"{cols['image']}[{i}]", sha256=hashlib.sha256(data).hexdigest(),
                           nbytes=len(data), **_size(data))
            first_row.setdefault(key, i)
            rows.append(row)
            i += 1
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _member_row(member: str) -> tuple[str, int]:
    column, _, row = member.rpartition("[")
    return column, int(row.rstrip("]"))


def _row_groups(pf: pq.ParquetFile) -> list[tuple[int, int, int]]:
    """(row group, first row, end row) of every row group."""
    out, start = [], 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        out.append((g, start, start + n))
        start += n
    return out


def _batches(pf: pq.ParquetFile, rows, columns: list[str] | None):
    """(first row, batch) of the row groups that hold any of `rows`, BATCH_ROWS rows at a time."""
    order = sorted(rows)
    for g, start, end in _row_groups(pf):
        i = bisect.bisect_left(order, start)
        if i == len(order) or order[i] >= end:
            continue
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[g], columns=columns):
            yield start, batch
            start += batch.num_rows


def read_images(shard: Shard, wanted: dict) -> list[tuple[object, bytes]]:
    """(value, image bytes) for the wanted members (`column[row]` -> value), in row order; read
    only from the row groups that hold them, a batch at a time."""
    by_column: dict[str, dict[int, object]] = {}
    for member, value in wanted.items():
        column, row = _member_row(member)
        by_column.setdefault(column, {})[row] = value
    pf = _file(shard)
    out = []
    for column, rows in by_column.items():
        kind = _image_kind(pf.schema_arrow.field(column).type)
        order = sorted(rows)
        for start, batch in _batches(pf, rows, [column]):
            col = batch.column(0)
            lo, hi = bisect.bisect_left(order, start), bisect.bisect_left(order, start + batch.num_rows)
            for r in order[lo:hi]:
                data, _ = _blob(col[r - start].as_py(), kind)
                if data is not None:
                    out.append((r, rows[r], data))
    return [(value, data) for _, value, data in sorted(out, key=lambda t: t[0])]


def copy_rows(shard: Shard, members: list[str], out: Path) -> int:
    """The rows of `members` copied from the shard's file into `out`, in file order, with the file's
    own schema (its metadata, HF features included) and every column unchanged; returns the rows."""
    from ..core.io import parquet_writer
    keep = {_member_row(m)[1] for m in members}
    pf = _file(shard)
    n = 0
    with parquet_writer(Path(out), pf.schema_arrow) as writer:
        for start, batch in _batches(pf, keep, None):
            mask = pa.array([start + j in keep for j in range(batch.num_rows)], pa.bool_())
            part = batch.filter(mask)
            if part.num_rows:
                writer.write_table(pa.Table.from_batches([part], schema=pf.schema_arrow))
                n += part.num_rows
    return n
