"""Synthetic positives for calibration: web-crawl-style copies of sampled corpus rows.

Each sampled ok row gets `copies` copies made the way crawls make them (a crop of 5-15 % in
total, a downscale to 50-90 %, a brightness / contrast / saturation change of up to 15 %, always
a JPEG re-encode at quality 30-75), embedded with the run's model on this machine. The copies
are positives (cosine to the row's stored vector); every corpus row outside the row's group is a
negative (cosine of the row's stored vector to it). Deterministic for a seed.
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance

from ..core.vectors import VectorStore
from ..lib.images import decode, preprocess_bytes
from .audit import wilson

_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


def web_copy(data: bytes, rng: np.random.Generator) -> bytes:
    """One copy of an image as a crawl would hold it: crop, downscale, colour change, JPEG re-encode."""
    img = decode(data)
    w, h = img.size
    if rng.random() < 0.7:
        cut_w, cut_h = (rng.uniform(0.05, 0.15, 2) * (w, h)).astype(int)
        left, top = int(cut_w * rng.random()), int(cut_h * rng.random())
        img = img.crop((left, top, max(left + 1, w - (cut_w - left)), max(top + 1, h - (cut_h - top))))
    if rng.random() < 0.7:
        s = rng.uniform(0.5, 0.9)
        img = img.resize((max(1, round(img.size[0] * s)), max(1, round(img.size[1] * s))),
                         (Image.BICUBIC, Image.BILINEAR)[int(rng.integers(2))])
    if rng.random() < 0.6:
        img = _ENHANCERS[int(rng.integers(3))](img).enhance(rng.uniform(0.85, 1.15))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(30, 76)))
    return buf.getvalue()


def sample_rows(run, samples: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """n ok rows (all when fewer), seeded, with the tar member of each."""
    ok = samples[samples["status"] == "ok"]
    pick = np.sort(np.random.default_rng(seed).choice(len(ok), size=min(n, len(ok)), replace=False))
    rows = ok.iloc[pick].copy()
    # rows of the same group with the same bytes: flagged at any threshold (one shared vector)
    same = ok.groupby(["group_id", "sha256"])["gid"].size().rename("exact_copies") - 1
    rows = rows.join(same, on=["group_id", "sha256"])
    members = run.ingest_table(columns=["gid", "member"]).to_pandas()
    return rows.merge(members, on="gid", how="left").reset_index(drop=True)


def copy_scores(run, rows: pd.DataFrame, src: np.ndarray, copies: int, seed: int, log=print) -> np.ndarray:
    """(rows x copies) cosine of each copy to its row's stored vector; rows with equal bytes share copies."""
    from ..lib.models import Embedder
    emb = Embedder(run.cfg.embed.model, threads=run.cfg.embed.threads)
    first = rows.drop_duplicates("sha256")
    images: dict[str, bytes] = {}
    for shard in run.shards:
        want = first[first["shard"] == shard.name]
        images.update(run.source.read_images(shard, dict(zip(want["member"], want["sha256"]))))
    log(f"calibrate: embedding {copies} copies of {len(first)} distinct images with {run.cfg.embed.model}")
    pixels, owner = [], []
    for i, sha in enumerate(first["sha256"]):
        rng = np.random.default_rng([seed, i])
        for _ in range(copies):
            pixels.append(preprocess_bytes(web_copy(images[sha], rng), emb.preprocess))
            owner.append(sha)
    batch = run.cfg.embed.batch_size or 32
    vecs = np.concatenate([emb(np.stack(pixels[i:i + batch])) for i in range(0, len(pixels), batch)])
    by_sha = {sha: vecs[np.asarray(owner) == sha] for sha in first["sha256"]}
    return np.stack([by_sha[sha] @ src[i] for i, sha in enumerate(rows["sha256"])])


def negative_counts(store: VectorStore, group_of: pd.Series, rows: pd.DataFrame, src: np.ndarray,
                    grid: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """(rows x grid) number of corpus rows outside each row's group with cosine >= each threshold.

    One exact pass over the stored vectors (memory-mapped, shard by shard)."""
    hist = np.zeros((len(rows), len(grid)), dtype=np.int64)
    own = rows["group_id"].to_numpy(np.int64)
    for index in sorted(store.shards):
        gids, vecs = store.shard(index)
        groups = group_of.reindex(gids).fillna(pd.Series(gids, index=gids)).to_numpy(np.int64)
        for lo in range(0, len(gids), chunk):
            sim = src @ np.asarray(vecs[lo:lo + chunk], dtype=np.float32).T
            r, c = np.nonzero((sim >= grid[0]) & (groups[None, lo:lo + chunk] != own[:, None]))
            b = np.searchsorted(grid, sim[r, c], side="right") - 1
            np.add.at(hist, (r, b), 1)
    return hist[:, ::-1].cumsum(axis=1)[:, ::-1]


def estimate(rows: pd.DataFrame, scores: np.ndarray, fp: np.ndarray, grid: np.ndarray, n_ok: int,
             boot: int = 500, seed: int = 0) -> pd.DataFrame:
    """Threshold grid -> pair precision (bootstrap 95 % CI over sampled rows) and copy recall.

    Each sampled row s contributes true pairs e_s + c_s * r_s(t) (e_s: rows with its exact bytes,
    c_s: the other rows of its group, r_s(t): the fraction of its synthetic copies at cosine >= t)
    and false pairs fp_s(t) (rows outside its group at cosine >= t). Sums over a uniform sample of
    rows, scaled by n_ok / (2 n), estimate the corpus's pair counts."""
    exact = rows["exact_copies"].to_numpy(np.int64)
    near = rows["group_size"].to_numpy(np.int64) - 1 - exact
    r = (scores[:, :, None] >= grid[None, None, :]).mean(axis=1)
    tp = exact[:, None] + near[:, None] * r
    n = len(rows)

    def prec(t, f):
        tot = t + f
        return np.where(tot > 0, t / np.where(tot > 0, tot, 1), 1.0)
    w = np.random.default_rng(seed).integers(0, n, size=(boot, n))
    counts = np.stack([np.bincount(x, minlength=n) for x in w]).astype(np.float64)
    pb = prec(counts @ tp, counts @ fp)
    scale = n_ok / (2.0 * n)
    # the interval: the bootstrap's, widened to the Wilson interval of the pooled pair counts so that
    # a sample without a single false pair does not claim certainty
    t_sum, f_sum = tp.sum(0), fp.sum(0)
    wil = np.array([wilson(round(t), round(t + f)) for t, f in zip(t_sum, f_sum)]).reshape(-1, 2)
    return pd.DataFrame({
        "source": "synthetic", "method": "copies", "threshold": grid, "precision": prec(t_sum, f_sum),
        "precision_lo": np.minimum(np.percentile(pb, 2.5, axis=0), wil[:, 0]),
        "precision_hi": np.maximum(np.percentile(pb, 97.5, axis=0), wil[:, 1]),
        "recall": (scores.ravel()[:, None] >= grid[None, :]).mean(axis=0), "n": n,
        "copies": scores.size, "copies_above": (scores.ravel()[:, None] >= grid[None, :]).sum(axis=0),
        "est_true_pairs": tp.sum(0) * scale, "est_false_pairs": fp.sum(0) * scale})
