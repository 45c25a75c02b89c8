"""register: make this run's rows searchable by later runs (incremental dedup, decontamination).
Writes the index folder's registry/ (registry.parquet, runs.json; for an incremental run, the
folder it searched against, extended with this run's rows and vectors). See lib/registry.py."""
from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core.io import Marker, ahead
from ..core.run import Run
from ..lib import registry
from .group import normalize_text

NAME = "register"
FIELDS = ("input", "embed.model", "codec", "search", "verify", "group", "against", "decontaminate")


def units(run: Run) -> list[Marker]:
    return [run.marker(NAME, run.run_id)]


def run(run: Run, ex, stats: dict) -> dict:
    if not run.pending(NAME, [run.run_id]):
        return {"skipped": True}
    t0 = time.time()
    n_rows = sum(pq.ParquetFile(run.group_rows_file(s.name)).metadata.num_rows for s in run.shards)

    def shard_rows(shard):
        """One shard's registry rows (None: it has none); two shards' rows, keys and captions held
        at most: the next shard's are read on a thread of their own while one is written (ahead)."""
        rows = pq.read_table(run.group_rows_file(shard.name), columns=["gid", "group_id"]).sort_by("gid")
        if not rows.num_rows:
            return None
        gids = rows["gid"].to_numpy()
        t = pq.read_table(run.ingest_file(shard.name), columns=["gid", "key", "caption"])
        t = t.filter(pc.is_in(t["gid"], pa.array(gids))).sort_by("gid")
        return (gids, t["key"], rows["group_id"].to_numpy(),
                pa.array([normalize_text(c) for c in t["caption"].to_pylist()], pa.string()))

    parts = (part for part in ahead(shard_rows, run.shards) if part is not None)
    out = registry.register(run, n_rows, parts, ex)
    folder = run.dir(NAME)
    run.marker(NAME, run.run_id).write(run.fingerprint(NAME), [folder / "registry.parquet", folder / "runs.json"],
                                       rows=n_rows)
    out["seconds"] = round(time.time() - t0, 3)
    return out
