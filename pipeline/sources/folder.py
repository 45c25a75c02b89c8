"""Input source: a folder tree of images (jpg, jpeg, png, webp, gif, bmp, tif, tiff), any depth.

A row per image file. Its key is its path relative to the root (`cats/tabby.jpg`, unique by
construction), its caption the text of a sidecar of the same name with `.txt` (`cats/tabby.txt`)
where one exists. Files are taken in sorted path order, FILES_PER_SHARD to a shard (shard i holds
files [i*N, (i+1)*N) of that order), so the tree must not change while a run works on it; the
report's invariant counts the files again. A link that leads out of the root is a failed row
(its bytes are never read); other files (sidecars, anything not an image) are not rows.

The webdataset export writes a kept file as a sample (webdataset_members): its bytes unchanged
under its own extension, its sidecar caption as .txt, a .json of the row; the sample's name is
the key with the dots of its file name escaped (sample_name), the key itself is in the .json.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from functools import lru_cache
from pathlib import Path

import pyarrow as pa

from .base import SCHEMA, InputError, Shard, content_uid, make_gid

FORMAT = "folder"
HAS_IMAGES = True
TAR_SHARDS = False      # no tar members to copy: the webdataset export writes webdataset_members
LOOKS_FOR = "image files (jpg, png, webp, gif, bmp, tiff) anywhere in a folder tree"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
FILES_PER_SHARD = 10_000


def _is_image(name: str) -> bool:
    stem, dot, ext = name.rpartition(".")
    return bool(dot) and ext.lower() in IMAGE_EXTS


@lru_cache(maxsize=4)
def _files(root: str) -> tuple[str, ...]:
    """Image files under `root` (links included, not followed into folders), as sorted relative
    posix paths."""
    out = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in files:
            if _is_image(name):
                out.append(Path(folder, name).relative_to(root).as_posix())
    return tuple(sorted(out))


def detect(folder: Path) -> bool:
    """Whether a folder tree holds image files."""
    for _, _, files in os.walk(folder, followlinks=False):
        if any(_is_image(f) for f in files):
            return True
    return False


def list_shards(folder: str | Path) -> list[Shard]:
    root = Path(folder).resolve()
    if not root.is_dir():
        raise InputError(f"{folder}: input folder not found")
    _files.cache_clear()
    n = len(_files(str(root)))
    if not n:
        raise InputError(f"{root}: no image files ({', '.join(IMAGE_EXTS)}) in the folder tree")
    return [Shard(i, f"{i:05d}", root, root) for i in range(-(-n // FILES_PER_SHARD))]


def shard_files(shard: Shard) -> tuple[str, ...]:
    return _files(str(shard.data))[shard.index * FILES_PER_SHARD:(shard.index + 1) * FILES_PER_SHARD]


def inside(root: Path, rel: str) -> Path | None:
    """The file of a relative path when it stays inside the root once links are resolved."""
    path = root / rel
    real = path.resolve()
    return path if real.is_relative_to(root.resolve()) and real.is_file() else None


def validate(shards: list[Shard]) -> None:
    """Per-file problems are failed rows (see ingest_shard)."""


def count_rows(shard: Shard) -> int:
    """Input rows of a shard counted from the tree itself."""
    return len(shard_files(shard))


def _caption(root: Path, rel: str) -> str | None:
    side = inside(root, rel.rpartition(".")[0] + ".txt")
    if side is None:
        return None
    return side.read_bytes().decode("utf-8", errors="replace").strip()


def _size(data: bytes) -> dict:
    """width / height from the image header (no decode): the representative rule prefers most
    pixels, as img2dataset's original_width / original_height give it for shards."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as img:
            return {"width": img.size[0], "height": img.size[1]}
    except Exception:           # not decodable: the embed stage fails the row with the reason
        return {}


def ingest_shard(shard: Shard, cfg=None) -> pa.Table:
    root = shard.data
    rows = []
    for i, rel in enumerate(shard_files(shard)):
        caption = _caption(root, rel)
        row = {"key": rel, "shard": shard.name, "row": i, "gid": make_gid(shard.index, i), "url": None,
               "caption": caption, "status": "ok", "error": None, "member": None, "sha256": None,
               "width": None, "height": None, "nbytes": None, "uid": content_uid(rel, caption)}
        path = inside(root, rel)
        if path is None:
            row.update(status="failed", error=f"{rel}: a link that leads out of {root} (or to no file); not read")
        else:
            try:
                data = path.read_bytes()
            except OSError as exc:
                row.update(status="failed", error=f"{rel}: unreadable ({exc.strerror})")
            else:
                row.update(member=rel, sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data),
                           **_size(data))
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def read_images(shard: Shard, wanted: dict) -> list[tuple[object, bytes]]:
    """(value, bytes) for the wanted relative paths (path -> value), in path order; never through
    a link out of the root."""
    out = []
    for rel in sorted(wanted):
        path = inside(shard.data, rel)
        if path is not None:
            out.append((wanted[rel], path.read_bytes()))
    return out


def sample_name(key: str) -> str:
    """The webdataset sample name of a key (a relative path): dots of its file name (extension
    included, so `a.jpg` and `a.png` stay two samples) written %2E, `%` as %25. webdataset takes a
    sample's name up to the first dot of the member's file name; folders may hold dots."""
    folder, _, name = key.rpartition("/")
    name = name.replace("%", "%25").replace(".", "%2E")
    return f"{folder}/{name}" if folder else name


def webdataset_members(shard: Shard, row: dict) -> list[tuple[str, bytes, float]]:
    """A kept row as webdataset members (name, bytes, mtime): the image file's bytes under its own
    extension, the sidecar caption's bytes as `.txt` where it has one, and a `.json` of the row
    (key = relative path, caption, sha256, width, height, uid). Nothing is re-encoded."""
    root, rel = shard.data, row["key"]
    path = inside(root, rel)
    if path is None:
        raise FileNotFoundError(f"{root / rel}: kept file no longer in the tree")
    sample = sample_name(rel)
    out = [(f"{sample}.{rel.rpartition('.')[2].lower()}", path.read_bytes(), path.stat().st_mtime)]
    side = inside(root, rel.rpartition(".")[0] + ".txt")
    if side is not None:
        out.append((f"{sample}.txt", side.read_bytes(), side.stat().st_mtime))
    meta = {k: row.get(k) for k in ("key", "caption", "sha256", "width", "height", "uid")}
    out.append((f"{sample}.json", json.dumps(meta, ensure_ascii=False).encode(), 0.0))
    return out
