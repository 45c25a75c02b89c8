"""The embedded demo corpus: a small LAION-like dataset in exact img2dataset layout.

Built offline from real photographs that ship inside PyPI packages (scikit-image, scikit-learn,
matplotlib). It holds near duplicates of the kinds web crawls are full of (re-encodes, resizes,
crops, colour changes, recaptions), exact byte copies under other urls, hard non-duplicates
(different photos of similar content, far-apart crops of one large photo) and rows that
img2dataset marks failed. `ground_truth.parquet` says which keys belong together.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance

MAX_SIDE = 384


def _skimage(name: str) -> np.ndarray:
    import skimage.data
    return getattr(skimage.data, name)()


def _rgb(arr: np.ndarray) -> Image.Image:
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    img = Image.fromarray(arr)
    if img.mode == "RGBA":
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.split()[3])
        img = bg
    img = img.convert("RGB")
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.BICUBIC)
    return img


def _crop(img: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    w, h = img.size
    return img.crop((int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)))


def base_images() -> list[tuple[str, Image.Image]]:
    """Distinct photographs (name, image). Far-apart crops of one photo count as distinct."""
    from sklearn.datasets import load_sample_images
    import matplotlib.cbook
    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "camera", "brick",
                 "grass", "gravel", "moon", "coins", "clock", "page", "text", "cell", "colorwheel",
                 "logo", "horse", "microaneurysms"):
        out.append((name, _rgb(_skimage(name))))
    left, right, _ = __import__("skimage.data", fromlist=["x"]).stereo_motorcycle()
    out.append(("motorcycle", _rgb(left)))
    china, flower = load_sample_images().images
    out.append(("flower", _rgb(flower)))
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        out.append(("grace_hopper", Image.open(f).convert("RGB")))
    out[-1][1].thumbnail((MAX_SIDE, MAX_SIDE))
    # far-apart crops of large photos: distinct images of similar content (hard negatives)
    big = {"retina": _skimage("retina"), "china": china}
    for name, arr in big.items():
        img = Image.fromarray(arr).convert("RGB")
        out.append((f"{name}_a", _rgb(np.asarray(_crop(img, (0.0, 0.0, 0.45, 0.45))))))
        out.append((f"{name}_b", _rgb(np.asarray(_crop(img, (0.55, 0.55, 1.0, 1.0))))))
    return out


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def variants(img: Image.Image, rng: random.Random, n: int) -> list[tuple[str, bytes]]:
    """n near-duplicate copies of the kinds web crawls make; the first is the 'original'."""
    w, h = img.size
    makers = [
        ("original", lambda: _jpeg(img, 92)),
        ("reencode_q55", lambda: _jpeg(img, 55)),
        ("resize_85", lambda: _jpeg(img.resize((int(w * .85), int(h * .85)), Image.BICUBIC), 85)),
        ("crop_6pct", lambda: _jpeg(_crop(img, (.06, .06, .94, .94)), 88)),
        ("brighter", lambda: _jpeg(ImageEnhance.Brightness(img).enhance(1.12), 90)),
        ("contrast", lambda: _jpeg(ImageEnhance.Contrast(img).enhance(0.88), 90)),
        ("reencode_q40", lambda: _jpeg(img, 40)),
        ("resize_75", lambda: _jpeg(img.resize((int(w * .75), int(h * .75)), Image.BILINEAR), 80)),
        ("png", lambda: _png(img)),
        ("crop_left", lambda: _jpeg(_crop(img, (.0, .0, .92, 1.0)), 85)),
        ("reencode_q70", lambda: _jpeg(img, 70)),
        ("resize_90_q60", lambda: _jpeg(img.resize((int(w * .9), int(h * .9)), Image.BICUBIC), 60)),
        ("saturation", lambda: _jpeg(ImageEnhance.Color(img).enhance(1.15), 88)),
    ]
    chosen = [makers[0]] + rng.sample(makers[1:], min(n - 1, len(makers) - 1))
    return [(name, make()) for name, make in chosen]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def build_rows(seed: int = 0) -> list[dict]:
    """All demo rows (before sharding): url, caption, image bytes (None = failed), cluster."""
    rng = random.Random(seed)
    rows: list[dict] = []
    for i, (name, img) in enumerate(base_images()):
        n = [1, 8, 3, 1, 5, 9, 2, 7][i % 8] if name != "coffee" else 12
        for vname, data in variants(img, rng, n):
            rows.append({"url": f"http://images.example.test/{name}/{vname}.jpg",
                         "caption": f"a photo of {name.replace('_', ' ')}", "bytes": data, "cluster": name})
        for m in range(i % 3):  # the same bytes under other urls and captions: exact copies
            first = rows[-n - m]
            rows.append({"url": f"http://mirror{m}.example.test/{name}.jpg",
                         "caption": f"{name.replace('_', ' ')} (mirror {m})", "bytes": first["bytes"],
                         "cluster": name})
    for j, err in enumerate(["HTTP Error 404: Not Found", "timed out", "HTTP Error 403: Forbidden",
                             "image decoding error", "Name or service not known"]):
        rows.append({"url": f"http://gone{j}.example.test/x.jpg", "caption": f"missing image {j}",
                     "bytes": None, "cluster": None, "error": err})
    rng.shuffle(rows)
    return rows


def write_shards(rows: list[dict], out: Path, rows_per_shard: int = 100) -> list[Path]:
    """Write rows in img2dataset's layout: NNNNN.tar (KEY.jpg/.txt/.json), NNNNN.parquet, NNNNN_stats.json."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, len(rows), rows_per_shard):
        shard_id = s // rows_per_shard
        records = []
        tar_path = out / f"{shard_id:05d}.tar"
        with tarfile.open(tar_path, "w") as tar:
            for i, row in enumerate(rows[s:s + rows_per_shard]):
                key = f"{shard_id:05d}{i:04d}"
                rec = {"url": row["url"], "caption": row["caption"], "key": key,
                       "status": "success", "error_message": None, "width": None, "height": None,
                       "original_width": None, "original_height": None, "exif": None, "sha256": None}
                if row["bytes"] is None:
                    rec.update(status="failed_to_download", error_message=row.get("error", "failed"))
                else:
                    im = Image.open(io.BytesIO(row["bytes"]))
                    rec.update(width=im.size[0], height=im.size[1], original_width=im.size[0],
                               original_height=im.size[1], sha256=hashlib.sha256(row["bytes"]).hexdigest())
                    ext = "png" if im.format == "PNG" else "jpg"
                    for suffix, data in ((ext, row["bytes"]), ("txt", row["caption"].encode()),
                                         ("json", json.dumps(rec).encode())):
                        info = tarfile.TarInfo(f"{key}.{suffix}")
                        info.size, info.mtime = len(data), 0
                        tar.addfile(info, io.BytesIO(data))
                records.append(rec)
        pq.write_table(pa.Table.from_pylist(records), out / f"{shard_id:05d}.parquet")
        ok = sum(r["status"] == "success" for r in records)
        (out / f"{shard_id:05d}_stats.json").write_text(json.dumps(
            {"count": len(records), "successes": ok, "failed_to_download": len(records) - ok}))
        paths.append(tar_path)
    return paths


def build(out: str | Path, seed: int = 0, rows_per_shard: int = 100) -> Path:
    """Write the demo corpus under `out/shards` and its ground truth; returns the shard folder."""
    out = Path(out)
    rows = build_rows(seed)
    shards = out / "shards"
    write_shards(rows, shards, rows_per_shard)
    truth = [{"key": f"{i // rows_per_shard:05d}{i % rows_per_shard:04d}", "cluster": r["cluster"]}
             for i, r in enumerate(rows)]
    pq.write_table(pa.Table.from_pylist(truth), out / "ground_truth.parquet")
    return shards


def true_pairs(truth: pa.Table) -> set[tuple[str, str]]:
    """All key pairs (a < b) that the ground truth puts in one cluster."""
    by: dict[str, list[str]] = {}
    for key, cluster in zip(truth["key"].to_pylist(), truth["cluster"].to_pylist()):
        if cluster is not None:
            by.setdefault(cluster, []).append(key)
    return {(a, b) for keys in by.values() for i, a in enumerate(sorted(keys)) for b in sorted(keys)[i + 1:]}


def score(truth_path, samples_path) -> dict:
    """Pair precision / recall of a run's groups against the demo's ground truth."""
    truth = pq.read_table(truth_path)
    s = pq.read_table(samples_path, columns=["key", "group_id", "status"]).to_pylist()
    by: dict[int, list[str]] = {}
    for r in s:
        if r["status"] == "ok" and r["group_id"] is not None:
            by.setdefault(r["group_id"], []).append(r["key"])
    found = {(a, b) for keys in by.values() for i, a in enumerate(sorted(keys)) for b in sorted(keys)[i + 1:]}
    true = true_pairs(truth)
    tp = len(found & true)
    return {"precision": tp / len(found) if found else 1.0, "recall": tp / len(true) if true else 1.0,
            "true_pairs": len(true), "found_pairs": len(found)}
