"""CLIP-like synthetic vectors for tests and benchmarks.

Real CLIP embeddings are anisotropic: a shared mean direction, low effective rank, topics whose
members sit at cosine ~0.8-0.93, and near duplicates at 0.95-0.999. Isotropic Gaussians are far
too easy for PQ, so tests and benchmarks use this instead.
"""
from __future__ import annotations

import os

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def group_owners(rng, n_src: int, n_dup: int, max_group: int, tail: float) -> np.ndarray:
    """The source of each duplicate row: Zipf group sizes (most 1-3 copies, a few of thousands)."""
    sizes = np.minimum(rng.zipf(tail, n_dup), max_group)
    owners = np.repeat(rng.choice(n_src, len(sizes)), sizes)[:n_dup]
    if len(owners) < n_dup:
        owners = np.concatenate([owners, rng.choice(n_src, n_dup - len(owners))])
    return owners


def _write_meta(out, shard: int, rows: int) -> np.ndarray:
    """metadata/metadata_NNNNN.parquet (key, gid) of one synthetic shard; returns its gids."""
    import pyarrow as pa

    from dedup2b.core.io import write_parquet
    name = f"{shard:05d}"
    gids = (np.int64(shard) << 32) | np.arange(rows, dtype=np.int64)
    write_parquet(out / "metadata" / f"metadata_{name}.parquet",
                  pa.table({"key": [f"{name}{i:07d}" for i in range(rows)], "gid": gids}))
    return gids


def clip_like(n: int, d: int = 768, dup_frac: float = 0.3, rank: int = 96, seed: int = 0,
              max_group: int = 50, tail: float = 2.3) -> tuple[np.ndarray, np.ndarray]:
    """(vectors float32 n x d unit-norm, source id per row: rows with equal ids are duplicates)."""
    rng = np.random.default_rng(seed)
    rank = min(rank, d)
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0].T          # rank x d, orthonormal
    mean = _unit(rng.standard_normal(d))
    n_src = max(1, int(n * (1 - dup_frac)))
    n_topics = max(1, n_src // 40)
    topics = rng.standard_normal((n_topics, rank))
    topic_of = rng.integers(0, n_topics, n_src)
    low = topics[topic_of] + 0.55 * rng.standard_normal((n_src, rank))
    src = _unit(0.9 * mean + _unit(low @ basis) * 1.0 + 0.08 * _unit(rng.standard_normal((n_src, d))))
    # duplicates: Zipf group sizes (most 1-3 copies, a few of thousands), copies at cosine
    # ~0.97-0.999 from their source
    n_dup = n - n_src
    owners = group_owners(rng, n_src, n_dup, max_group, tail)
    noise = rng.uniform(0.03, 0.25, (n_dup, 1)) * _unit(rng.standard_normal((n_dup, d)))
    dups = _unit(src[owners] + noise)
    x = np.concatenate([src, dups]).astype(np.float32)
    ids = np.concatenate([np.arange(n_src), owners])
    perm = rng.permutation(n)
    return x[perm], ids[perm]


def exhaustive_pairs(x: np.ndarray, threshold: float, chunk: int = 4096) -> set[tuple[int, int]]:
    """All row pairs (i < j) with cosine >= threshold, by brute force."""
    out = set()
    for i in range(0, len(x), chunk):
        s = x[i:i + chunk] @ x.T
        r, c = np.nonzero(s >= threshold)
        r = r + i
        keep = r < c
        out.update(zip(r[keep].tolist(), c[keep].tolist()))
    return out


def write_corpus(out, x: np.ndarray, source: np.ndarray, rows_per_shard: int = 100_000) -> list[str]:
    """Write vectors in clip-retrieval layout (img_emb/img_emb_NNNNN.npy fp16 rows aligned with
    metadata/metadata_NNNNN.parquet: key, gid) plus ground_truth.parquet (gid, source)."""
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dedup2b.core.io import write_npy
    out = Path(out)
    names, gids_all = [], []
    for s, start in enumerate(range(0, len(x), rows_per_shard)):
        part = x[start:start + rows_per_shard]
        name = f"{s:05d}"
        write_npy(out / "img_emb" / f"img_emb_{name}.npy", part.astype(np.float16))
        gids_all.append(_write_meta(out, s, len(part)))
        names.append(name)
    pq.write_table(pa.table({"gid": np.concatenate(gids_all), "source": source.astype(np.int64)}),
                   out / "ground_truth.parquet")
    return names


def write_clip_like(out, n: int, d: int = 768, dup_frac: float = 0.3, rank: int = 96, seed: int = 0,
                    max_group: int = 50, tail: float = 2.3, rows_per_shard: int = 100_000,
                    chunk: int = 100_000, giant: tuple[int, ...] = ()) -> list[str]:
    """`clip_like` + `write_corpus` in bounded memory, for corpora too big for RAM (4 M x 768).

    Same distribution as `clip_like` (shared mean direction, low-rank topics, Zipf duplicate
    groups, copies at cosine ~0.95-0.999 from their source) but not the same draws: the per-row
    index arrays (topic, owner, permutation: a few bytes a row) are drawn up front, then vectors
    are drawn in float32, `chunk` sources at a time with their duplicates, from a generator seeded
    by (seed, chunk number), and scattered straight into memory-mapped fp16 shard files. Peak
    memory is about chunk x d x 4 bytes x a few, plus 8 bytes a row; output is deterministic for
    a given (n, d, ..., seed, chunk). `giant`: sizes of extra copy groups of one source each (a
    placeholder or stock photo crawled that many times), drawn from the duplicates' budget."""
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    rng = np.random.default_rng(seed)
    rank = min(rank, d)
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0].T.astype(np.float32)
    mean = _unit(rng.standard_normal(d)).astype(np.float32)
    n_src = max(1, int(n * (1 - dup_frac)))
    n_topics = max(1, n_src // 40)
    topics = rng.standard_normal((n_topics, rank)).astype(np.float32)
    topic_of = rng.integers(0, n_topics, n_src)
    n_dup = n - n_src
    owners = group_owners(rng, n_src, n_dup, max_group, tail)
    at = 0
    for size in giant:                        # one source each, copied `size` times
        owners[at:at + size] = rng.integers(0, n_src)
        at += size
    scale = rng.uniform(0.03, 0.25, n_dup).astype(np.float32)
    perm = rng.permutation(n)                 # output row p holds generated row perm[p]
    pos = np.empty(n, np.int64)
    pos[perm] = np.arange(n)
    source = np.concatenate([np.arange(n_src), owners])[perm]
    del perm

    emb = out / "img_emb"
    emb.mkdir(parents=True, exist_ok=True)
    n_shards = -(-n // rows_per_shard)
    names = [f"{s:05d}" for s in range(n_shards)]
    tmps = [emb / f".img_emb_{name}.npy.tmp" for name in names]
    mms = [np.lib.format.open_memmap(t, mode="w+", dtype=np.float16,
                                     shape=(min(rows_per_shard, n - s * rows_per_shard), d))
           for s, t in enumerate(tmps)]

    def scatter(x: np.ndarray, dest: np.ndarray) -> None:
        shard = dest // rows_per_shard
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            row = dest[sel] - s * rows_per_shard
            order = np.argsort(row)
            mms[s][row[order]] = x[sel[order]].astype(np.float16)

    dup_order = np.argsort(owners, kind="stable")
    owners_sorted = owners[dup_order]
    for c, lo in enumerate(range(0, n_src, chunk)):
        hi = min(lo + chunk, n_src)
        crng = np.random.default_rng([seed, c])
        low = topics[topic_of[lo:hi]] + 0.55 * crng.standard_normal((hi - lo, rank), dtype=np.float32)
        src = _unit(0.9 * mean + _unit(low @ basis)
                    + 0.08 * _unit(crng.standard_normal((hi - lo, d), dtype=np.float32)))
        del low
        scatter(src, pos[lo:hi])
        a, b = np.searchsorted(owners_sorted, [lo, hi])
        for s in range(a, b, chunk):                      # a huge group cannot blow the bound
            dj = dup_order[s:min(s + chunk, b)]
            noise = scale[dj, None] * _unit(crng.standard_normal((len(dj), d), dtype=np.float32))
            scatter(_unit(src[owners[dj] - lo] + noise), pos[n_src + dj])
        del src
    gids_all = []
    for s, (mm, t) in enumerate(zip(mms, tmps)):
        mm.flush()
        del mm
        mms[s] = None
        os.replace(t, emb / f"img_emb_{names[s]}.npy")
        gids_all.append(_write_meta(out, s, min(rows_per_shard, n - s * rows_per_shard)))
    pq.write_table(pa.table({"gid": np.concatenate(gids_all), "source": source.astype(np.int64)}),
                   out / "ground_truth.parquet")
    return names
