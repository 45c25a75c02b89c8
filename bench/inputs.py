"""Input formats benchmark: the same images as img2dataset shards and as a folder tree, whole
pipeline (ingest .. report, local executor, offline encoder), same box, same run.

    python -m bench.inputs --images 1000

Images: the demo's real photos, each with web-crawl-style variants (re-encodes, resizes, crops,
colour changes), `--images` in all. Writes bench/results/inputs.md.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
from pathlib import Path

from dedup2b import demo
from dedup2b.core import config
from dedup2b.core.executor import LocalExecutor
from dedup2b.driver import run_stages
from dedup2b.stages import NAMES

RESULTS = Path(__file__).parent / "results"
STAGES = NAMES[:NAMES.index("report") + 1]


def images(n: int, seed: int = 0) -> list[dict]:
    """n images: every demo photo's variants, then again from the photo cropped 2 % more a round."""
    rng = random.Random(seed)
    base = demo.base_images()
    rows: list[dict] = []
    r = 0
    while len(rows) < n:
        for name, img in base:
            w, h = img.size
            m = 0.02 * r
            src = img.crop((int(w * m), int(h * m), int(w * (1 - m)), int(h * (1 - m)))) if r else img
            for vname, data in demo.variants(src, rng, 13):
                rows.append({"url": f"http://images.example.test/{name}/r{r}-{vname}.jpg",
                             "caption": f"a photo of {name}", "bytes": data, "cluster": name})
        r += 1
    return rows[:n]


def timed(work: Path, name: str, path: Path) -> dict:
    cfg = config.build(None, ["export.formats=keep"], work, {"input.path": str(path), "run_dir": str(work / name)})
    t0 = time.time()
    stats = run_stages(cfg, LocalExecutor(), STAGES, log=lambda *_: None)
    return {"format": cfg.input.format, "seconds": round(time.time() - t0, 1),
            "groups": stats["report"]["groups"], "rows": stats["report"]["input_rows"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--work", default="/tmp/dedup2b-bench-inputs")
    args = ap.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    rows = images(args.images)
    demo.write_shards(rows, work / "shards", rows_per_shard=250)
    for i, r in enumerate(rows):
        path = work / "folder" / r["cluster"] / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(r["bytes"])
        path.with_suffix(".txt").write_text(r["caption"])
    timed(work, "warm-shards", work / "shards")          # model load, imports: paid once, not timed
    shards = timed(work, "run-shards", work / "shards")
    folder = timed(work, "run-folder", work / "folder")
    ratio = folder["seconds"] / shards["seconds"]
    cmd = "python -m bench.inputs " + " ".join(sys.argv[1:] if argv is None else argv)
    md = (f"Command: `{cmd}` ({os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}); {len(rows):,} images, "
          f"ingest .. report, local executor\n\n| input | wall s | groups | rows |\n|---|---|---|---|\n"
          f"| img2dataset shards | {shards['seconds']} | {shards['groups']} | {shards['rows']} |\n"
          f"| folder tree | {folder['seconds']} | {folder['groups']} | {folder['rows']} |\n\n"
          f"folder / shards: {ratio:.2f} (target within 0.85-1.15)\n")
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inputs.md").write_text(md)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
