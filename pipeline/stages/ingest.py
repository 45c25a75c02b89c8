"""ingest: every input row -> ingest/NNNNN.parquet (key, gid = shard << 32 | row, sha256, uid,
status, error ...), through the input source of `input.format` (sources/). Keys must be unique
across the input; a repeat is an error naming both shards."""
from __future__ import annotations

import pyarrow.parquet as pq

from ..core.io import Marker, write_parquet
from ..core.run import Run
from ..sources.base import check_unique_keys

NAME = "ingest"
FIELDS = ("input",)


def units(run: Run) -> list[Marker]:
    return [run.marker(NAME, s.name) for s in run.shards]


def ingest_one(job: dict) -> dict:
    run: Run = job["run"]
    shard = run.shard_by_index[job["index"]]
    table = run.source.ingest_shard(shard, run.cfg.input)
    path = write_parquet(run.ingest_file(shard.name), table)
    ok = sum(1 for s in table["status"].to_pylist() if s == "ok")
    run.marker(NAME, shard.name).write(run.fingerprint(NAME), [path], rows=table.num_rows, ok=ok)
    return {"rows": table.num_rows, "ok": ok}


def run(run: Run, ex, stats: dict) -> dict:
    run.source.validate(run.shards)          # every file, before any work
    pending = set(run.pending(NAME, run.shard_names()))
    jobs = [{"run": run, "shard": s.name, "index": s.index} for s in run.shards if s.name in pending]
    results = ex.map(ingest_one, jobs, desc="ingest", num_cpus=1)
    rows = sum(pq.ParquetFile(run.ingest_file(n)).metadata.num_rows for n in run.shard_names())
    check_unique_keys({n: (lambda n=n: pq.read_table(run.ingest_file(n), columns=["key"])["key"].combine_chunks())
                       for n in run.shard_names()}, rows)
    return {"shards": len(jobs), "rows": sum(r["rows"] for r in results), "ok": sum(r["ok"] for r in results)}
