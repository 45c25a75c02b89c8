"""Removal requests of an index: the append-only log `dedup2b remove` writes and the report reads.

An index folder's requests/ is written by `dedup2b remove` alone (one writer: the index stage owns
the codec files, the register stage registry/). A request is two files, written once, never
changed (the log grows by whole requests; `os.replace` publishes each file whole):

  requests/REQ.parquet   the rows it removes: gid, key, group_id, run (its run dir), via (image: a
                         copy of a given image | key: a listed key | group: in the group of one of
                         those), query (the image or key that named it), similarity (image matches);
                         a listed key the index does not hold yet is a row with a null gid, so a
                         later run that ingests that key removes it
  requests/REQ.json      what was asked (images or keys file), when, the threshold, rows by via,
                         keys not found; written last: a request counts once its json exists

REQ = `req-<UTC time to the microsecond>-<8 hex>`: sorted names are the order the requests came
in. The report stage of every run that registered into the index reads the whole log (`Requests`):
a row is removed
with reason `request` when it is a requested row, sits in a requested row's group (an incremental
run's copy of a removed image joins that earlier group), or carries a requested key. `version`
(a digest of the request names) is part of the report's and export's fingerprints, so a new
request makes them pending and a rerun applies it.
"""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.arrays import unique
from ..core.io import read_json, write_json, write_parquet

SCHEMA = pa.schema([("gid", pa.int64()), ("key", pa.string()), ("group_id", pa.int64()), ("run", pa.string()),
                    ("via", pa.string()), ("query", pa.string()), ("similarity", pa.float32())])


def requests_dir(index_folder) -> Path:
    return Path(index_folder) / "requests"


def names(index_folder) -> list[str]:
    """The requests of an index, oldest first (those whose json, written last, exists)."""
    folder = requests_dir(index_folder)
    return sorted(p.stem for p in folder.glob("req-*.json")) if folder.is_dir() else []


def version(index_folder) -> str:
    """A digest of the index's requests ('' when it has none: fingerprints stay as they were)."""
    got = names(index_folder)
    return hashlib.sha256("\n".join(got).encode()).hexdigest()[:16] if got else ""


def write(index_folder, rows: pa.Table, info: dict) -> str:
    """Add one request to the log: its rows, then its json (last). Returns its name."""
    now = datetime.now(timezone.utc)
    name = f"req-{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{uuid.uuid4().hex[:8]}"    # microseconds: sorted = in order
    folder = requests_dir(index_folder)
    write_parquet(folder / f"{name}.parquet", rows.cast(SCHEMA))
    write_json(folder / f"{name}.json", {"request": name, "time": now.isoformat(timespec="microseconds"), **info})
    return name


def log(index_folder) -> list[dict]:
    """Every request's json, oldest first."""
    return [read_json(requests_dir(index_folder) / f"{n}.json") for n in names(index_folder)]


@dataclass
class Requests:
    """What the index's log removes: requested gids, their group ids, the listed keys."""
    gids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    groups: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    keys: frozenset = frozenset()
    count: int = 0

    def __bool__(self) -> bool:
        return self.count > 0


def read(index_folder) -> Requests:
    got = names(index_folder)
    if not got:
        return Requests()
    t = pa.concat_tables([pq.read_table(requests_dir(index_folder) / f"{n}.parquet") for n in got]).to_pandas()
    found = t[t["gid"].notna()]
    return Requests(gids=unique(found["gid"].to_numpy(np.int64)),
                    groups=unique(found["group_id"].dropna().to_numpy(np.int64)),
                    keys=frozenset(t.loc[t["via"] == "key", "key"].dropna().tolist()), count=len(got))
