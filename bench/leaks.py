"""Decontamination benchmark: leak precision and recall on a train / evaluation split of the
labelled copies set (bench/copies.py), with and without the pixel check, same box, same run.

    python -m bench.leaks                   # about 6 min on 2 cores

The set's images (real photos from packages, copies under single edits and chains of three, and
look-alike negatives: different faces, star fields, text pages, product shots, disjoint crops,
textures) are dealt in turn into three image folders: two are the training set, one the
evaluation set. `dedup2b decontaminate --train TRAIN --eval EVAL` runs twice: verify.method=pixels
(the default) and off (the descriptor alone). The truth follows the product's rule (a copy
derives from the same original; a part of a photo, half of it or less, is another picture): a
training row leaks when an evaluation image derives from its original.

Reported per setting: rows removed as eval_leak against the training rows that leak (precision,
recall), the same for the rows `leaks.parquet` names directly (before their groups go with them),
and the (evaluation item, training row) pairs of leaks.parquet that are not copies. Writes
bench/results/leaks.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from bench.copies import build_set

RESULTS = Path(__file__).parent / "results"


def write_split(cs, root: Path) -> dict[str, str]:
    """Images dealt into train/a, train/b (training) and eval/ (evaluation); returns each file's
    key -> the original it derives from."""
    picture = {}
    for i, data in enumerate(cs.images):
        ext = "png" if data[:4] == b"\x89PNG" else "webp" if data[8:12] == b"WEBP" else "jpg"
        part = ("train/a", "train/b", "eval")[i % 3]
        key = f"{part.split('/')[-1]}/{i:05d}.{ext}" if part.startswith("train") else f"{i:05d}.{ext}"
        (root / part).mkdir(parents=True, exist_ok=True)
        (root / part / f"{i:05d}.{ext}").write_bytes(data)
        picture[(part.split("/")[0], key)] = cs.names[i].split("|")[0]
    return picture


def prf(flagged: set, truth: set) -> dict:
    tp = len(flagged & truth)
    p, r = tp / max(len(flagged), 1), tp / max(len(truth), 1)
    return {"precision": round(p, 4), "recall": round(r, 4), "flagged": len(flagged), "true": len(truth),
            "f1": round(2 * p * r / max(p + r, 1e-9), 4)}


def run_one(root: Path, run_dir: Path, method: str, picture: dict) -> dict:
    from dedup2b.cli import main as cli
    t0 = time.time()
    rc = cli(["decontaminate", "--train", str(root / "train"), "--eval", str(root / "eval"),
              "--run-dir", str(run_dir), "--index-dir", str(run_dir / "index"), "--executor", "local",
              "--eval-index-root", str(run_dir / "eval-indexes"),
              "--set", f"verify.method={method}"])
    if rc:
        raise SystemExit(f"dedup2b decontaminate failed ({rc})")
    wall = time.time() - t0
    samples = pq.read_table(run_dir / "report" / "samples.parquet", columns=["key", "removed_reason"]).to_pandas()
    leaks = pq.read_table(run_dir / "report" / "leaks.parquet").to_pandas()
    eval_pictures = {pic for (part, _), pic in picture.items() if part == "eval"}
    train = {key: pic for (part, key), pic in picture.items() if part == "train"}
    truth = {k for k, pic in train.items() if pic in eval_pictures}
    removed = set(samples.loc[samples["removed_reason"] == "eval_leak", "key"])
    named = set(leaks["key"])
    wrong_pairs = int(sum(picture[("eval", e)] != train[k] for e, k in zip(leaks["eval_key"], leaks["key"])))
    return {"wall_s": round(wall, 1), "removed_rows": prf(removed, truth), "named_rows": prf(named, truth),
            "leak_pairs": len(leaks), "leak_pairs_not_copies": wrong_pairs,
            "eval_items": sum(1 for (part, _) in picture if part == "eval"), "train_rows": len(train)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/dedup2b-bench-leaks")
    args = ap.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    cs = build_set(args.seed)
    picture = write_split(cs, work / "data")
    res = {m: run_one(work / "data", work / f"run-{m}", m, picture) for m in ("pixels", "off")}
    for m, r in res.items():
        print(m, json.dumps(r), flush=True)
    cmd = "python -m bench.leaks " + " ".join(sys.argv[1:] if argv is None else argv)
    px, off = res["pixels"], res["off"]
    lines = [f"Command: `{cmd}` ({os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}); {px['train_rows']} training "
             f"rows, {px['eval_items']} evaluation images (every third image of the labelled copies set); "
             "`dedup2b decontaminate`, local executor, default model", "",
             "| measure | verify.method=pixels (default) | verify.method=off |", "|---|---|---|"]
    for k, label in (("removed_rows", "rows removed as eval_leak (with their groups)"),
                     ("named_rows", "rows leaks.parquet names")):
        a, b = px[k], off[k]
        lines.append(f"| {label}: precision / recall (flagged, truly leaking) | {a['precision']} / {a['recall']} "
                     f"({a['flagged']}, {a['true']}) | {b['precision']} / {b['recall']} ({b['flagged']}, {b['true']}) |")
    lines.append(f"| leaks.parquet pairs that are not copies | {px['leak_pairs_not_copies']} of {px['leak_pairs']} | "
                 f"{off['leak_pairs_not_copies']} of {off['leak_pairs']} |")
    lines.append(f"| wall s | {px['wall_s']} | {off['wall_s']} |")
    t = px["removed_rows"]
    lines += ["", f"Target (leak precision >= 0.95 at recall >= 0.95, rows removed): precision {t['precision']}, "
              f"recall {t['recall']}: {'met' if t['precision'] >= 0.95 and t['recall'] >= 0.95 else 'not met'}."]
    md = "\n".join(lines) + "\n"
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "leaks.md").write_text(md)
    (RESULTS / "leaks.json").write_text(json.dumps({"command": cmd, **res}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
