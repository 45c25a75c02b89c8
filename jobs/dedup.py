"""Ray job entrypoint for the whole pipeline (`jobs/stage.py` runs one stage).

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python -m jobs.dedup --config configs/demo.yaml --base-dir $PWD [--build-demo]

Inside a submitted job it attaches to the cluster the job runs on (`ray.init(address="auto")`); run
directly, it starts an embedded local Ray, exactly as `dedup2b run` does. Relative paths in the
config are resolved against --base-dir (default: the current directory; a submitted job runs in a
copy of the working dir, so pass the folder the outputs belong to). Paths may be fsspec URLs (see
jobs/paths.py). Progress goes to stdout (`ray job logs --follow`): one line per finished shard task
with the node that ran it, one per stage, then the summary. Which node ran how many tasks of each
stage is kept in the run's `stage_stats.json` (`tasks_by_node`, written by the driver).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from dedup2b.core import config as config_mod
from dedup2b.core.executor import RayExecutor
from dedup2b.driver import print_summary, run_stages
from dedup2b.stages import NAMES

from . import paths


def log(msg: str) -> None:
    print(msg, flush=True)


def in_submitted_job() -> bool:
    return bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"))


def parser(prog: str = "jobs.dedup") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--config", required=True, help="YAML config file (see configs/)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="any config field")
    ap.add_argument("--base-dir", default=".", help="folder that relative config paths are resolved against")
    ap.add_argument("--stage-dir", help="folder every node sees, for inputs / outputs given as URLs")
    ap.add_argument("--build-demo", action="store_true", help="write the demo corpus to input.path first")
    ap.add_argument("--fresh", action="store_true", help="accept a changed config in an existing run dir")
    return ap


def load_config(args) -> tuple[config_mod.RunConfig, list]:
    """The run config, by the CLI's rule (config.build: --config, --set, defaults, relative paths
    against --base-dir), with URL paths staged (paths.resolve)."""
    uploads: list = []
    base = Path(args.base_dir).resolve()

    def stage_urls(data: dict) -> None:
        if paths.is_url(data.get("run_dir") or "") and not data.get("index_dir"):
            data["index_dir"] = data["run_dir"].rstrip("/") + "/index"   # uploaded with the run
        uploads.extend(paths.resolve(data, base, args.stage_dir, log))

    return config_mod.build(args.config, args.set, base, prepare=stage_urls, log=log), uploads


def run(args, stages: tuple[str, ...]) -> int:
    t0 = time.time()
    cfg, uploads = load_config(args)
    if args.build_demo:
        from dedup2b import demo
        log(f"[job] demo corpus: {demo.build(Path(cfg.input.path).parent)}")
    # torch is loaded before Ray starts its threads: loaded after them, in a submitted job's driver, it
    # sometimes aborted in MKL's start-up ("oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so")
    import torch  # noqa: F401
    if in_submitted_job():
        cfg.ray.address = cfg.ray.address or "auto"
        # the job's runtime_env and the executor's name the same env vars (same values): no conflict
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    ex = RayExecutor(cfg.ray)
    nodes = ex.node_names()

    def on_task(desc: str, done: int, total: int, node: str) -> None:
        if node not in nodes and node != "failed":
            nodes.update(ex.node_names())
        log(f"[{desc}] {done}/{total} tasks done (last on {nodes.get(node, node)})")

    ex.on_task = on_task
    try:
        log(f"[job] {'cluster' if cfg.ray.address else 'embedded Ray'}: {len(nodes)} node(s) "
            f"{', '.join(sorted(nodes.values()))}; run dir {cfg.run_path}; stages {','.join(stages)}")
        stats = run_stages(cfg, ex, stages, fresh=args.fresh, log=log)
        for stage, info in stats.items():
            if stage in stages and info.get("tasks_by_node"):
                log(f"[nodes] {stage}: " + ", ".join(f"{k}={v}" for k, v in sorted(info["tasks_by_node"].items())))
    finally:
        ex.shutdown()
    if "report" in stages:
        print_summary(cfg, log=log)
    for local_dir, url in uploads:
        paths.stage_out(local_dir, url, log)
    log(f"[job] done in {time.time() - t0:.1f}s")
    return 0


def main(argv=None) -> int:
    ap = parser()
    ap.add_argument("--stages", default=",".join(NAMES), help="comma-separated subset of " + ",".join(NAMES))
    args = ap.parse_args(argv)
    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = [s for s in stages if s not in NAMES]
    if unknown:
        ap.error(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(NAMES)}")
    return run(args, stages)


if __name__ == "__main__":
    sys.exit(main())
