"""Quality benchmark: copies vs look-alikes end to end, with and without the pixel check.

    python -m bench.quality                 # about 5 min on 2 cores

The labelled set of bench/copies.py (real photos from packages, each with copies under single
edits and chains of three; look-alike negatives: different faces, star fields, text pages,
product shots on white, disjoint crops of one photo, textures) is written as an image folder and
deduplicated by `dedup2b run` twice in the same run, same box: verify.method=pixels (the default)
and verify.method=off (the descriptor alone, at search.threshold). The truth: an image is a copy
of another exactly when both derive from the same original (the part of its name before "|").
A part of a photo (a grid cell: half of it or less) is another original, as the product's rule
says (a copy holds more than half of each image's content, dedup2b.lib.pixels.MIN_SHARE).
Reported per setting: pair precision / recall / F1 over every pair of rows (same group vs same
original), and over the rows of the originals that have copies alone (the look-alikes left out), recall per edit kind and false merges per negative kind on the labelled pairs, the
largest group holding two or more distinct originals, the pixel check's cost, and `dedup2b
calibrate`'s printed precision of the removals against the measured one (calibration_error); the groups that hold distinct originals, with what they hold. `--methods
pixels` runs the default setting alone. Writes bench/results/quality.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from bench.copies import build_set

RESULTS = Path(__file__).parent / "results"


def write_folder(cs, folder: Path) -> list[str]:
    """The set as image files; returns each image's key (path relative to the folder)."""
    folder.mkdir(parents=True)
    keys = []
    for i, data in enumerate(cs.images):
        ext = "png" if data[:4] == b"\x89PNG" else "webp" if data[8:12] == b"WEBP" else "jpg"
        key = f"{i:05d}.{ext}"
        (folder / key).write_bytes(data)
        keys.append(key)
    return keys


def score(cs, keys: list[str], samples) -> dict:
    """Pair precision / recall / F1 over every pair of rows: same group (predicted) vs same
    original (truth: a copy derives from the same original; a part of a photo, half or less, is
    another picture, as the product's rule says: a copy holds more than half of each image)."""
    origin = [n.split("|")[0] for n in cs.names]
    group = dict(zip(samples["key"], samples["group_id"]))
    g = [group.get(k) for k in keys]
    # every pair of rows: same group (predicted) vs same original (truth), counted by group sizes
    by_group, by_origin, both = Counter(), Counter(), Counter()
    for gi, oi in zip(g, origin):
        by_group[gi] += 1
        by_origin[oi] += 1
        both[(gi, oi)] += 1
    pairs = lambda c: sum(v * (v - 1) // 2 for v in c.values())   # noqa: E731
    tp, pred, true = pairs(both), pairs(by_group), pairs(by_origin)
    p, r = tp / max(pred, 1), tp / max(true, 1)
    # copies alone: the rows of the originals that have copies (the look-alike negatives left out)
    with_copies = {n.split("|")[0] for n in cs.names if "|" in n}
    cg, co, cb = Counter(), Counter(), Counter()
    for gi, oi in zip(g, origin):
        if oi in with_copies:
            cg[gi] += 1
            co[oi] += 1
            cb[(gi, oi)] += 1
    cp, cr = pairs(cb) / max(pairs(cg), 1), pairs(cb) / max(pairs(co), 1)
    per_kind: dict[str, list[int]] = {}
    for a, b, is_copy, kind in cs.pairs:
        same = g[a] is not None and g[a] == g[b]
        per_kind.setdefault(("copy " if is_copy else "negative ") + kind, [0, 0])
        per_kind[("copy " if is_copy else "negative ") + kind][0] += int(same)
        per_kind[("copy " if is_copy else "negative ") + kind][1] += 1
    origins_in: dict = {}
    for gi, oi in zip(g, origin):
        origins_in.setdefault(gi, Counter())[oi] += 1
    false_groups = sorted(((by_group[gi], len(o)) for gi, o in origins_in.items() if len(o) > 1), reverse=True)
    detail = sorted(({"rows": by_group[gi], "originals": o.most_common()} for gi, o in origins_in.items()
                     if gi is not None and len(o) > 1), key=lambda x: -x["rows"])
    return {"pair_precision": round(p, 4), "pair_recall": round(r, 4), "f1": round(2 * p * r / max(p + r, 1e-9), 4),
            "copies_alone": {"rows": sum(co.values()), "pair_precision": round(cp, 4), "pair_recall": round(cr, 4),
                             "f1": round(2 * cp * cr / max(cp + cr, 1e-9), 4)},
            "true_pairs": true, "predicted_pairs": pred,
            "largest_false_group": {"rows": false_groups[0][0], "originals": false_groups[0][1]} if false_groups else None,
            "groups_with_distinct_originals": len(false_groups), "false_groups": detail,
            "per_kind": {k: {"merged": v[0], "pairs": v[1], "rate": round(v[0] / v[1], 4)} for k, v in sorted(per_kind.items())}}


def run_one(folder: Path, run_dir: Path, method: str, sets: list[str]) -> dict:
    from dedup2b.cli import main as cli
    t0 = time.time()
    rc = cli(["run", "--input", str(folder), "--run-dir", str(run_dir), "--index-dir", str(run_dir / "index"),
              "--executor", "local", "--set", f"verify.method={method}", *sum((["--set", x] for x in sets), [])])
    if rc:
        raise SystemExit(f"dedup2b run failed ({rc})")
    wall = time.time() - t0
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    samples = pq.read_table(run_dir / "report" / "samples.parquet", columns=["key", "group_id"]).to_pandas()
    return {"wall_s": round(wall, 1), "summary": summary, "samples": samples}


def calibration_error(cs, keys: list[str], run_dir: Path, samples: int = 200) -> dict:
    """`dedup2b calibrate`'s printed precision of the removals (sampled removed rows checked by
    pixels against the row their group keeps) next to the measured one: the share of every
    removed row that derives from the same original as its kept row."""
    from dedup2b.quality.calibrate import calibrate
    t0 = time.time()
    got = calibrate(run_dir, samples=samples, copies=3, audit_pairs=200, log=lambda *a: None)
    table = pq.read_table(run_dir / "report" / "samples.parquet", columns=["key", "gid", "group_id"]).to_pandas()
    origin = {k: n.split("|")[0] for k, n in zip(keys, cs.names)}
    key_of = dict(zip(table["gid"], table["key"]))
    removed = table[table["gid"] != table["group_id"]]
    same = [origin[k] == origin[key_of[g]] for k, g in zip(removed["key"], removed["group_id"])]
    printed = (got.get("groups") or {}).get("precision")
    measured = round(sum(same) / max(len(same), 1), 4)
    return {"printed": printed, "ci95": (got.get("groups") or {}).get("ci95"), "measured": measured,
            "error": round(abs(printed - measured), 4) if printed is not None else None,
            "removed_rows": len(removed), "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/dedup2b-bench-quality")
    ap.add_argument("--methods", default="pixels,off", help="verify.method values to run, in order")
    ap.add_argument("--set", action="append", default=[], help="config fields for every run (FIELD=VALUE)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    cs = build_set(args.seed)
    keys = write_folder(cs, work / "images")
    res = {}
    methods = args.methods.split(",")
    for method in methods:
        got = run_one(work / "images", work / f"run-{method}", method, args.set)
        res[method] = {"wall_s": got["wall_s"], **score(cs, keys, got["samples"]),
                       "threshold": got["summary"]["threshold"],
                       "pixel_check": {**(got["summary"].get("pixel_check") or {}),
                                       **(got["summary"].get("pixel_check_cost") or {})}}
        if method == "pixels":
            res[method]["calibration"] = calibration_error(cs, keys, work / f"run-{method}")
        print(method, json.dumps({k: v for k, v in res[method].items() if k != "per_kind"}), flush=True)
    cmd = "python -m bench.quality " + " ".join(sys.argv[1:] if argv is None else argv)
    head = [f"verify.method={m}" + (" (default)" if m == "pixels" else "") for m in methods]
    lines = [f"Command: `{cmd}` ({os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}); {len(cs.images)} images, "
             f"{len(cs.pairs)} labelled pairs; the whole pipeline, local executor, default model",
             "", "| measure | " + " | ".join(head) + " |", "|---|" + "---|" * len(methods)]
    for k in ("pair_precision", "pair_recall", "f1", "predicted_pairs", "true_pairs", "groups_with_distinct_originals",
              "largest_false_group", "wall_s"):
        lines.append(f"| {k} | " + " | ".join(str(res[m][k]) for m in methods) + " |")
    ca = {m: res[m]["copies_alone"] for m in methods}
    lines.append(f"| copies alone ({ca[methods[0]]['rows']} rows of the originals with copies): precision / recall / "
                 "F1 | " + " | ".join(f"{ca[m]['pair_precision']} / {ca[m]['pair_recall']} / {ca[m]['f1']}"
                                      for m in methods) + " |")
    px = res.get("pixels")
    if px:
        pc = px["pixel_check"] or {}
        lines.append(f"| pixel check: band, pairs checked / accepted, ms per pair (keypoints included), ms per image "
                     f"read, images with keypoints, ms each | "
                     f"{pc.get('band')}, {pc.get('pairs_checked')} / {pc.get('pairs_accepted')}, {pc.get('ms_per_pair')}, "
                     f"{pc.get('ms_per_image_features')}, {pc.get('images_with_keypoints')} of "
                     f"{pc.get('images_with_features')}, {pc.get('ms_per_image_keypoints')} |" + " |" * (len(methods) - 1))
        cal = px["calibration"]
        lines.append(f"| calibrate: printed precision of the removals [95 %] vs measured | {cal['printed']} "
                     f"{cal['ci95']} vs {cal['measured']} (error {cal['error']}; {cal['removed_rows']} removed rows) |"
                     + " |" * (len(methods) - 1))
    lines += ["", "| labelled pairs | " + " | ".join(f"merged, {m}" for m in methods) + " |",
              "|---|" + "---|" * len(methods)]
    for kind in res[methods[0]]["per_kind"]:
        a = res[methods[0]]["per_kind"][kind]
        lines.append(f"| {kind} ({a['pairs']}) | " + " | ".join(f"{res[m]['per_kind'][kind]['rate']:.3f}"
                                                               for m in methods) + " |")
    for m in methods:
        lines += ["", f"Groups holding distinct originals, {m} (rows: originals by rows, largest first)", ""]
        lines += [f"- {g['rows']}: " + ", ".join(f"{o} {n}" for o, n in g["originals"]) for g in res[m]["false_groups"][:8]]
    md = "\n".join(lines) + "\n"
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.md").write_text(md)
    (RESULTS / "quality.json").write_text(json.dumps({"command": cmd, **res}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
