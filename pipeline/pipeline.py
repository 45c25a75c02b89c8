"""The stage sequence: config -> run directory -> stages in order, each resumable.

    ingest -> embed -> index -> search -> group -> report -> export

Each stage reads only the files of the stages before it. Per-shard stages (ingest, embed,
search, export) skip shards whose done marker is valid for the current config fingerprint.
"""
from __future__ import annotations

import time

import pyarrow.parquet as pq

from . import embed, embeddings, export, group, index, ingest, report, search
from .config import RunConfig
from .io import read_json, write_json, write_parquet
from .run import Run

STAGES = ("ingest", "embed", "index", "search", "group", "report", "export")


def _ingest_one(job: dict) -> dict:
    run: Run = job["run"]
    shard = run.shard_by_index[job["index"]]
    inp = run.cfg.input
    if inp.format == "embeddings":
        table = embeddings.ingest_shard(shard, inp.renormalize, inp.norm_tolerance)
    else:
        table = ingest.ingest_shard(shard)
    path = write_parquet(run.dir("ingest") / f"{shard.name}.parquet", table)
    ok = sum(1 for s in table["status"].to_pylist() if s == "ok")
    run.marker("ingest", shard.name).write(run.cfg.fingerprint("ingest"), [path], rows=table.num_rows, ok=ok)
    return {"rows": table.num_rows, "ok": ok}


def run_ingest(run: Run, ex) -> dict:
    if run.cfg.input.format == "embeddings":
        embeddings.validate(run.shards)          # every file pair, before any work
    pending = set(run.pending("ingest", run.shard_names()))
    jobs = [{"run": run, "shard": s.name, "index": s.index} for s in run.shards if s.name in pending]
    results = ex.map(_ingest_one, jobs, desc="ingest", num_cpus=1)
    ingest.check_unique_keys({n: pq.read_table(run.dir("ingest") / f"{n}.parquet", columns=["key"])
                              for n in run.shard_names()})
    return {"shards": len(jobs), "rows": sum(r["rows"] for r in results), "ok": sum(r["ok"] for r in results)}


def _clear_downstream(run: Run, stage: str) -> None:
    """A stage that redid work invalidates every done marker of the stages after it."""
    import shutil
    for later in STAGES[STAGES.index(stage) + 1:]:
        shutil.rmtree(run.dir(later) / "_done", ignore_errors=True)


def run_pipeline(cfg: RunConfig, ex, stages: tuple[str, ...] = STAGES, fresh: bool = False,
                 log=print) -> dict:
    run = Run(cfg)
    if cfg.against:
        from .crossindex import check_against
        check_against(run)
    run.open_manifest(fresh=fresh)
    timings_path = run.root / "stage_stats.json"
    all_stats = read_json(timings_path) if timings_path.exists() else {}
    for stage in stages:
        t0 = time.time()
        if stage == "ingest":
            stats = run_ingest(run, ex)
        elif stage == "embed":
            stats = embed.run_stage(run, ex)
        elif stage == "index":
            stats = index.run_stage(run)
        elif stage == "search":
            stats = search.run_stage(run, ex)
        elif stage == "group":
            stats = group.run_stage(run)
        elif stage == "report":
            stats = report.run_stage(run, all_stats)
        elif stage == "export":
            stats = export.run_stage(run, ex)
        else:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        if stats.get("shards") or stats.get("blocks") or (stage in ("index", "group") and not stats.get("skipped")):
            _clear_downstream(run, stage)
        stats["wall_s"] = round(time.time() - t0, 3)
        all_stats[stage] = stats
        write_json(timings_path, all_stats)
        log(f"[{stage}] {_brief(stats)}")
    return all_stats


def _brief(stats: dict) -> str:
    keep = ("shards", "rows", "ok", "failed", "candidates", "verified", "groups", "edges", "factory",
            "bytes_per_vector", "blocks", "pairs", "images_per_s", "kept", "removed", "exported", "duplicates",
            "wall_s")
    return ", ".join(f"{k}={stats[k]}" for k in keep if k in stats)


def status(run_dir) -> dict:
    """Done / pending shards per stage, read from the run directory alone."""
    from pathlib import Path
    root = Path(run_dir)
    manifest = read_json(root / "manifest.json")
    cfg_dict = manifest["config"]
    shards = [i["shard"] for i in manifest["inputs"]]
    out = {}
    for stage in STAGES:
        folder = Path(cfg_dict["index_dir"] or root / "index") if stage == "index" else root / stage
        units = shards if stage in ("ingest", "embed") else [stage]
        if stage == "search":
            units = [f"assign-{s}" for s in shards] if cfg_dict["search"]["method"] == "cells" else [f"pq-{s}" for s in shards]
        fp = manifest["fingerprints"].get(stage)
        done = [u for u in units if (folder / "_done" / f"{u}.json").exists()
                and read_json(folder / "_done" / f"{u}.json").get("fingerprint") == fp]
        out[stage] = {"done": len(done), "pending": len(units) - len(done)}
    out["reports"] = (root / "reports" / "summary.json").exists()
    return out
