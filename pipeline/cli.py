"""`dedup2b` command line: the whole pipeline, each stage on its own, the demo, and status."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import config as config_mod
from .pipeline import STAGES, run_pipeline, status

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_config(args) -> config_mod.RunConfig:
    overrides = {}
    for item in args.set or []:
        if "=" not in item:
            raise config_mod.ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. search.threshold=0.9")
        k, v = item.split("=", 1)
        overrides[k] = _parse_value(v)
    if args.input:
        overrides["input.path"] = str(Path(args.input).resolve())
    if getattr(args, "input_format", None):
        overrides["input.format"] = args.input_format
    if getattr(args, "export_format", None):
        overrides["export.formats"] = [f for part in args.export_format for f in part.split(",") if f]
    if getattr(args, "rows_per_shard", None) is not None:
        overrides["export.rows_per_shard"] = args.rows_per_shard
    if args.model:
        overrides["embed.model"] = args.model
    elif getattr(args, "input_format", None) == "embeddings":
        overrides["embed.model"] = "precomputed:clip"
    if args.threshold is not None:
        overrides["search.threshold"] = args.threshold
    base = config_mod.read_yaml(args.config) if args.config else {}
    inp = overrides.get("input.path") or (base.get("input") or {}).get("path", "")
    name = Path(inp).name or "run"
    if args.run_dir:
        overrides["run_dir"] = str(Path(args.run_dir).resolve())
    elif not base.get("run_dir"):
        overrides["run_dir"] = str(Path("reports", name).resolve())
    if args.index_dir:
        overrides["index_dir"] = str(Path(args.index_dir).resolve())
    elif not base.get("index_dir"):
        overrides["index_dir"] = str(Path("indexes", Path(overrides.get("run_dir") or base["run_dir"]).name).resolve())
    return config_mod.from_dict(config_mod.apply_overrides(base, overrides))


def _common(p: argparse.ArgumentParser, export: bool = False) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--input", help="folder of img2dataset shards (NNNNN.tar + NNNNN.parquet) or, with "
                   "--input-format embeddings, of clip-retrieval embeddings (img_emb/ + metadata/)")
    flags = ("--input-format",) if export else ("--input-format", "--format")
    p.add_argument(*flags, dest="input_format", choices=("img2dataset", "embeddings"),
                   help="input layout (default img2dataset)")
    if export:
        p.add_argument("--format", dest="export_format", action="append", metavar="FORMATS",
                       help="export formats, comma-separated or repeated: webdataset, hf, keep (default all)")
        p.add_argument("--rows-per-shard", type=int, help="rows per exported webdataset shard (0: as the input)")
    p.add_argument("--run-dir", help="where this run's outputs go (default: reports/<input name>)")
    p.add_argument("--index-dir", help="where the index goes (default: indexes/<run name>)")
    p.add_argument("--model", help="embedder spec, e.g. timm:tf_efficientnet_lite0, open_clip:ViT-B-32:FILE; "
                   "precomputed:NAME for embeddings input")
    p.add_argument("--threshold", type=float, help="exact cosine for near duplicates (default: per model)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="any config field, e.g. codec.nlist=256")
    p.add_argument("--executor", choices=("ray", "local"), default="ray")
    p.add_argument("--fresh", action="store_true", help="accept a changed config in an existing run dir")


def print_summary(run_dir: Path, summary: dict, log=print) -> None:
    s = summary
    log("")
    log(f"  input rows      {s['input_rows']:>8,}")
    log(f"  ok / failed     {s['ok']:>8,} / {s['failed']:,}")
    log(f"  groups          {s['groups']:>8,}  ({s['duplicate_groups']:,} with 2+ rows)")
    log(f"  duplicates      {s['duplicates']:>8,}  ({100 * s['duplicate_fraction']:.1f}% of ok rows)")
    log(f"  kept / removed  {s['kept']:>8,} / {s['removed']:,}")
    log(f"  invariant       input {s['input_rows']:,} = kept {s['kept']:,} + removed {s['removed']:,} "
        f"+ failed {s['failed']:,}: {'OK' if s['invariant_holds'] else 'BROKEN'}")
    log(f"  threshold       {s['threshold']}  model {s['model']}  codec {s['codec']} "
        f"({s['bytes_per_vector']} B/vector)")
    for g in s["largest_groups"][:5]:
        log(f"  top group       {g['representative_key']}  x{g['size']}")
    log(f"  reports         {run_dir / 'reports'}")


def _run(args, stages) -> int:
    from .executor import make_executor
    cfg = build_config(args)
    ex = make_executor(args.executor, cfg.ray)
    try:
        stats = run_pipeline(cfg, ex, stages, fresh=args.fresh)
    finally:
        ex.shutdown()
    summary_path = cfg.run_path / "reports" / "summary.json"
    if "report" in stages and summary_path.exists():
        print_summary(cfg.run_path, json.loads(summary_path.read_text()))
    return 0 if stats else 1


def cmd_demo(args) -> int:
    from . import demo
    from .executor import make_executor
    out = Path(args.out).resolve()
    t0 = time.time()
    shards = demo.build(out / "corpus")
    print(f"demo corpus: {shards} ({time.time() - t0:.1f}s)")
    args.input, args.run_dir = str(shards), str(out)
    args.index_dir = args.index_dir or str(Path("indexes", out.name).resolve())
    cfg = build_config(args)
    ex = make_executor(args.executor, cfg.ray)
    try:
        run_pipeline(cfg, ex, STAGES, fresh=args.fresh)
    finally:
        ex.shutdown()
    summary = json.loads((out / "reports" / "summary.json").read_text())
    print_summary(out, summary)
    scores = demo.score(out / "corpus" / "ground_truth.parquet", out / "reports" / "samples.parquet")
    print(f"  vs ground truth pair precision {scores['precision']:.3f}  recall {scores['recall']:.3f}  "
          f"({scores['true_pairs']} true pairs, {scores['found_pairs']} found)")
    print(f"  wall time       {time.time() - t0:.1f}s")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dedup2b", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="the whole pipeline: " + " -> ".join(STAGES))
    _common(p)
    for stage in STAGES:
        _common(sub.add_parser(stage, help=f"run the {stage} stage alone (earlier stages must be done)"),
                export=stage == "export")
    p = sub.add_parser("demo", help="build the embedded demo corpus and run the whole pipeline on it")
    _common(p)
    p.add_argument("--out", default="reports/demo", help="run directory of the demo")
    p = sub.add_parser("status", help="done / pending shards per stage of a run directory")
    p.add_argument("run_dir")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "run":
            return _run(args, STAGES)
        if args.cmd in STAGES:
            return _run(args, (args.cmd,))
        if args.cmd == "demo":
            return cmd_demo(args)
        if args.cmd == "status":
            for stage, info in status(args.run_dir).items():
                print(f"{stage:8s} {info}")
            return 0
    except (config_mod.ConfigError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"dedup2b: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
