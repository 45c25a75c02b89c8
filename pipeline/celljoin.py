"""Cell join: every pair above a cosine threshold, without comparing everything with everything.

Trained once (index stage), from a seeded sample:
  projection  V (r x d): the top-r eigenvectors of the uncentred second moment (PCA without
              centring keeps CLIP's shared mean direction as the first axis)
  centroids   spherical k-means in the projected space: the cells
Search, in two resumable steps that run as Ray tasks:
  assign (per vector shard)   each vector goes to its best cell, and also to every other cell whose
                              centroid score is within `border` of the best (at most `max_cells`),
                              so duplicates on both sides of a border share a cell
  join (per block of cells)   with z = V x and residual r = x - V^T z, the exact cosine is
                              x.y = z_x.z_y + r_x.r_y <= z_x.z_y + |r_x||r_y| (Cauchy-Schwarz), so
                              one small GEMM in r dimensions drops every pair that cannot reach the
                              threshold, losslessly; survivors are re-scored with the stored vectors
Pairs are found exactly within shared cells; what a cell border can still hide is measured by
`make bench-search` against exhaustive search.
"""
from __future__ import annotations

import numpy as np


def train_projection(sample: np.ndarray, r: int) -> np.ndarray:
    """(r, d) orthonormal rows spanning the top-r directions of the uncentred sample."""
    x = np.asarray(sample, dtype=np.float64)
    w, v = np.linalg.eigh(x.T @ x / max(len(x), 1))
    return np.ascontiguousarray(v[:, ::-1][:, :r].T, dtype=np.float32)


def project(x: np.ndarray, proj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(z, |residual|) of unit vectors x: z = x V^T, |r|^2 = |x|^2 - |z|^2."""
    x = np.asarray(x, dtype=np.float32)
    z = x @ proj.T
    res2 = np.einsum("ij,ij->i", x, x) - np.einsum("ij,ij->i", z, z)
    return z, np.sqrt(np.maximum(res2, 0.0)).astype(np.float32)


def train_cells(z: np.ndarray, nlist: int, seed: int, niter: int = 20) -> np.ndarray:
    import faiss
    zn = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    km = faiss.Kmeans(z.shape[1], nlist, niter=niter, spherical=True, seed=seed,
                      max_points_per_centroid=256, min_points_per_centroid=1, verbose=False)
    km.train(np.ascontiguousarray(zn, dtype=np.float32))
    return km.centroids.astype(np.float32)


def assign(z: np.ndarray, centroids: np.ndarray, border: float, max_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """(row index, cell) pairs: the best cell, plus cells within `border` of it."""
    import faiss
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    zn = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    k = min(max_cells, len(centroids))
    score, cell = index.search(np.ascontiguousarray(zn, dtype=np.float32), k)
    keep = score >= score[:, :1] - border
    rows = np.repeat(np.arange(len(z)), k).reshape(len(z), k)
    return rows[keep], cell[keep]


def join_cell(x: np.ndarray, z: np.ndarray, rn: np.ndarray, threshold: float,
              chunk: int = 2048, dense: float = 0.02) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Pairs (i < j, local indices) of one cell with exact cosine >= threshold, their cosines,
    and how many candidates passed the bound. Where the bound leaves more than `dense` of a
    block (a big duplicate group), the exact block product is cheaper than gathering pairs."""
    out_i, out_j, out_s = [], [], []
    n_cand = 0
    for s in range(0, len(z), chunk):
        bound = z[s:s + chunk] @ z[s:].T
        bound += np.outer(rn[s:s + chunk], rn[s:])
        hit = bound >= threshold
        hit[np.tril_indices(hit.shape[0], 0, hit.shape[1])] = False      # keep i < j only
        count = int(np.count_nonzero(hit))
        n_cand += count
        if not count:
            continue
        if count > dense * hit.size:
            exact = x[s:s + chunk] @ x[s:].T
            i, j = np.nonzero(hit & (exact >= threshold))
            sim = exact[i, j]
        else:
            i, j = np.nonzero(hit)
            sim = np.einsum("ij,ij->i", x[s + i], x[s + j])
            keep = sim >= threshold
            i, j, sim = i[keep], j[keep], sim[keep]
        out_i.append(i + s); out_j.append(j + s); out_s.append(sim)
    if not out_i:
        e = np.zeros(0, np.int64)
        return e, e, np.zeros(0, np.float32), n_cand
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s).astype(np.float32), n_cand


def join_cell_torch(x, z, rn, threshold: float, chunk: int = 8192):
    """join_cell on torch tensors (a CUDA device when there is one): the same pairs, exact fp32
    products (TF32 off), dense blocks only — a GPU multiplies faster than it gathers."""
    import torch
    out_i, out_j, out_s = [], [], []
    n_cand = 0
    n = z.shape[0]
    for s in range(0, n, chunk):
        rows = torch.arange(s, min(s + chunk, n), device=z.device)[:, None]
        cols = torch.arange(s, n, device=z.device)[None, :]
        hit = (z[s:s + chunk] @ z[s:].T + rn[s:s + chunk, None] * rn[None, s:] >= threshold) & (cols > rows)
        count = int(hit.sum())
        n_cand += count
        if not count:
            continue
        exact = x[s:s + chunk] @ x[s:].T
        i, j = torch.nonzero(hit & (exact >= threshold), as_tuple=True)
        out_i.append(i + s); out_j.append(j + s); out_s.append(exact[i, j])
    if not out_i:
        e = np.zeros(0, np.int64)
        return e, e, np.zeros(0, np.float32), n_cand
    cat = lambda t: torch.cat(t).cpu().numpy()  # noqa: E731
    return cat(out_i).astype(np.int64), cat(out_j).astype(np.int64), cat(out_s).astype(np.float32), n_cand


def join_members(gids: np.ndarray, cells: np.ndarray, x: np.ndarray, proj: np.ndarray,
                 threshold: float, device: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """All verified pairs (gid_a < gid_b, cosine) among members listed as (gid, cell), with x the
    member vectors aligned with `gids`. Pairs found in several cells appear once. `device`
    ("cpu", "cuda") runs the products with torch there; None uses numpy."""
    z, rn = project(x, proj)
    join = join_cell
    if device:
        import torch
        torch.backends.cuda.matmul.allow_tf32 = False
        x, z, rn = (torch.from_numpy(np.ascontiguousarray(v)).to(device) for v in (x, z, rn))
        join = join_cell_torch
    order = np.argsort(cells, kind="stable")
    cs = cells[order]
    starts = np.r_[0, np.nonzero(cs[1:] != cs[:-1])[0] + 1, len(cs)]
    a, b, s = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    n_cand = 0
    for lo, hi in zip(starts[:-1], starts[1:]):
        if hi - lo < 2:
            continue
        m = order[lo:hi]
        mi = m if device is None else torch.from_numpy(m).to(device)
        i, j, sim, c = join(x[mi], z[mi], rn[mi], threshold)
        n_cand += c
        ga, gb = gids[m[i]], gids[m[j]]
        a.append(np.minimum(ga, gb)); b.append(np.maximum(ga, gb)); s.append(sim)
    a, b, s = np.concatenate(a), np.concatenate(b), np.concatenate(s)
    if len(a):
        o = np.lexsort((b, a))
        a, b, s = a[o], b[o], s[o]
        first = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])]
        a, b, s = a[first], b[first], s[first]
    return a, b, s, n_cand
