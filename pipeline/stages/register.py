"""register: make this run's rows searchable by later runs (incremental dedup, decontamination).
Writes the index folder's registry/ (registry.parquet, runs.json; for an incremental run, the
folder it searched against, extended with this run's rows and vectors). See lib/registry.py."""
from __future__ import annotations

import time

import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core.io import Marker
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
    rows = pq.read_table(run.group_rows_file(), columns=["gid", "group_id"])
    ingest = run.ingest_table(columns=["gid", "key", "caption"])
    nodes = ingest.filter(pc.is_in(ingest["gid"], rows["gid"])).sort_by("gid")
    texts = [normalize_text(t) for t in nodes["caption"].to_pylist()]
    out = registry.register(run, rows, nodes["key"].to_pylist(), texts)
    folder = run.dir(NAME)
    run.marker(NAME, run.run_id).write(run.fingerprint(NAME), [folder / "registry.parquet", folder / "runs.json"],
                                       rows=rows.num_rows)
    out["seconds"] = round(time.time() - t0, 3)
    return out
