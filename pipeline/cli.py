"""`dedup2b` command line: the whole pipeline, each stage on its own, decontamination, threshold
calibration, the demo, and status."""
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
    if getattr(args, "against", None):
        overrides["against"] = _index_folder(args.against)
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


def _index_folder(name: str) -> str:
    """An index given by NAME (indexes/NAME) or by its folder path."""
    p = Path(name)
    return str((p if p.is_dir() or "/" in name else Path("indexes") / name).resolve())


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
    p.add_argument("--against", metavar="NAME", help="incremental: dedup the input against the built index "
                   "indexes/NAME (or a folder) of earlier runs, and extend it; earlier rows never change status")
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
    if not args.no_calibrate:
        from . import calibrate
        calibrate.calibrate(out)
    print(f"  wall time       {time.time() - t0:.1f}s")
    return 0


def cmd_decontaminate(args) -> int:
    """Build (or reuse) an index per evaluation set, then run the training corpus against them."""
    from .executor import make_executor
    args.input = args.train
    cfg = build_config(args)
    ex = make_executor(args.executor, cfg.ray)
    folders = []
    try:
        for ev in args.eval:
            name = Path(ev).resolve().name
            folder = Path(args.eval_index_root, f"eval-{name}").resolve()
            data = cfg.to_dict()
            data.update(input={**data["input"], "path": str(Path(ev).resolve())}, run_dir=str(folder / "run"),
                        index_dir=str(folder), against="", decontaminate={"eval": []})
            print(f"evaluation set {name}: index {folder}")
            run_pipeline(config_mod.from_dict(data), ex, ("ingest", "embed", "index", "search", "group"))
            folders.append(str(folder))
        cfg.decontaminate.eval = folders
        cfg.decontaminate.validate()
        run_pipeline(cfg, ex, STAGES, fresh=args.fresh)
    finally:
        ex.shutdown()
    summary = json.loads((cfg.run_path / "reports" / "summary.json").read_text())
    print_summary(cfg.run_path, summary)
    for name, info in summary["eval_leaks"].items():
        print(f"  leaks {name:10s} {info['eval_items_leaked']} eval items in "
              f"{info['train_rows_matched']} training rows")
    print(f"  leaks table     {cfg.run_path / 'reports' / 'leaks.parquet'}")
    return 0


def cmd_calibrate(args) -> int:
    """Threshold -> precision / recall of a finished run; prints the table and the recommendation."""
    from . import calibrate
    calibrate.calibrate(args.run_dir, target=args.target_precision, samples=args.samples, copies=args.copies,
                        audit_pairs=args.audit_pairs, labels=args.labels, seed=args.seed)
    print(f"  reports         {Path(args.run_dir).resolve() / 'reports'}/calibration.{{parquet,png,json}}")
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
    p.add_argument("--no-calibrate", action="store_true", help="skip `dedup2b calibrate` at the end")
    p = sub.add_parser("decontaminate", help="dedup a training corpus and remove every near duplicate of "
                       "evaluation-set rows (leaks.parquet, HTML section, export without them)")
    _common(p)
    p.add_argument("--train", required=True, help="folder of the training corpus shards")
    p.add_argument("--eval", action="append", required=True, metavar="FOLDER",
                   help="folder of an evaluation set's shards (repeat for several)")
    p.add_argument("--eval-index-root", default="indexes",
                   help="where evaluation-set indexes are built once and reused (indexes/eval-<name>)")
    p = sub.add_parser("status", help="done / pending shards per stage of a run directory")
    p.add_argument("run_dir")
    p = sub.add_parser("calibrate", help="threshold -> precision / recall of a finished run (synthetic web-crawl "
                       "copies + an audit of flagged pairs), a recommended threshold, reports/calibration.*")
    p.add_argument("--run-dir", required=True, help="the run directory (after the report stage)")
    p.add_argument("--target-precision", type=float, default=0.99,
                   help="recommend the smallest threshold from which up the estimated pair precision "
                   "stays at or above this (0.99)")
    p.add_argument("--samples", type=int, default=200, help="rows sampled for synthetic copies (200)")
    p.add_argument("--copies", type=int, default=3, help="web-crawl-style copies made of each sampled row (3)")
    p.add_argument("--audit-pairs", type=int, default=1000, help="flagged pairs sampled for the audit (1000)")
    p.add_argument("--labels", metavar="FILE", help="human labels: parquet of key_a, key_b, is_duplicate "
                   "(e.g. reports/audit_pairs.parquet filled in) or of key, cluster")
    p.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "run":
            return _run(args, STAGES)
        if args.cmd in STAGES:
            return _run(args, (args.cmd,))
        if args.cmd == "demo":
            return cmd_demo(args)
        if args.cmd == "decontaminate":
            return cmd_decontaminate(args)
        if args.cmd == "calibrate":
            return cmd_calibrate(args)
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
