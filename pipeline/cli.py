"""`dedup2b` command line: the whole pipeline, each stage on its own, decontamination, threshold
calibration, lookups of images in a built index (find), removal requests (remove), the demo, and
status."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .core import config as config_mod
from .core.run import manifest_file, read_manifest, report_dir
from .driver import execute, print_summary, status
from .sources import SOURCES
from .stages import NAMES

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def build_config(args) -> config_mod.RunConfig:
    """The run config of a command line: --config, then --set, then the named flags; relative
    paths against the current directory (config.build, the rule the Ray jobs use too)."""
    overrides = {}
    if args.input:
        overrides["input.path"] = args.input
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
    if args.run_dir:
        overrides["run_dir"] = args.run_dir
    if args.index_dir:
        overrides["index_dir"] = args.index_dir
    if not args.config and not args.input and args.run_dir and manifest_file(args.run_dir).exists():
        # an existing run dir without --input / --config (`dedup2b export --run-dir DIR`): its own
        # config, from its manifest, with this command line's changes on top
        data = read_manifest(args.run_dir)["config"]
        config_mod.apply_overrides(data, {**config_mod.parse_sets(args.set), **overrides})
        return config_mod.from_dict(config_mod.resolve_paths(data, Path.cwd()))
    return config_mod.build(args.config, args.set, Path.cwd(), overrides, log=print)


def _index_folder(name: str) -> str:
    """An index given by NAME (indexes/NAME) or by its folder path."""
    p = Path(name)
    return str((p if p.is_dir() or "/" in name else Path("indexes") / name).resolve())


def _common(p: argparse.ArgumentParser, export: bool = False) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--input", help="folder of img2dataset shards (NNNNN.tar + NNNNN.parquet) or, with "
                   "--input-format embeddings, of clip-retrieval embeddings (img_emb/ + metadata/)")
    flags = ("--input-format",) if export else ("--input-format", "--format")
    p.add_argument(*flags, dest="input_format", choices=tuple(SOURCES),
                   help="input layout (default: detected from the folder)")
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


def _run(args, stages) -> int:
    cfg = build_config(args)
    stats = execute(cfg, stages, args.executor, fresh=args.fresh)
    if "report" in stages:
        print_summary(cfg)
    return 0 if stats else 1


def cmd_demo(args) -> int:
    from . import demo
    out = Path(args.out).resolve()
    t0 = time.time()
    shards = demo.build(out / "corpus")
    print(f"demo corpus: {shards} ({time.time() - t0:.1f}s)")
    args.input, args.run_dir = str(shards), str(out)
    cfg = build_config(args)
    execute(cfg, NAMES, args.executor, fresh=args.fresh)
    print_summary(cfg)
    scores = demo.score(out / "corpus" / "ground_truth.parquet", report_dir(cfg.run_path) / "samples.parquet")
    print(f"  vs ground truth pair precision {scores['precision']:.3f}  recall {scores['recall']:.3f}  "
          f"({scores['true_pairs']} true pairs, {scores['found_pairs']} found)")
    if not args.no_calibrate:
        from .quality import calibrate
        calibrate.calibrate(out)
    print(f"  wall time       {time.time() - t0:.1f}s")
    return 0


def _check_eval_index(folder: Path, source: Path) -> None:
    """An evaluation index is named after its set's folder; one already built from another folder
    of the same name is never reused or rebuilt over: the clash is named, with what to do."""
    if manifest_file(folder / "run").exists():
        built_from = read_manifest(folder / "run")["config"]["input"]["path"]
        if Path(built_from).resolve() != source:
            raise config_mod.ConfigError(
                f"{folder}: this evaluation index was built from {built_from}, and {source} has the same "
                f"folder name ({source.name}); rename one of the two folders, or give this set another "
                "--eval-index-root")


def cmd_decontaminate(args) -> int:
    """Build (or reuse) an index per evaluation set, then run the training corpus against them."""
    from .core.executor import open_executor
    from .driver import run_stages
    args.input = args.train
    cfg = build_config(args)
    folders = []
    with open_executor(args.executor, cfg.ray) as ex:
        for ev in args.eval:
            name = Path(ev).resolve().name
            folder = Path(args.eval_index_root, f"eval-{name}").resolve()
            _check_eval_index(folder, Path(ev).resolve())
            data = cfg.to_dict()
            data.update(input={**data["input"], "path": str(Path(ev).resolve())}, run_dir=str(folder / "run"),
                        index_dir=str(folder), against="", decontaminate={"eval": []})
            print(f"evaluation set {name}: index {folder}")
            run_stages(config_mod.from_dict(data), ex, NAMES[:NAMES.index("register") + 1])
            folders.append(str(folder))
        cfg.decontaminate.eval = folders
        cfg.decontaminate.validate()
        run_stages(cfg, ex, NAMES, fresh=args.fresh)
    print_summary(cfg)
    summary = json.loads((report_dir(cfg.run_path) / "summary.json").read_text())
    for name, info in summary["eval_leaks"].items():
        print(f"  leaks {name:10s} {info['eval_items_leaked']} eval items in "
              f"{info['train_rows_matched']} training rows")
    print(f"  leaks table     {report_dir(cfg.run_path) / 'leaks.parquet'}")
    return 0


def cmd_calibrate(args) -> int:
    """Threshold -> precision / recall of a finished run; prints the table and the recommendation."""
    from .quality import calibrate
    calibrate.calibrate(args.run_dir, target=args.target_precision, samples=args.samples, copies=args.copies,
                        audit_pairs=args.audit_pairs, labels=args.labels, seed=args.seed)
    print(f"  outputs         {Path(args.run_dir).resolve() / 'calibration'}/calibration.{{parquet,png,json}}")
    return 0


def _query_images(images) -> None:
    from . import lookup
    files, missing = lookup.image_files(images)
    if not files and not missing:
        raise lookup.FindError("no images given (image files, or folders holding jpg, jpeg, png, webp, gif, "
                               "bmp, tif or tiff files)")


def _verifier(no_pixels: bool):
    """The pixel check of a match (lib/pixels.py), where the index's rows have images; None: skipped."""
    if no_pixels:
        return None
    from .lib import pixels
    return lambda q, row: pixels.verify_bytes(q, row["image"])


def cmd_find(args) -> int:
    """Rows of a built index that copy the given images: a table, and --out as parquet."""
    from . import lookup
    _query_images(args.images)
    index = lookup.open_index(lookup.index_folder(args.index))
    verify = _verifier(args.no_pixels)
    matches = lookup.find(index, args.images, threshold=args.threshold, verify=verify)
    if not matches.attrs["queries"]:
        raise lookup.FindError("none of the given files could be read as an image")
    out = lookup.write(matches, args.out)
    print(f"index {index.folder} ({index.model}), {matches.attrs['queries']} query images, "
          f"threshold {matches.attrs['threshold']:.3f} ({matches.attrs['threshold_from']})")
    if matches.empty:
        print("no copies found")
    else:
        print("\n".join(lookup.format_table(matches)))
        print(f"{len(matches)} rows copy {matches['query'].nunique()} of the query images")
        checked = matches["pixel_check"].notna()
        if checked.any():
            print(f"  pixel check     {int(matches['pixel_check'].fillna(False).sum())} of {int(checked.sum())} "
                  "checked rows confirmed as copies (pixel_check in the table); rows without images unchecked")
    print(f"  matches table   {out.resolve()}")
    return 0


def cmd_remove(args) -> int:
    """A removal request: the rows (copies of images, or keys with their groups) logged in the
    index's requests/, then every registered run's report and export again without them."""
    from . import lookup, removal
    from .core.executor import open_executor
    if args.images:
        _query_images(args.images)
    keys = removal.read_keys(args.keys) if args.keys else None
    folder = lookup.index_folder(args.index)
    with open_executor(args.executor) as ex:
        out = removal.remove(folder, images=args.images or None, keys=keys, threshold=args.threshold,
                             verify=_verifier(args.no_pixels), ex=ex)
    print(f"request {out['request']}: {out['rows']} rows removed "
          f"({', '.join(f'{n} by {v}' for v, n in out['rows_by_via'].items()) or 'none in the index'})")
    if out.get("rejected_by_pixels"):
        print(f"  pixel check     {out['rejected_by_pixels']} descriptor matches are no copies by pixels: kept")
    if out.get("keys_not_in_index"):
        print(f"  keys not found  {out['keys_not_in_index']} (kept in the request: a later run that ingests "
              "them removes them)")
    for r in out["runs"]:
        if "error" not in r:
            print(f"  run             {r['run_dir']}: kept {r['kept']}, removed {r['removed']} "
                  f"({r['removed_by_request']} by request), failed {r['failed']}")
    print(f"  request log     {out['log']}")
    return 0 if all("error" not in r for r in out["runs"]) else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dedup2b", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="the whole pipeline: " + " -> ".join(NAMES))
    _common(p)
    for stage in NAMES:
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
                       "copies + an audit of flagged pairs), a recommended threshold, calibration/calibration.*")
    p.add_argument("--run-dir", required=True, help="the run directory (after the report stage)")
    p.add_argument("--target-precision", type=float, default=0.99,
                   help="recommend the smallest threshold from which up the estimated pair precision "
                   "stays at or above this (0.99)")
    p.add_argument("--samples", type=int, default=200, help="rows sampled for synthetic copies (200)")
    p.add_argument("--copies", type=int, default=3, help="web-crawl-style copies made of each sampled row (3)")
    p.add_argument("--audit-pairs", type=int, default=1000, help="flagged pairs sampled for the audit (1000)")
    p.add_argument("--labels", metavar="FILE", help="human labels: parquet of key_a, key_b, is_duplicate "
                   "(e.g. calibration/audit_pairs.parquet filled in) or of key, cluster")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("find", help="which rows of a built index are copies of these images (takedown / "
                       "opt-out requests, evaluation images in a training set); a table and --out parquet")
    p.add_argument("images", nargs="*", metavar="IMAGE_OR_DIR",
                   help="image files, or folders of images (jpg, jpeg, png, webp, gif, bmp, tif, tiff; any depth)")
    p.add_argument("--index", required=True, metavar="NAME_OR_PATH",
                   help="the index: indexes/NAME, or an index folder")
    p.add_argument("--threshold", type=float, help="exact cosine for a copy (default: the index's run threshold)")
    p.add_argument("--out", default="find.parquet", help="the matches as parquet (default find.parquet)")
    p.add_argument("--no-pixels", action="store_true",
                   help="skip the pixel check of each match (by default done where the rows' images are at hand)")
    p = sub.add_parser("remove", help="a removal request (takedown, opt-out): every copy of the given images, "
                       "or the listed keys, with their duplicate groups, logged in the index (requests/) and "
                       "removed from its runs' exports; later incremental runs keep them out")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    what.add_argument("--keys", metavar="FILE", help="a text file of keys, one a line")
    p.add_argument("--index", required=True, metavar="NAME_OR_PATH", help="the index: indexes/NAME, or an index folder")
    p.add_argument("--threshold", type=float, help="exact cosine for a copy (default: the index's run threshold)")
    p.add_argument("--no-pixels", action="store_true", help="skip the pixel check of each image match")
    p.add_argument("--executor", choices=("ray", "local"), default="ray")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "run":
            return _run(args, NAMES)
        if args.cmd in NAMES:
            return _run(args, (args.cmd,))
        if args.cmd == "demo":
            return cmd_demo(args)
        if args.cmd == "decontaminate":
            return cmd_decontaminate(args)
        if args.cmd == "calibrate":
            return cmd_calibrate(args)
        if args.cmd == "find":
            return cmd_find(args)
        if args.cmd == "remove":
            return cmd_remove(args)
        if args.cmd == "status":
            for stage, info in status(args.run_dir).items():
                print(f"{stage:8s} {info}")
            return 0
    except (config_mod.ConfigError, OSError, ValueError, RuntimeError) as exc:
        print(f"dedup2b: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
