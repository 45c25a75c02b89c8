"""Config paths for jobs: local paths made absolute, fsspec URLs staged on a disk every node sees.

The stages read and write POSIX paths (memory-mapped vectors, tar members, atomic renames), so every
node of a cluster must see the run directory at the same path (NFS, a parallel file system, a FUSE
mount). Inputs and outputs may still be fsspec URLs (`s3://…`, `gs://…`, `hf://…`):
an input URL is copied once into `--stage-dir` (files already there with the same size are kept, so
a rerun copies only what is missing), and an output URL (`run_dir`, `index_dir`) is worked on under
`--stage-dir` and uploaded when the job ends.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import re
from pathlib import Path

# config fields that hold paths (those absent from a config are skipped)
PATH_FIELDS = ("input.path", "run_dir", "index_dir", "against", "decontaminate.eval")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str) -> bool:
    return bool(_URL.match(path)) and not path.startswith("file://")


def local(path: str, base: Path) -> str:
    """A local path (or file:// URL) made absolute against base."""
    p = Path(path[len("file://"):] if path.startswith("file://") else path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _staged(url: str, stage_dir: Path, kind: str) -> Path:
    name = url.rstrip("/").rsplit("/", 1)[-1] or "root"
    return stage_dir / f"{kind}-{name}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"


def stage_in(url: str, dest: Path, log=print) -> Path:
    """Copy every file under url into dest, keeping files already there with the same size."""
    import fsspec
    fs, root = fsspec.core.url_to_fs(url)
    copied = kept = 0
    for src, info in sorted(fs.find(root, detail=True).items()):
        out = dest / posixpath.relpath(src, root)
        if out.exists() and out.stat().st_size == info.get("size"):
            kept += 1
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".staging")
        fs.get_file(src, str(tmp))
        os.replace(tmp, out)
        copied += 1
    log(f"[stage-in] {url} -> {dest}: {copied} files copied, {kept} already there")
    return dest


def stage_out(src: Path, url: str, log=print) -> None:
    """Upload every file under src to url (the run's outputs after the job)."""
    import fsspec
    fs, root = fsspec.core.url_to_fs(url)
    files = [p for p in sorted(src.rglob("*")) if p.is_file()]
    for p in files:
        target = posixpath.join(root, p.relative_to(src).as_posix())
        fs.makedirs(posixpath.dirname(target), exist_ok=True)
        fs.put_file(str(p), target)
    log(f"[stage-out] {src} -> {url}: {len(files)} files")


def resolve(data: dict, base: Path, stage_dir: str | None, log=print) -> list[tuple[Path, str]]:
    """Rewrite the path fields of a raw config dict in place: local paths absolute, input URLs staged
    in; returns the (local dir, URL) pairs to upload when the run is done."""
    uploads: list[tuple[Path, str]] = []

    def one(value: str, field: str) -> str:
        if not value:
            return value
        if not is_url(value):
            return local(value, base)
        if not stage_dir:
            raise ValueError(f"{field}: {value} is a URL; give --stage-dir, a folder every node sees, "
                             "to stage it in")
        stage = Path(local(stage_dir, base))
        if field in ("run_dir", "index_dir"):
            work = _staged(value, stage, "out")
            uploads.append((work, value))
            return str(work)
        return str(stage_in(value, _staged(value, stage, "in"), log))

    for field in PATH_FIELDS:
        *parents, leaf = field.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node[leaf]
        node[leaf] = [one(v, field) for v in value] if isinstance(value, list) else one(value, field)
    return uploads
