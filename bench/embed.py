"""Embed benchmark: the embed stage's throughput against the bare model, and exact-copy skipping.

    make bench-embed                       # offline encoder and open_clip ViT-S-32 (random weights)
    python -m bench.embed --rows 600 --models timm:tf_efficientnet_lite0

Per model, same box, same run, same batch size and threads:
  bare     the model alone on pre-decoded, pre-processed tensors (no I/O, no decode), measured
           before and after the stage run; the faster of the two is the baseline
  stage    the embed stage on img2dataset shards through Ray Data (tar read, decode, preprocess,
           model actor, fp16 write): wall time including the model actor's start, and the steady
           state (10th-90th percentile of embed times, reads gated on the model being up)
  copies   the stage again on a corpus where 30 % of the rows are byte copies of others
Writes bench/results/embed.json and bench/results/embed.md.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from bench.gpu_embed import StampedStream, steady_state
from dedup2b import demo
from dedup2b.core.config import from_dict
from dedup2b.core.executor import RayExecutor
from dedup2b.lib.images import preprocess_bytes
from dedup2b.lib.models import Embedder
from dedup2b.driver import run_stages

RESULTS = Path(__file__).parent / "results"


def corpus_rows(n: int, copy_frac: float, seed: int = 0) -> list[dict]:
    """n JPEG rows from the demo photos: distinct re-encodes, or with `copy_frac` byte copies."""
    rng = random.Random(seed)
    bases = demo.base_images()
    rows = []
    n_unique = int(n * (1 - copy_frac))
    for i in range(n_unique):
        name, img = bases[i % len(bases)]
        buf = io.BytesIO()
        # a per-row JPEG comment keeps every unique row's bytes distinct
        img.save(buf, format="JPEG", quality=60 + (i // len(bases)) % 35, comment=f"row {i}".encode())
        rows.append({"url": f"http://b.test/{i}.jpg", "caption": name, "bytes": buf.getvalue(), "cluster": name})
    for i in range(n - n_unique):
        src = rows[rng.randrange(n_unique)]
        rows.append({**src, "url": f"http://copy.test/{i}.jpg"})
    rng.shuffle(rows)
    return rows


def bare_throughput(model: str, rows: list[dict], batch: int, threads: int) -> float:
    e = Embedder(model, threads=threads)
    x = np.stack([preprocess_bytes(r["bytes"], e.preprocess) for r in rows])
    e(x[:batch])                                    # warm-up
    t0 = time.perf_counter()
    for s in range(0, len(x), batch):
        e(x[s:s + batch])
    return len(x) / (time.perf_counter() - t0)


def stage_run(model: str, rows: list[dict], work: Path, ex, batch: int) -> dict:
    """ingest + embed: wall img/s (model start-up included) and steady img/s (the stream between
    its 10th and 90th percentile of embed times, reads started once the model is up: what a long
    run sees; bench.gpu_embed's stamps)."""
    shutil.rmtree(work, ignore_errors=True)
    shards = work / "shards"
    demo.write_shards(rows, shards, rows_per_shard=max(1, len(rows) // 4))
    cfg = from_dict({"input": {"path": str(shards)}, "run_dir": str(work / "run"),
                     "embed": {"model": model, "batch_size": batch}})
    stamped = StampedStream(ex, work / "model_ready")
    stats = run_stages(cfg, stamped, stages=("ingest", "embed"), log=lambda *_: None)["embed"]
    stats["images_per_s"] = round(len(rows) / stats["wall_s"], 2)
    stats["steady_images_per_s"] = round(steady_state(stamped.rows(), batch, cfg.embed.actors or 1)["embedded_img_s"], 2)
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--models", default="timm:tf_efficientnet_lite0,open_clip:ViT-S-32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--work", default="/tmp/dedup2b-bench-embed")
    args = ap.parse_args(argv)
    threads = os.cpu_count() or 1
    plain, copies = corpus_rows(args.rows, 0.0), corpus_rows(args.rows, 0.3)
    ex = RayExecutor(from_dict({"input": {"path": "x"}, "run_dir": "x"}).ray)
    results = []
    try:
        for model in args.models.split(","):
            before = bare_throughput(model, plain, args.batch, threads)
            st = stage_run(model, plain, Path(args.work) / "plain", ex, args.batch)
            # the bare model before and after the stage; the faster counts (the box's speed drifts)
            bare = max(before, bare_throughput(model, plain, args.batch, threads))
            cp = stage_run(model, copies, Path(args.work) / "copies", ex, args.batch)
            results.append({"model": model, "rows": args.rows, "batch": args.batch, "threads": threads,
                            "bare_images_per_s": round(bare, 2), "stage_images_per_s": st["images_per_s"],
                            "ratio": round(st["images_per_s"] / bare, 3),
                            "steady_images_per_s": st["steady_images_per_s"],
                            "steady_ratio": round(st["steady_images_per_s"] / bare, 3),
                            "phases_s": {k: st[k] for k in ("read_s", "decode_s", "infer_s", "write_s")},
                            "copies30_images_per_s": cp["images_per_s"], "copies_skipped": cp["copies_skipped"],
                            "copy_speedup": round(cp["images_per_s"] / st["images_per_s"], 3)})
            print(results[-1], flush=True)
    finally:
        ex.shutdown()
        shutil.rmtree(args.work, ignore_errors=True)
    lines = ["| model | bare model img/s | embed stage img/s: wall / steady | ratio: wall / steady (target >= 0.9) | "
             "stage with 30 % byte copies img/s (wall) | speed-up |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['bare_images_per_s']} | {r['stage_images_per_s']} / {r['steady_images_per_s']} | "
              f"{r['ratio']} / {r['steady_ratio']} | "
              f"{r['copies30_images_per_s']} ({r['copies_skipped']} skipped) | {r['copy_speedup']}x |" for r in results]
    md = "\n".join(lines)
    print(md)
    cmd = "python -m bench.embed " + " ".join(sys.argv[1:] if argv is None else argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "embed.json").write_text(json.dumps({"command": cmd, "date": time.strftime("%Y-%m-%d"),
                                                    "cores": os.cpu_count(), "results": results}, indent=2))
    (RESULTS / "embed.md").write_text(f"Command: `{cmd}` ({os.cpu_count()} cores)\n\n{md}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
