"""export: the kept rows, losslessly, selected by key (never by position).

export/webdataset/NNNNN.tar     kept samples resharded to export.rows_per_shard (0: one per input shard),
                                every member (image, .txt, .json) byte-identical, in input order; for
                                a source without tars (folder: webdataset_members) the kept files'
                                bytes unchanged, sidecar caption as .txt, the row as .json
export/webdataset/NNNNN.parquet the input parquet's rows for the tar's samples, in the tar's order
                                (a column typed differently in two input shards: binary where
                                one is binary, else text; concat_rows) (folder: key, sample,
                                caption, sha256, width, height, uid)
export/webdataset/sizes.json    samples per tar (open_clip reads it for the sample count)
export/keep.parquet, remove.parquet   keys with group id, representative, similarity, removed_reason
export/hf/NNNNN.parquet         HF-style: image {bytes, path} embedded, text, key, url, uid, group_id,
                                and the input parquet's other columns (formats: hf); for a source
                                with copy_rows (hf input): the kept rows of each input file, with
                                its schema and columns unchanged
export/subset.npy               DataComp-style sorted uid array (two uint64 halves of the 128-bit uid:
                                the input's uid field, else blake2b of url + caption)
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core.io import Marker, write_json, write_npy, write_parquet
from ..core.run import Run
from ..sources import Shard, source_for

NAME = "export"
FIELDS = ("input", "embed.model", "codec", "search", "verify", "group", "export", "against", "decontaminate",
          "requests")


def units(run: Run) -> list[Marker]:
    return [run.marker(NAME, NAME)]

UID_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8")])


def uid128(uids: list[str]) -> np.ndarray:
    """(hi, lo) uint64 halves of 128-bit hex uids (the ingest stage's `uid` column)."""
    out = np.empty(len(uids), UID_DTYPE)
    for i, u in enumerate(uids):
        out[i] = (int(u[:16], 16), int(u[16:32], 16))
    return out


def export_shard(job: dict) -> dict:
    """Write one output shard: the kept samples of its source shards, in order (runs in a worker).

    job: out (NNNNN.tar path), sources [(src tar, src parquet, [kept keys])]. Every member of a kept
    sample (image, .txt, .json, ...) is copied with its bytes, name and mode unchanged."""
    dst = Path(job["out"])
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    seen: list[str] = []
    metas = []
    with tarfile.open(tmp, "w") as out:
        for src_tar, src_parquet, keys in job["sources"]:
            wanted = set(keys)
            found = set()
            with tarfile.open(src_tar, "r:*") as src:
                for m in src:
                    key = Path(m.name).name.rpartition(".")[0]
                    if not m.isfile() or key not in wanted:
                        continue
                    info = tarfile.TarInfo(m.name)
                    info.size, info.mtime, info.mode = m.size, m.mtime, m.mode
                    out.addfile(info, src.extractfile(m))
                    if key not in found:
                        found.add(key)
                        seen.append(key)
            if found != wanted:
                raise RuntimeError(f"{src_tar}: kept samples missing from the tar: {sorted(wanted - found)[:5]}")
            metas.append(first_rows(pq.read_table(src_parquet), wanted))
    tmp.replace(dst)
    if metas:
        meta = concat_rows(metas)
    else:
        meta = pa.table({"key": pa.array([], pa.string())})
    if meta.num_rows:   # the parquet lists the samples in the tar's order
        order = {k: i for i, k in enumerate(seen)}
        meta = meta.take(np.argsort([order[str(k)] for k in meta["key"].to_pylist()], kind="stable"))
    write_parquet(dst.with_suffix(".parquet"), meta)
    return {"tar": dst.name, "samples": len(seen)}


def export_members_shard(job: dict) -> dict:
    """Write one output shard from a source without tars: each kept row's members as the source
    gives them (webdataset_members: bytes unchanged), and a parquet of the rows in the tar's order."""
    dst = Path(job["out"])
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    source = source_for(job["format"])
    rows = []
    with tarfile.open(tmp, "w") as out:
        for index, name, root, part in job["sources"]:
            shard = Shard(index, name, Path(root), Path(root))
            for row in part:
                members = source.webdataset_members(shard, row)
                for member, data, mtime in members:
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
                    out.addfile(info, io.BytesIO(data))
                rows.append({"key": row["key"], "sample": members[0][0].rpartition(".")[0],
                             **{k: row.get(k) for k in ("caption", "sha256", "width", "height", "uid")}})
    tmp.replace(dst)
    schema = pa.schema([("key", pa.string()), ("sample", pa.string()), ("caption", pa.string()),
                        ("sha256", pa.string()), ("width", pa.int64()), ("height", pa.int64()), ("uid", pa.string())])
    write_parquet(dst.with_suffix(".parquet"), pa.Table.from_pylist(rows, schema=schema))
    return {"tar": dst.name, "samples": len(rows)}


def first_rows(meta: pa.Table, keys: set[str]) -> pa.Table:
    """The parquet rows of these keys, the first of each only: a key the parquet repeats is a row
    ingest failed, never a second row of the kept sample."""
    first: dict[str, int] = {}
    for i, k in enumerate(meta["key"].cast(pa.string()).to_pylist()):
        if k in keys:
            first.setdefault(k, i)
    return meta.take(sorted(first.values()))


def concat_rows(metas: list[pa.Table]) -> pa.Table:
    """The input parquets' rows of one output shard as one table. A column whose type differs
    between them (integer keys in one shard, text in another; a binary caption column beside a
    text one) is written in one type: binary where any of them is binary (lossless), else text."""
    try:
        return pa.concat_tables(metas, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        pass
    types: dict[str, set] = {}
    for t in metas:
        for f in t.schema:
            types.setdefault(f.name, set()).add(f.type)
    common = {name: pa.binary() if any(pa.types.is_binary(k) or pa.types.is_large_binary(k) for k in kinds)
              else pa.string() for name, kinds in types.items() if len(kinds - {pa.null()}) > 1}
    out = []
    for t in metas:
        for name, to in common.items():
            if name in t.column_names:
                t = t.set_column(t.schema.get_field_index(name), name, t[name].cast(to))
        out.append(t)
    return pa.concat_tables(out, promote_options="permissive")


def plan_shards(keep, shards, out: Path, rows_per_shard: int) -> list[dict]:
    """Output shards of `rows_per_shard` kept rows (0: one output shard per input shard), rows in
    gid order, each listing the source shards it reads."""
    keep = keep.sort_values("gid")
    by_name = {s.name: s for s in shards}
    if rows_per_shard <= 0:
        chunks = [part for _, part in keep.groupby("shard", sort=True)]
        names = [str(part["shard"].iloc[0]) for part in chunks]
    else:
        chunks = [keep.iloc[i:i + rows_per_shard] for i in range(0, len(keep), rows_per_shard)]
        names = [f"{i:05d}" for i in range(len(chunks))]
    jobs = []
    for name, part in zip(names, chunks):
        sources = [(str(by_name[sh].data), str(by_name[sh].parquet), rows["key"].astype(str).tolist())
                   for sh, rows in part.groupby("shard", sort=True)]
        jobs.append({"out": str(out / f"{name}.tar"), "sources": sources})
    return jobs


def member_jobs(run: Run, keep, jobs: list[dict]) -> list[dict]:
    """plan_shards' jobs for a source without tars: each source shard's kept rows with the ingest's
    columns (caption, sha256, width, height, uid), instead of tar paths."""
    ingest = run.ingest_table(columns=["gid", "shard", "key", "caption", "sha256", "width", "height", "uid"])
    ingest = ingest.filter(pc.is_in(ingest["gid"], pa.array(keep["gid"].to_numpy(np.int64))))
    by_key = {r["key"]: r for r in ingest.to_pylist()}
    out = []
    for job in jobs:
        sources = []
        for _, _, keys in job["sources"]:
            part = [by_key[k] for k in keys]
            shard = run.shard_by_name[part[0]["shard"]]
            sources.append((shard.index, shard.name, str(shard.data), part))
        out.append({"out": job["out"], "format": run.cfg.input.format, "sources": sources})
    return out


_HF_DTYPES = {"string": "string", "large_string": "string", "int64": "int64", "int32": "int32",
              "double": "float64", "float": "float32", "bool": "bool"}


def _hf_features(schema: pa.Schema) -> bytes:
    """The `huggingface` schema metadata: `image` as an Image feature, the rest as Values."""
    feats = {"image": {"_type": "Image"}}
    for f in schema:
        if f.name != "image":
            feats[f.name] = {"dtype": _HF_DTYPES.get(str(f.type), "string"), "_type": "Value"}
    return json.dumps({"info": {"features": feats}}).encode()


def export_hf_shard(job: dict) -> dict:
    """Kept rows of one shard as HF-style parquet: image {bytes, path} embedded, text, key, url, uid,
    group id, and the input parquet's other columns passed through."""
    rows = job["rows"]
    data: list[bytes | None] = [None] * len(rows)
    shard = Shard(job["index"], job["name"], Path(job["parquet"]), Path(job["tar"]))
    source = source_for(job["format"])
    if hasattr(source, "copy_rows"):   # the input is such parquet already: its kept rows, columns unchanged
        return {"rows": source.copy_rows(shard, [r["member"] for r in rows], Path(job["out"]))}
    for i, blob in source.read_images(shard, {r["member"]: i for i, r in enumerate(rows)}):
        data[i] = blob
    # the input's own per-row parquet, where the source has one (img2dataset): its other columns pass through
    meta = pq.read_table(job["parquet"]) if Path(job["parquet"]).is_file() else pa.table({"key": pa.array([], pa.string())})
    extra = [c for c in meta.column_names if c not in ("key", "url", "caption", "uid")]
    by_key: dict[str, int] = {}         # a repeated key's first row: the one ingest kept
    for i, k in enumerate(meta["key"].to_pylist() if "key" in meta.column_names else []):
        by_key.setdefault(str(k), i)
    cols = {"image": pa.array([{"bytes": d, "path": r["member"]} for d, r in zip(data, rows)],
                              pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "text": pa.array([r["caption"] for r in rows], pa.string()),
            "key": pa.array([r["key"] for r in rows], pa.string()),
            "url": pa.array([r["url"] for r in rows], pa.string()),
            "uid": pa.array([r["uid"] for r in rows], pa.string()),
            "group_id": pa.array([r["group_id"] for r in rows], pa.int64())}
    idx = [by_key.get(r["key"]) for r in rows]
    for c in extra:
        if c in cols:
            continue
        values = meta[c].to_pylist()
        cols[c] = pa.array([values[i] if i is not None else None for i in idx], meta.schema.field(c).type)
    table = pa.table(cols)
    table = table.replace_schema_metadata({b"huggingface": _hf_features(table.schema)})
    write_parquet(Path(job["out"]), table)
    return {"rows": table.num_rows}


def run(run: Run, ex, stats: dict) -> dict:
    if not run.marker("report", "report").valid(run.fingerprint("report")):
        # e.g. a removal request logged since the report ran: its samples would export rows it removes
        raise RuntimeError(f"{run.report_dir()}: the report is not done for this config and the index's "
                           "removal requests; run `dedup2b report` (or `dedup2b run`) first")
    out = run.export_dir()
    samples = pq.read_table(run.report_dir() / "samples.parquet").to_pandas()
    ok = samples[samples["status"] == "ok"]
    removed = ok["removed_reason"].notna()   # duplicate, eval_leak (decontamination), request (dedup2b remove)
    keep, remove = ok[~removed], ok[removed]
    cols = ["key", "uid", "gid", "shard", "group_id", "representative_key", "rep_similarity", "removed_reason"]
    files = {}
    if "keep" in run.cfg.export.formats or "webdataset" in run.cfg.export.formats:
        write_parquet(out / "keep.parquet", pa.Table.from_pandas(keep[cols], preserve_index=False))
        write_parquet(out / "remove.parquet", pa.Table.from_pandas(remove[cols], preserve_index=False))
        uids = uid128(keep["uid"].tolist())
        write_npy(out / "subset.npy", np.sort(uids, order=["hi", "lo"]))
    exported = 0
    stats_note = {}
    members = hasattr(run.source, "webdataset_members")       # no tars, but files to write as samples
    if "webdataset" in run.cfg.export.formats and run.source.HAS_IMAGES and not (run.source.TAR_SHARDS or members):
        stats_note["webdataset"] = (f"not written: {run.cfg.input.format} input has no tar shards to copy; "
                                    "keep.parquet lists the kept files, hf holds their bytes")
    if "webdataset" in run.cfg.export.formats and (run.source.TAR_SHARDS or members):
        for stale in (out / "webdataset").glob("*") if (out / "webdataset").exists() else []:
            stale.unlink()              # a changed rows_per_shard must not leave old shards behind
        jobs = plan_shards(keep, run.shards, out / "webdataset", run.cfg.export.rows_per_shard)
        if run.source.TAR_SHARDS:
            results = ex.map(export_shard, jobs, desc="export", num_cpus=1)
        else:
            results = ex.map(export_members_shard, member_jobs(run, keep, jobs), desc="export", num_cpus=1)
        files = {r["tar"]: r["samples"] for r in results}
        write_json(out / "webdataset" / "sizes.json", files)
        exported = sum(files.values())
        if exported != len(keep):
            raise AssertionError(f"export wrote {exported} samples but {len(keep)} rows are kept")
    if "hf" in run.cfg.export.formats and run.source.HAS_IMAGES:
        ingest = run.ingest_table(columns=["gid", "member"]).to_pandas()
        rows = keep.merge(ingest, on="gid")[["shard", "key", "uid", "url", "caption", "member", "group_id"]]
        rows = rows.astype(object).where(rows.notna(), None)
        jobs = [{"format": run.cfg.input.format, "index": s.index, "name": s.name, "tar": str(s.data),
                 "parquet": str(s.parquet), "out": str(out / "hf" / f"{s.name}.parquet"),
                 "rows": rows[rows["shard"] == s.name].to_dict("records")} for s in run.shards]
        ex.map(export_hf_shard, jobs, desc="export hf", num_cpus=1)
    n_failed = int((samples["status"] != "ok").sum())
    marker_files = [out / "keep.parquet"] if (out / "keep.parquet").exists() else []
    run.marker(NAME, NAME).write(run.fingerprint(NAME), marker_files, kept=len(keep))
    return {**stats_note, "kept": len(keep), "removed": len(remove), "failed": n_failed, "exported": exported,
            "invariant_holds": len(samples) == len(keep) + len(remove) + n_failed}
