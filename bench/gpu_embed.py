"""GPU embed benchmark: open_clip ViT-L-14 (random weights) end to end through the embed stage.

    bash bench/gpu_embed.sh              # on the GPU machine, offline (bench/GPU.md)
    bash bench/gpu_embed.sh --smoke      # here, on CPU: the same code path, 128 rows of ViT-S-32
    python -m bench.gpu_embed --rows 80000 --model open_clip:ViT-L-14 --batch 256 --out DIR

Steps, each printed when done and written to OUT/gpu_embed.json as the run goes:
  corpus  distinct JPEGs (long side 256-512 px, re-encoded crops of the demo photos) in
          img2dataset shards, built where the benchmark runs
  bare    the model alone at the stage's batch size: `forward` on tensors already on the device
          (the ceiling), `actor` = EmbedActor on pre-decoded batches (copy in, model, vectors out)
  stage   ingest + embed through the executor (Ray: read and decode tasks, one model actor), once
          per --decode-cpus value. Reads start once the model actor is loaded, so no decode backlog
          builds during its start-up; every row is stamped when decoded and when embedded. Printed:
          wall img/s (model start-up included), steady img/s (the middle 80 % of embed times),
          the stage's per-phase seconds, the actor's busy and starved shares, GPU busy %, and the
          phase that bounds the stream
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from dedup2b import demo
from dedup2b.core.config import from_dict
from dedup2b.stages.embed import EmbedActor, preprocess_batch
from dedup2b.core.executor import make_executor
from dedup2b.lib.models import preprocess_for
from dedup2b.driver import run_stages

PHASES = ("read", "decode", "infer", "write")


# ---------------------------------------------------------------- corpus

def synthetic_photos(n: int = 24, seed: int = 0) -> list[Image.Image]:
    """Photo-like stand-ins: smooth random colour fields with fine grain, 384 x 288."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((384, 288), Image.BICUBIC)
        grain = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 12, (288, 384, 3))
        out.append(Image.fromarray(np.clip(grain, 0, 255).astype(np.uint8)))
    return out


def photos() -> tuple[str, list[Image.Image]]:
    """The demo photos, or synthetic stand-ins where a package that ships them is missing."""
    try:
        return "demo photos", [img for _, img in demo.base_images()]
    except Exception as exc:  # a sample-data package absent or changed on this machine
        print(f"demo photos unavailable ({type(exc).__name__}: {exc}); using synthetic pictures", flush=True)
        return "synthetic", synthetic_photos()


def jpeg_variants(pictures: list[Image.Image], n: int, seed: int = 0) -> list[bytes]:
    """n JPEGs of the pictures: a random crop of 70-100 % per side, long side 256-512 px,
    quality 70-95."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        img = pictures[i % len(pictures)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.7, 1.0)), int(h * rng.uniform(0.7, 1.0))
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        scale = rng.uniform(256, 512) / max(cw, ch)
        crop = img.crop((left, top, left + cw, top + ch)).resize(
            (max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=rng.randint(70, 95))
        out.append(buf.getvalue())
    return out


def tagged(jpeg: bytes, text: str) -> bytes:
    """The JPEG with a comment segment after its start marker: other bytes (so exact-copy skipping
    leaves it alone), the same pixels and decode work."""
    payload = text.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def build_corpus(rows: int, folder: Path, rows_per_shard: int, pool: list[bytes]) -> dict:
    """`rows` distinct JPEG rows cycling over `pool`, written as img2dataset shards."""
    t0 = time.perf_counter()
    corpus = [{"url": f"http://gpu-bench.test/{i}.jpg", "caption": f"image {i}",
               "bytes": tagged(pool[i % len(pool)], f"row {i}")} for i in range(rows)]
    demo.write_shards(corpus, folder, rows_per_shard)
    sides = [max(Image.open(io.BytesIO(b)).size) for b in pool]
    return {"rows": rows, "shards": -(-rows // rows_per_shard), "distinct_pictures": len(pool),
            "mean_kb": round(float(np.mean([len(b) for b in pool])) / 1e3, 1),
            "long_side_px": [min(sides), round(float(np.mean(sides))), max(sides)],
            "seconds": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------- bare model

def decoded_batch(pool: list[bytes], batch: int, spec: str) -> dict:
    """One batch as the decode tasks hand it to the model actor."""
    data = np.array([pool[i % len(pool)] for i in range(batch)], dtype=object)
    rows = {"gid": np.arange(batch), "shard": np.full(batch, "00000"), "data": data, "t_read": np.zeros(batch)}
    return preprocess_batch(rows, preprocess_for(spec))


def images_per_s(fn, batch: int, iters: int, sync) -> float:
    """Throughput of `fn` on one batch: two warm-up calls, then `iters` timed ones."""
    for _ in range(2):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return batch * iters / (time.perf_counter() - t0)


def bare_throughput(spec: str, pool: list[bytes], batch: int, iters: int) -> dict:
    """The model alone at the stage's batch size, with the autocast Embedder uses (fp16 on CUDA):
    forward = the module on a float tensor already on the device; actor = EmbedActor on a decoded
    batch (host-to-device copy, normalisation, model, vectors back)."""
    import torch
    actor = EmbedActor(spec)
    emb = actor.embedder
    cuda = emb.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    x = torch.randn(batch, 3, emb.preprocess.size, emb.preprocess.size, device=emb.device)
    t0 = time.perf_counter()

    def forward():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            emb.model(x)

    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "batch": batch, "iters": iters,
           "forward_img_s": round(images_per_s(forward, batch, iters, sync), 1)}
    sample = decoded_batch(pool, batch, spec)
    out["actor_img_s"] = round(images_per_s(lambda: actor(sample), batch, iters, sync), 1)
    out["pixels"] = f"{sample['pixels'].dtype} {list(sample['pixels'].shape)}"
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


# ---------------------------------------------------------------- stage

class GpuBusy:
    """Samples the GPU's busy percentage through NVML every 0.2 s in a thread; no samples where
    there is no NVIDIA driver or no pynvml."""

    def __enter__(self):
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no driver / no NVML bindings: the benchmark runs without samples
            return self

        def poll():
            while not self.stop.wait(0.2):
                self.samples.append((time.time(), pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))
        threading.Thread(target=poll, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.stop.set()

    def mean(self, t0: float, t1: float) -> float | None:
        inside = [u for t, u in self.samples if t0 <= t <= t1]
        return round(float(np.mean(inside)), 1) if inside else None


def gated_read(read, flag: str, item: dict) -> list[dict]:
    """The stage's read, started once the model actor is up (its flag file exists): no decode
    backlog builds while the model loads, so the stream is measured as a long run sees it."""
    deadline = time.time() + 300
    while not os.path.exists(flag) and time.time() < deadline:
        time.sleep(0.05)
    return read(item)


def stamp_decoded(preprocess, batch: dict) -> dict:
    """The stage's decode step, plus the wall-clock time its rows were ready for the model."""
    out = preprocess(batch)
    out["t_decoded"] = np.full(len(out["gid"]), time.time())
    return out


class StampedActor(EmbedActor):
    """The stage's model actor: writes the flag file once loaded, passes the decode stamps on and
    adds when its rows were embedded."""

    def __init__(self, spec: str, threads: int, flag: str):
        super().__init__(spec, threads)
        Path(flag).touch()

    def __call__(self, batch: dict) -> dict:
        out = super().__call__(batch)
        return {**out, "t_decoded": batch["t_decoded"], "t_embedded": np.full(len(out["gid"]), time.time())}


class StampedStream:
    """Executor wrapper: the embed stream with read gated on the model (gated_read) and per-row
    stamps (decoded, embedded), kept with the rows' read / decode / infer seconds."""

    KEYS = ("t_decoded", "t_embedded", "t_read", "t_decode", "t_infer")

    def __init__(self, ex, flag: Path):
        self.ex, self.flag = ex, str(flag)
        self.start = 0.0
        self.parts: list[dict] = []

    def __getattr__(self, name):
        return getattr(self.ex, name)

    def stream(self, items, read, preprocess, _model_cls, model_args, batch_size, **kwargs):
        self.start, self.parts = time.time(), []
        for batch in self.ex.stream(items, partial(gated_read, read, self.flag), partial(stamp_decoded, preprocess),
                                    StampedActor, (*model_args, self.flag), batch_size, **kwargs):
            self.parts.append({k: np.asarray(batch[k], dtype=np.float64) for k in self.KEYS})
            yield batch

    def rows(self) -> dict:
        return {k: np.concatenate([p[k] for p in self.parts]) for k in self.KEYS}


def steady_state(rows: dict, batch: int, actors: int, trim: float = 0.1) -> dict:
    """The stream between its 10th and 90th percentile of embed times: rows embedded per second,
    decode's rate while it ran, the model actor's busy share, and the share of the window it had
    no batch waiting (starved)."""
    dec, emb = np.sort(rows["t_decoded"]), np.sort(rows["t_embedded"])
    t0, t1 = np.quantile(emb, [trim, 1 - trim])
    span = max(t1 - t0, 1e-9)
    grid = np.linspace(t0, t1, 500)
    waiting = np.searchsorted(dec, grid, "right") - np.searchsorted(emb, grid, "right")
    inside = (rows["t_embedded"] > t0) & (rows["t_embedded"] <= t1)
    out = {"seconds": span, "embedded_img_s": np.count_nonzero(inside) / span,
           "decoded_img_s": len(dec) / max(dec[-1] - dec[0], 1e-9),
           "actor_busy": rows["t_infer"][inside].sum() / actors / span,
           "actor_starved": np.mean(waiting <= batch),
           "read_s": rows["t_read"][inside].sum(), "decode_s": rows["t_decode"][inside].sum()}
    return {"t0": float(t0), "t1": float(t1), **{k: round(float(v), 3) for k, v in out.items()}}


def bounding_phase(st: dict, write_share: float) -> str:
    """The model actor busy nearly all the window: infer bounds. Starved most of it: the CPU side
    (read or decode, the larger) does. Neither: the driver's writes, or the hand-over between
    stages."""
    if st["actor_busy"] >= 0.9:
        return "infer"
    if st["actor_starved"] >= 0.5:
        return "decode" if st["decode_s"] >= st["read_s"] else "read"
    return "write" if write_share >= 0.5 else "hand-over between stages"


def stage_run(args, shards: Path, ex, decode_cpus: float) -> dict:
    """ingest + embed on the corpus in a fresh run directory, timed and broken down by phase."""
    run_dir = Path(args.work) / f"run-decode{decode_cpus:g}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = from_dict({"input": {"path": str(shards)}, "run_dir": str(run_dir),
                     "embed": {"model": args.model, "batch_size": args.batch, "actors": args.actors,
                               "decode_cpus": decode_cpus}})
    stamped = StampedStream(ex, run_dir / "model_ready")
    with GpuBusy() as gpu:
        stats = run_stages(cfg, stamped, stages=("ingest", "embed"), log=lambda line: print("  " + line))
    embed, rows = stats["embed"], stamped.rows()
    st = steady_state(rows, args.batch, args.actors)
    st["gpu_busy_pct"] = gpu.mean(st.pop("t0"), st.pop("t1"))
    write_share = round(embed["write_s"] / max(embed["wall_s"], 1e-9), 3)
    return {"decode_cpus": decode_cpus, "rows": embed["rows"], "failed": embed["failed"],
            "ingest_s": stats["ingest"]["wall_s"], "embed_wall_s": embed["wall_s"],
            "wall_img_s": round(embed["rows"] / embed["wall_s"], 1),
            "first_embedded_s": round(float(rows["t_embedded"].min() - stamped.start), 1),
            "steady_img_s": st["embedded_img_s"],
            "phases_s": {p: embed[f"{p}_s"] for p in PHASES}, "steady": st, "write_share": write_share,
            "bound": bounding_phase(st, write_share)}


# ---------------------------------------------------------------- report

def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "ray", "open_clip", "PIL", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = "missing"
    return out


TABLE_HEAD = ("| decode_cpus | wall img/s | steady img/s | / forward | / actor | GPU busy % | actor busy "
              "| actor starved | read s | decode s | infer s | write s | bound |\n" + "|---" * 13 + "|")


def summary(result: dict) -> str:
    bare, target = result.get("bare", {}), result["target_img_s"]
    lines = [(f"executor {result['executor']}, model {result['model']}, batch {result['batch']}, "
              f"{result['corpus']['rows']} rows, device {bare.get('device', '?')}"),
             f"bare model: forward {bare.get('forward_img_s')} img/s, EmbedActor {bare.get('actor_img_s')} img/s",
             TABLE_HEAD]
    for s in result["stages"]:
        st = s["steady"]
        lines.append(f"| {s['decode_cpus']:g} | {s['wall_img_s']} | {s['steady_img_s']} | {s['vs_forward']} | "
                     f"{s['vs_actor']} | {st['gpu_busy_pct']} | {st['actor_busy']} | {st['actor_starved']} | "
                     + " | ".join(str(s["phases_s"][p]) for p in PHASES) + f" | {s['bound']} |")
    best = max((s["steady_img_s"] for s in result["stages"]), default=0.0)
    lines.append(f"target >= {target} img/s (steady state): {'met' if best >= target else 'NOT met'} ({best})")
    return "\n".join(lines)


def save(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_embed.json").write_text(json.dumps(result, indent=2))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=80_000)
    ap.add_argument("--rows-per-shard", type=int, default=1000)
    ap.add_argument("--pictures", type=int, default=1024, help="distinct JPEG pictures the rows cycle over")
    ap.add_argument("--model", default="open_clip:ViT-L-14")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--decode-cpus", default="0.5", help="CPU request of a decode task; a comma list runs "
                                                         "the stage once per value")
    ap.add_argument("--cpus", type=int, default=0, help="Ray CPUs (0 = all cores)")
    ap.add_argument("--object-store-mb", type=int, default=8000)
    ap.add_argument("--executor", default="ray", choices=("ray", "local"))
    ap.add_argument("--require-cuda", action="store_true",
                    help="stop at once unless torch and Ray both see a CUDA GPU (a CPU ViT-L-14 run takes hours)")
    ap.add_argument("--bare-iters", type=int, default=30)
    ap.add_argument("--target", type=float, default=2500.0, help="img/s the steady state should reach")
    ap.add_argument("--work", default="/tmp/dedup2b-gpu-embed")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results/tmp/gpu_embed"))
    return ap.parse_args(argv)


def require_cuda(ex=None) -> None:
    """Stops the run when torch, or the executor's Ray, sees no CUDA GPU."""
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("--require-cuda: torch sees no CUDA device")
    if ex is not None and ex.kind == "ray" and not ex.num_gpus:
        raise SystemExit("--require-cuda: Ray sees no GPU, so the model actor would run on the CPU")


def main(argv=None) -> int:
    args = parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    result = {"command": "python -m bench.gpu_embed " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "versions": versions(),
              "model": args.model, "batch": args.batch, "target_img_s": args.target, "stages": []}
    print(f"versions: {result['versions']}", flush=True)
    if args.require_cuda:
        require_cuda()
    source, pictures = photos()
    pool = jpeg_variants(pictures, min(args.pictures, args.rows))
    result["corpus"] = {"source": source, **build_corpus(args.rows, work / "shards", args.rows_per_shard, pool)}
    print(f"corpus: {result['corpus']}", flush=True)
    result["bare"] = bare_throughput(args.model, pool, args.batch, args.bare_iters)
    print(f"bare: {result['bare']}", flush=True)
    save(result, out)
    ex = make_executor(args.executor, from_dict({"input": {"path": "x"}, "run_dir": "x",
                                                 "ray": {"num_cpus": args.cpus,
                                                         "object_store_mb": args.object_store_mb}}).ray)
    result["executor"] = ex.kind + (f" (Ray GPUs: {ex.num_gpus})" if ex.kind == "ray" else " (in-process)")
    print(f"executor: {result['executor']}", flush=True)
    try:
        if args.require_cuda:
            require_cuda(ex)
        for decode_cpus in (float(v) for v in args.decode_cpus.split(",")):
            s = stage_run(args, work / "shards", ex, decode_cpus)
            s["vs_forward"] = round(s["steady_img_s"] / result["bare"]["forward_img_s"], 3)
            s["vs_actor"] = round(s["steady_img_s"] / result["bare"]["actor_img_s"], 3)
            result["stages"].append(s)
            print(f"stage: {s}", flush=True)
            save(result, out)
    finally:
        ex.shutdown()
    print(summary(result))
    (out / "gpu_embed.md").write_text(f"Command: `{result['command']}`\n\n{summary(result)}\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
