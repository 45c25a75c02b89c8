"""The driver: a config's stages run in order (stages.STAGES), each resumable; `status` of a run
directory; the summary printed at the end. The CLI, the Ray jobs and the Python API all call here.

A stage whose units had pending work invalidates the done markers of every stage after it, so a
changed input or config is never mixed with outputs made before it. The driver alone writes
stage_stats.json: each stage's stats, its wall time and, on Ray, the shard tasks per node.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from .core.config import RunConfig, from_dict
from .core.executor import open_executor
from .core.io import read_json, write_json
from .core.run import Run, manifest_shards, read_manifest, report_dir
from .stages import BY_NAME, NAMES, STAGES, open_run


def run_stages(cfg: RunConfig, ex, stages: tuple[str, ...] = NAMES, fresh: bool = False, log=print) -> dict:
    """Run `stages` (names, in the list's order) on executor `ex`; returns every stage's stats."""
    unknown = [s for s in stages if s not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(NAMES)}")
    run = open_run(cfg)
    if cfg.against:
        from .lib.registry import check_against
        check_against(run)
    run.open_manifest(fresh=fresh)
    path = run.stage_stats_file()
    all_stats = read_json(path) if path.exists() else {}
    for stage in (s for s in STAGES if s.NAME in stages):
        t0 = time.time()
        fp = run.fingerprint(stage.NAME)
        had_work = any(not m.valid(fp) for m in stage.units(run))
        stats = stage.run(run, ex, all_stats)
        if had_work:
            invalidate_after(run, stage.NAME)
        stats["wall_s"] = round(time.time() - t0, 3)
        nodes = ex.node_counts() if hasattr(ex, "node_counts") else {}
        if nodes:
            stats["tasks_by_node"] = nodes
        all_stats[stage.NAME] = stats
        write_json(path, all_stats)
        log(f"[{stage.NAME}] {_brief(stats)}")
    return all_stats


def invalidate_after(run: Run, name: str) -> None:
    """Every done marker of the stages after `name`: those its units list and, in the run's own
    folders, the whole _done folder (units of an earlier cell count, say)."""
    for later in STAGES[NAMES.index(name) + 1:]:
        for marker in later.units(run):
            marker.path.unlink(missing_ok=True)
        folder = run.dir(later.NAME)
        if folder.resolve().is_relative_to(run.root.resolve()):
            shutil.rmtree(folder / "_done", ignore_errors=True)


def execute(cfg: RunConfig, stages: tuple[str, ...] = NAMES, executor: str = "ray", fresh: bool = False,
            log=print) -> dict:
    """run_stages on a fresh executor of `executor` kind (ray | local), shut down afterwards."""
    with open_executor(executor, cfg.ray) as ex:
        return run_stages(cfg, ex, stages, fresh=fresh, log=log)


def _brief(stats: dict) -> str:
    keep = ("shards", "rows", "ok", "failed", "candidates", "verified", "groups", "edges", "factory",
            "bytes_per_vector", "blocks", "pairs", "images_per_s", "kept", "removed", "exported", "duplicates",
            "registered", "wall_s")
    return ", ".join(f"{k}={stats[k]}" for k in keep if k in stats)


def open_existing(run_dir) -> Run:
    """The Run of a finished (or partly finished) run directory, from its manifest alone: no input
    needs to be present."""
    root = Path(run_dir).resolve()
    manifest = read_manifest(root)
    data = manifest["config"]
    data["run_dir"] = str(root)            # the folder may have moved since the run
    return open_run(from_dict(data), manifest_shards(manifest))


def status(run_dir) -> dict:
    """Done / pending units per stage, read from the run directory alone."""
    run = open_existing(run_dir)
    out = {}
    for stage in STAGES:
        fp = run.fingerprint(stage.NAME)
        units = stage.units(run)
        done = sum(1 for m in units if m.valid(fp))
        out[stage.NAME] = {"done": done, "pending": len(units) - done}
    out["reports"] = run.summary_file().exists()
    return out


def summary_lines(reports: Path, summary: dict) -> list[str]:
    """The end-of-run summary a person reads in the terminal or the job log."""
    s = summary
    lines = [
        "",
        f"  input rows      {s['input_rows']:>8,}",
        f"  ok / failed     {s['ok']:>8,} / {s['failed']:,}",
        f"  groups          {s['groups']:>8,}  ({s['duplicate_groups']:,} with 2+ rows)",
        f"  duplicates      {s['duplicates']:>8,}  ({100 * s['duplicate_fraction']:.1f}% of ok rows)",
        f"  kept / removed  {s['kept']:>8,} / {s['removed']:,}",
        f"  invariant       input {s['input_rows']:,} = kept {s['kept']:,} + removed {s['removed']:,} "
        f"+ failed {s['failed']:,}: {'OK' if s['invariant_holds'] else 'BROKEN'}",
        f"  threshold       {s['threshold']}  model {s['model']}  codec {s['codec']} ({s['bytes_per_vector']} B/vector)",
    ]
    lines += [f"  top group       {g['representative_key']}  x{g['size']}" for g in s["largest_groups"][:5]]
    lines.append(f"  reports         {reports}")
    return lines


def print_summary(cfg: RunConfig, log=print) -> None:
    """The summary of a run whose report stage has run (nothing when it has not)."""
    path = report_dir(cfg.run_path) / "summary.json"
    if path.exists():
        for line in summary_lines(path.parent, read_json(path)):
            log(line)
