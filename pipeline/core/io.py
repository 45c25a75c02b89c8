"""Atomic files and per-shard done markers: the resume protocol every stage uses.

A stage writes each output to a temp name, `os.replace`s it into place, and writes the shard's
done marker last (row counts + config fingerprint). A shard counts as done only when its marker
exists, carries the current fingerprint, and every output it lists exists with the listed size.
"""
from __future__ import annotations

import json
import os
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


# numpy reads a .npy header with ast.literal_eval, and CPython 3.11's AST constructor keeps one
# recursion count per interpreter: two threads parsing at once can fail with "SystemError: AST
# constructor recursion depth mismatch" (cpython gh-106905). The local executor runs a stage's
# tasks in threads, so every .npy / .npz this package reads is opened under one lock (headers
# only; a memory map's pages are read after it)
_NPY_LOCK = threading.Lock()


def load_npy(path, mmap: bool = False, keys=None):
    """np.load of a .npy (memory-mapped with `mmap`) or of a .npz (a dict of its arrays: all of
    them, or those of `keys` it holds; the others are not read), pickles refused, safe across
    threads."""
    with _NPY_LOCK:
        if str(path).endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files if keys is None or k in keys}
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


@contextmanager
def _published(path: Path):
    """A temp name beside `path`; moved onto `path` when the block ends without error, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    with _published(path) as tmp:
        write(tmp)
    return Path(path)


def write_parquet(path: Path, table: pa.Table) -> Path:
    return _atomic(path, lambda p: pq.write_table(table, p, compression="zstd"))


@contextmanager
def parquet_writer(path: Path, schema: pa.Schema):
    """A parquet file written table by table (bounded memory), under its name only once complete."""
    with _published(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        yield writer


@contextmanager
def npy_writer(path: Path, dtype, shape: tuple[int, ...]):
    """A .npy file of `shape` written in row chunks (bounded memory): yields write(rows), which
    appends rows; under its name only once complete, with every row written."""
    dtype = np.dtype(dtype)
    with _published(path) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                 "fortran_order": False, "shape": tuple(shape)})
        count = [0]

        def write(rows: np.ndarray) -> None:
            f.write(np.ascontiguousarray(rows, dtype=dtype).tobytes())
            count[0] += len(rows)
        yield write
        if count[0] != shape[0]:
            raise ValueError(f"{path}: {count[0]} rows written, {shape[0]} declared")


def write_npy(path: Path, array: np.ndarray) -> Path:
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.save(f, array, allow_pickle=False)
    return _atomic(path, write)


def write_json(path: Path, obj: Any) -> Path:
    return _atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str)))


def write_bytes(path: Path, data: bytes) -> Path:
    return _atomic(path, lambda p: p.write_bytes(data))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def remove_orphan_temps(folder: Path) -> int:
    """Delete temp files a killed writer left behind; returns how many."""
    n = 0
    if Path(folder).exists():
        for p in Path(folder).rglob(".*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
    return n


class Marker:
    """The done marker of one unit of work (a shard, or a whole-corpus step)."""

    def __init__(self, folder: Path, unit: str):
        self.path = Path(folder) / "_done" / f"{unit}.json"

    def write(self, fingerprint: str, outputs: list[Path], **stats: Any) -> None:
        files = {str(p): Path(p).stat().st_size for p in outputs}
        write_json(self.path, {"fingerprint": fingerprint, "outputs": files, **stats})

    def read(self) -> dict[str, Any] | None:
        return read_json(self.path) if self.path.exists() else None

    def valid(self, fingerprint: str) -> bool:
        """Done with this fingerprint and every listed output present at its recorded size."""
        info = self.read()
        if not info or info.get("fingerprint") != fingerprint:
            return False
        return all(Path(p).exists() and Path(p).stat().st_size == size
                   for p, size in info.get("outputs", {}).items())


def ahead(fn: Callable, items) -> Iterator:
    """fn(item) for each item, in order, the next one computed on a thread of its own while the
    caller uses the current one: a stage that reads, transforms and writes shard by shard in one
    process keeps its second core busy (parquet reads and writes, and numpy, release the GIL).
    Holds two results at most."""
    from concurrent.futures import ThreadPoolExecutor
    items = list(items)
    if not items:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="ahead") as pool:
        current = pool.submit(fn, items[0])
        for i in range(1, len(items) + 1):
            result = current.result()
            if i < len(items):
                current = pool.submit(fn, items[i])
            yield result
