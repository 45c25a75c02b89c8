"""Rows partitioned into buckets through files: a stage that must bring together rows that arrive
in another order (the group stage: the rows and edges of one component, which come shard by
shard and pair file by pair file) holds a fixed buffer while it partitions, then one bucket at a
time.

    spill = Spill(folder, n_buckets, schema)
    spill.write(bucket_of_each_row, table)    # any number of times
    table = spill.read(b)                     # bucket b's rows, in the order they were written

Rows wait in memory until the buffer holds `buffer` bytes; then every bucket's waiting rows are
appended to its file (Arrow IPC, one record batch per flush). A bucket nothing was written to
reads as an empty table of the schema. The folder is the caller's scratch: `close()`
removes it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

BUFFER = 64 << 20


class Spill:
    def __init__(self, folder: Path, n_buckets: int, schema: pa.Schema, buffer: int | None = None):
        self.folder, self.n, self.schema, self.buffer = Path(folder), int(n_buckets), schema, buffer or BUFFER
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.waiting: list[list[pa.Table]] = [[] for _ in range(self.n)]
        self.held = 0
        self.writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}

    def write(self, bucket: np.ndarray, table: pa.Table) -> None:
        if not table.num_rows:
            return
        table = table.select(self.schema.names).cast(self.schema)
        bucket = np.asarray(bucket, np.int64)
        if self.n == 1:
            self.waiting[0].append(table)
        else:
            order = np.argsort(bucket, kind="stable")      # each bucket's rows keep their order
            bounds = np.searchsorted(bucket[order], np.arange(self.n + 1))
            sorted_rows = table.take(pa.array(order))
            for b in np.flatnonzero(np.diff(bounds)).tolist():
                self.waiting[b].append(sorted_rows.slice(bounds[b], bounds[b + 1] - bounds[b]))
        self.held += table.nbytes
        if self.held >= self.buffer:
            self.flush()

    def flush(self) -> None:
        for b, parts in enumerate(self.waiting):
            if not parts:
                continue
            if b not in self.writers:
                self.writers[b] = pa.ipc.new_file(bucket_file(self.folder, b), self.schema)
            for batch in pa.concat_tables(parts).combine_chunks().to_batches():
                self.writers[b].write_batch(batch)
            parts.clear()
        self.held = 0

    def finish(self) -> None:
        """Every bucket's rows to its file (read by `file_batches` / `read_file`, in any process)."""
        self.flush()
        for w in self.writers.values():
            w.close()
        self.writers.clear()

    def read(self, b: int) -> pa.Table:
        """Bucket b's rows: its file's, then those still waiting."""
        parts = []
        if b in self.writers:
            self.writers.pop(b).close()
        path = bucket_file(self.folder, b)
        if path.exists():
            with pa.ipc.open_file(path) as f:       # read whole: the file is removed below
                parts.append(f.read_all())
            path.unlink()
        parts += self.waiting[b]
        self.waiting[b] = []
        return pa.concat_tables(parts) if parts else self.schema.empty_table()

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()
        self.waiting = [[] for _ in range(self.n)]
        shutil.rmtree(self.folder, ignore_errors=True)


def bucket_file(folder: Path, b: int) -> Path:
    return Path(folder) / f"{b:06d}.arrow"


def file_batches(folder: Path, b: int, rows: int = 1 << 20):
    """Bucket b's rows of a finished spill in `folder`, in tables of at most `rows`, read from its
    file memory-mapped (a table at a time is held); as often as asked, from any process."""
    path = bucket_file(folder, b)
    if not path.exists():
        return
    with pa.memory_map(str(path)) as source, pa.ipc.open_file(source) as f:
        for i in range(f.num_record_batches):
            batch = f.get_batch(i)
            for at in range(0, batch.num_rows, rows):
                yield pa.Table.from_batches([batch.slice(at, rows)])


def read_file(folder: Path, b: int, schema: pa.Schema) -> pa.Table:
    """Bucket b's rows of a finished spill in `folder`, whole (the file stays)."""
    path = bucket_file(folder, b)
    if not path.exists():
        return schema.empty_table()
    with pa.ipc.open_file(path) as f:
        return f.read_all()


def write_file(path: Path, table: pa.Table) -> None:
    with pa.ipc.new_file(path, table.schema) as w:
        w.write(table)
