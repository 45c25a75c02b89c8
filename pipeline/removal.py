"""`dedup2b remove`: a removal request (takedown, opt-out) applied to a built index and its runs.

1. The rows: every copy of the given images (`lookup.find`: the index's model, exact products over
   the stored vectors, the pixel check where the rows' images are at hand; a match the pixel check
   rejects is no copy), or the rows of the listed keys; then every row of their duplicate groups
   (the registry's group ids, which an incremental run's rows share with the earlier group they
   joined). A listed key the index does not hold is kept in the request: a later run that ingests
   it removes it.
2. The log: one request in the index's requests/ (lib/requests.py; written by this command alone).
3. The outputs: every run registered in the index whose folder is still there runs its report and
   export stages again. The request is part of their fingerprint, so they are pending; the report
   marks the rows `removed_reason = request`, the export writes the keep-lists and shards without
   them. Input rows = kept + removed + failed still holds (a request moves rows from kept to removed).
Later incremental runs against the index read the same log in their report stage.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import lookup
from .lib import requests
from .lib.registry import registry_dir


def read_keys(path) -> list[str]:
    """Keys of a keys file: one a line, blank lines and surrounding spaces ignored, order kept."""
    keys = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    keys = list(dict.fromkeys(k for k in keys if k))
    if not keys:
        raise lookup.FindError(f"{path}: no keys (one a line)")
    return keys


def _registry(index: lookup.Index, column: str, values) -> pd.DataFrame:
    """The registry's rows whose `column` is one of `values` (a filtered read: no whole registry)."""
    values = list(values)
    path = registry_dir(index.folder) / "registry.parquet"
    cols = ["gid", "key", "group_id", "run"]
    if not values:
        return pq.read_schema(path).empty_table().select(cols).to_pandas()
    return pq.read_table(path, columns=cols, filters=[(column, "in", values)]).to_pandas()


def request_rows(index: lookup.Index, images=None, keys=None, threshold=None, verify=None, warn=None):
    """The rows a request removes (requests.SCHEMA columns) and what to say about it."""
    info: dict = {}
    if images is not None:
        found = lookup.find(index, images, threshold=threshold, verify=verify, warn=warn)
        if not found.attrs["queries"]:
            raise lookup.FindError("none of the given files could be read as an image; nothing logged")
        rejected = found["pixel_check"].fillna(True) == False   # noqa: E712 (nullable boolean)
        info.update(images=[str(p) for p in images], queries=found.attrs["queries"],
                    threshold=found.attrs["threshold"], rejected_by_pixels=int(rejected.sum()))
        found = found[~rejected]
        named = pd.DataFrame({"gid": found["gid"].to_numpy(np.int64), "via": "image",
                              "query": found["query"].astype(str).to_numpy(),
                              "similarity": found["similarity"].to_numpy(np.float32)})
        named = named.drop_duplicates("gid")
        missing: list[str] = []
    else:
        hit = _registry(index, "key", keys)
        named = pd.DataFrame({"gid": hit["gid"].to_numpy(np.int64), "via": "key", "query": hit["key"].to_numpy(),
                              "similarity": np.full(len(hit), np.nan, np.float32)})
        missing = sorted(set(keys) - set(hit["key"]))
        info.update(keys=len(keys), keys_not_in_index=len(missing))
    named = named.merge(_registry(index, "gid", named["gid"].tolist()), on="gid", how="inner")
    members = _registry(index, "group_id", named["group_id"].unique().tolist())
    members = members[~members["gid"].isin(named["gid"])]
    first = named.drop_duplicates("group_id").set_index("group_id")["query"]
    members = members.assign(via="group", query=members["group_id"].map(first).to_numpy(),
                             similarity=np.float32(np.nan))
    later = pd.DataFrame({"gid": pd.array([None] * len(missing), dtype="Int64"), "key": missing,
                          "group_id": pd.array([None] * len(missing), dtype="Int64"), "run": None, "via": "key",
                          "query": missing, "similarity": np.float32(np.nan)})
    rows = pd.concat([named, members, later], ignore_index=True)[requests.SCHEMA.names]
    info["rows"] = int(rows["gid"].notna().sum())
    info["rows_by_via"] = {k: int(v) for k, v in rows[rows["gid"].notna()]["via"].value_counts().items()}
    return pa.Table.from_pandas(rows, schema=requests.SCHEMA, preserve_index=False), info


def apply(index: lookup.Index, ex, log=print) -> list[dict]:
    """Report + export again for every registered run whose folder is there (the request makes them
    pending); a run whose folder or input is gone is named and left."""
    from .core.config import from_dict
    from .core.run import read_manifest
    from .driver import run_stages
    done = []
    for entry in index.target.runs:
        run_dir = Path(entry["run_dir"])
        try:
            data = read_manifest(run_dir)["config"]
            data["run_dir"] = str(run_dir)
            stats = run_stages(from_dict(data), ex, ("report", "export"), log=lambda *_: None)
        except (OSError, ValueError) as exc:
            log(f"  not re-exported   {run_dir}: {exc}")
            done.append({"run_dir": str(run_dir), "error": str(exc)})
            continue
        rep, exp = stats["report"], stats["export"]
        done.append({"run_dir": str(run_dir), "kept": exp["kept"], "removed": exp["removed"],
                     "failed": exp["failed"], "removed_by_request": rep["removed_by_reason"].get("request", 0),
                     "invariant_holds": exp["invariant_holds"]})
    return done


def remove(index_folder, images=None, keys=None, threshold=None, verify=None, ex=None, warn=None, log=print) -> dict:
    """Record a removal request in the index and apply it to its runs' reports and exports.
    Returns {request, rows, rows_by_via, ..., runs: [per-run kept / removed / failed]}."""
    if (images is None) == (keys is None):
        raise lookup.FindError("give images or keys (one of the two)")
    index = lookup.open_index(index_folder)
    rows, info = request_rows(index, images, keys, threshold, verify, warn)
    name = requests.write(index.folder, rows, info)
    if ex is None:
        from .core.executor import LocalExecutor
        ex = LocalExecutor()
    runs = apply(index, ex, log)
    return {"request": name, "log": str(requests.requests_dir(index.folder)), **info, "runs": runs}
