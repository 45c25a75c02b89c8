"""Cell join: every pair above a cosine threshold, without comparing everything with everything.

Trained once (index stage), from a seeded sample:
  projection  V (r x d): the top-r eigenvectors of the uncentred second moment (PCA without
              centring keeps CLIP's shared mean direction as the first axis)
  centroids   spherical k-means in the projection's first `search.cell_dim` dims (64 of 128: the
              assignment at 0.56-0.64 of the cost, copies share a cell nearly as often): the
              cells, of about `search.cell_rows` rows each whatever the row count, so a row's join
              cost stays flat as rows grow; trained in two levels (train_cells)
  coarse.npy  the coarse centroids: sqrt(cells) of them, each owning the fine cells trained inside it
Search, in two resumable steps that run as Ray tasks:
  assign (per vector shard)   search.assign = nested (Nested): each vector goes to the coarse cells
                              scoring within `coarse_delta` of its best coarse cell, and in each of
                              those to the best fine cell and every fine cell within `border` of it
                              (at most `max_cells` in all): about 3 sqrt(cells) products a row, so
                              its cost grows as the square root of the rows, and near copies, which
                              probe the same coarse cells, share a fine cell nearly as often as under
                              search.assign = flat: the best of every cell and those within
                              `border` of it (cells products a row: at 10 M rows, 10,000 cells, the
                              search's largest cost)
  join (per block of cells)   with z = V x and residual r = x - V^T z, the exact cosine is
                              x.y = z_x.z_y + r_x.r_y <= z_x.z_y + |r_x||r_y| (Cauchy-Schwarz), so
                              one small GEMM in r dimensions drops every pair that cannot reach the
                              threshold, losslessly; survivors are re-scored with the stored vectors.
                              The assign step writes each row's [z, |r|] (fp16, pack_zr) in the
                              join's order, so a block reads those sequentially and, of the stored
                              vectors, only the rows of its candidate pairs
Pairs are found exactly within shared cells; what a cell border can still hide is measured by
`make bench-search` against exhaustive search.

Dense cells (`join_cell_dense`: cells of `dense_min` rows or more whose probed rows average
DENSE_NEIGHBOURS neighbours or more, `is_dense`): a placeholder photo crawled
100,000 times puts 100,000 near copies, 5e9 pairs, in one cell. There the join finds the cell's
connected components and writes the edges of a spanning forest of its threshold graph, not every
pair: leaders (rows whose similarity to every member is computed exactly) settle whole balls of
copies at once, and only pairs of rows in different components are bounded and re-scored. A
union of spanning forests of the cells has the components of the union of the cells' graphs, so
the groups are unchanged; what changes is the output, O(rows) instead of O(pairs).
"""
from __future__ import annotations

import numpy as np

from ..core.vectors import Rows, normalise


def train_projection(sample: np.ndarray, r: int) -> np.ndarray:
    """(r, d) orthonormal rows spanning the top-r directions of the uncentred sample."""
    x = np.asarray(sample, dtype=np.float32)
    w, v = np.linalg.eigh((x.T @ x).astype(np.float64) / max(len(x), 1))
    return np.ascontiguousarray(v[:, ::-1][:, :r].T, dtype=np.float32)


def project(x: np.ndarray, proj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(z, |residual|) of unit vectors x: z = x V^T, |r|^2 = |x|^2 - |z|^2."""
    x = np.asarray(x, dtype=np.float32)
    z = x @ proj.T
    res2 = np.einsum("ij,ij->i", x, x) - np.einsum("ij,ij->i", z, z)
    return z, np.sqrt(np.maximum(res2, 0.0)).astype(np.float32)


def project_zr(x: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """[z, |r|] of unit vectors x in one (n, r + 1) array (project's two outputs, no stacking copy)."""
    x = np.asarray(x, dtype=np.float32)
    zr = x @ np.vstack([proj, np.zeros((1, proj.shape[1]), proj.dtype)]).T
    res2 = np.einsum("ij,ij->i", x, x) - np.einsum("ij,ij->i", zr, zr)
    zr[:, -1] = np.sqrt(np.maximum(res2, 0.0))
    return zr


def _fp16_slack(r: int) -> float:
    """The most the cross terms of a pack_zr bound can add: with z16 = fp16(z) and e = z - z16,
    |e| <= u|z| + sqrt(r) 2^-25 (u = 2^-11, the second term fp16's subnormal spacing), and
    |z| <= 1.002 (stored unit vectors are fp16 themselves); z16.e' + e.z16' <= 2 (1 + u) 1.002 |e|max."""
    u = 2.0 ** -11
    return 2 * 1.002 * (1 + u) * (1.002 * u + np.sqrt(r) * 2.0 ** -25)


def pack_zr(zr: np.ndarray) -> np.ndarray:
    """project_zr's [z, |r|] (float32, r + 1 columns) in fp16, half the bytes: z rounded to
    nearest, and in the last column |s| = sqrt(|r|^2 + |z - z16|^2), rounded up: the length of
    x's residual from the rounded z (x = V^T z16 + s, V s = z - z16). unpack_zr makes it a bound."""
    z = zr[:, :-1]
    z16 = z.astype(np.float16)
    e = z - z16.astype(np.float32)
    s = np.sqrt(zr[:, -1] ** 2 + np.einsum("ij,ij->i", e, e))
    out = np.empty(zr.shape, np.float16)
    out[:, :-1] = z16
    s16 = s.astype(np.float16)
    up = s16.astype(np.float32) < s
    s16[up] = np.nextafter(s16[up], np.float16(np.inf))
    out[:, -1] = s16
    return out


def unpack_zr(packed: np.ndarray) -> np.ndarray:
    """float32 rows [z16, |s|, sqrt(c)] of pack_zr's rows: the product of two of them,
    z16.z16' + |s||s'| + c, bounds their vectors' cosine from above as project_zr's rows do
    (x.y = z16.z16' + z16.e' + e.z16' + s.s', the cross terms at most c = _fp16_slack), so
    every function here that bounds with zr takes them as they are (one more column)."""
    out = np.empty((len(packed), packed.shape[1] + 1), np.float32)
    out[:, :-1] = packed
    out[:, -1] = np.sqrt(_fp16_slack(packed.shape[1] - 1))
    return out


class Vectors:
    """A join block's vectors as the store holds them (VectorStore.get_raw: fp16, and the rows to
    normalise as they are read): `v[idx]` (an index array or a slice) gives float32 rows equal
    to VectorStore.get's. The block never holds a float32 copy of every member: half the memory,
    and only the rows a candidate pair touches are converted after the projection."""

    def __init__(self, raw: np.ndarray, norm: np.ndarray | None = None):
        self.raw, self.norm = raw, norm

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, idx) -> np.ndarray:
        x = self.raw[idx].astype(np.float32)
        if self.norm is not None:
            normalise(x, self.norm[idx])
        return x

    def project_zr(self, proj: np.ndarray, chunk: int = 8192) -> np.ndarray:
        """project_zr of every row, a cache-sized chunk at a time."""
        out = np.empty((len(self), proj.shape[0] + 1), np.float32)
        for s in range(0, len(self), chunk):
            out[s:s + chunk] = project_zr(self[s:s + chunk], proj)
        return out


def _kmeans(z: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    import faiss
    km = faiss.Kmeans(z.shape[1], k, niter=niter, spherical=True, seed=seed,
                      max_points_per_centroid=100, min_points_per_centroid=1, verbose=False)
    km.train(np.ascontiguousarray(z, dtype=np.float32))
    return km.centroids.astype(np.float32)


def best_of(rows: np.ndarray, cents: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """argmax(rows @ cents.T, axis=1), a chunk of rows at a time: the whole score matrix of a
    2 M-row sample against 3,000 coarse centroids (LAION-2B) would be 24 GB."""
    out = np.empty(len(rows), np.int64)
    for s in range(0, len(rows), chunk):
        out[s:s + chunk] = np.argmax(rows[s:s + chunk] @ cents.T, axis=1)
    return out


# up to this many cells: one k-means and exhaustive assignment (one matrix product, the fastest
# below ~10,000 cells: 1.0 s vs 1.6 s per 100 k rows at 4,000 cells, 2.2 s vs 2.0 s at 10,000,
# one core); beyond: two levels, sublinear in cells
FLAT_CELLS = 8192


def train_cells(z: np.ndarray, nlist: int, seed: int, niter: int = 5,
                two_levels: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Spherical k-means centroids (the cells), and for two levels the coarse centroids (else
    None). The cells move only the join's cost, never its result. At 1 M rows (bench-search
    corpus) 100 points a cell and 10 iterations gave the join 0.2 % more candidates than 256 points
    and 20 iterations; 64 points gave 26 % more. 5 iterations: 0.8 % more candidates than 10
    (bench-scale corpus, 1 M rows), k-means 2.05 -> 1.36 s.
    Beyond FLAT_CELLS cells, two levels: sqrt(nlist) coarse cells, then each coarse cell's sample
    split into fine cells in proportion to its share, so training costs sample x (sqrt(nlist) +
    fine cells per coarse cell) products instead of sample x nlist. The fine centroids come out
    grouped by coarse cell, in coarse order (TwoLevel assigns through that grouping).
    `two_levels`: two levels at any nlist (the nested assignment needs them)."""
    zn = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    if not two_levels and nlist <= FLAT_CELLS:
        return _kmeans(zn, nlist, seed, niter), None
    coarse = _kmeans(zn, int(round(np.sqrt(nlist))), seed, niter)
    owner = best_of(zn, coarse)
    counts = np.bincount(owner, minlength=len(coarse))
    share = np.maximum(1, np.round(nlist * counts / max(len(zn), 1)).astype(int)) * (counts > 0)
    out, kept = [], []
    for c in np.flatnonzero(counts):
        pts = zn[owner == c]
        out.append(_kmeans(pts, int(min(share[c], len(pts))), seed + int(c), niter))
        kept.append(c)
    return np.concatenate(out), coarse[kept]


class TwoLevel:
    """Assignment to many cells in matrix products: a row's `nprobe` best coarse cells, then the
    fine cells of those coarse cells, one product per coarse cell over the rows that probe it.
    A row costs sqrt(cells) x (1 + nprobe) products, not cells. `search(q, k)` answers like a
    FAISS index: (scores, cell ids), best first, -1 padded."""

    def __init__(self, fine: np.ndarray, coarse: np.ndarray, nprobe: int = 8):
        self.fine = np.ascontiguousarray(fine, dtype=np.float32)
        self.coarse = np.ascontiguousarray(coarse, dtype=np.float32)
        owner = best_of(self.fine, self.coarse)                     # each fine cell's coarse cell
        self.order = np.argsort(owner, kind="stable")
        self.bounds = np.searchsorted(owner[self.order], np.arange(len(self.coarse) + 1))
        self.nprobe = nprobe
        self.ntotal, self.d = self.fine.shape

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(q)
        probe = min(self.nprobe, len(self.coarse))
        top = np.argpartition(-(q @ self.coarse.T), probe - 1, axis=1)[:, :probe].ravel()
        by = np.argsort(top, kind="stable")                  # (row, coarse cell) pairs by coarse cell
        who_all, starts = by // probe, np.searchsorted(top[by], np.arange(len(self.coarse) + 1))
        best_s = np.full((n, k), -np.inf, np.float32)
        best_c = np.full((n, k), -1, np.int64)
        for c in range(len(self.coarse)):
            who = who_all[starts[c]:starts[c + 1]]
            cells = self.order[self.bounds[c]:self.bounds[c + 1]]
            if not len(who) or not len(cells):
                continue
            s = np.concatenate([best_s[who], q[who] @ self.fine[cells].T], axis=1)   # keep the best k so far
            ids = np.concatenate([best_c[who], np.broadcast_to(cells, (len(who), len(cells)))], axis=1)
            pick = np.argpartition(-s, k - 1, axis=1)[:, :k] if s.shape[1] > k else np.arange(k)[None, :].repeat(len(who), 0)
            best_s[who] = np.take_along_axis(s, pick, axis=1)
            best_c[who] = np.take_along_axis(ids, pick, axis=1)
        order = np.argsort(-best_s, axis=1, kind="stable")
        return np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_c, order, axis=1)


class Nested:
    """The nested assignment (search.assign = nested): a row goes to the coarse cells scoring
    within `delta` of its best coarse cell, and in each of those to the best fine cell and the fine
    cells within `border` of it (that coarse cell's own best, not the row's best overall); the best
    `max_cells` of all those, best first. A row costs (coarse cells + fine cells of the probed
    ones) products, about 3 sqrt(cells) instead of cells. Two near copies probe nearly the same
    coarse cells and pick the same fine cell in each, so they share a cell nearly as often as under the
    exhaustive rule, at more cells a row (bench/results/assign.md)."""

    def __init__(self, fine: np.ndarray, coarse: np.ndarray, delta: float):
        self.fine = np.ascontiguousarray(fine, dtype=np.float32)
        owner = best_of(self.fine, np.asarray(coarse, np.float32))     # each fine cell's coarse cell
        kept = np.unique(owner)               # coarse cells that own a fine cell: the best one always does
        self.coarse = np.ascontiguousarray(np.asarray(coarse, np.float32)[kept])
        owner = np.searchsorted(kept, owner)
        self.order = np.argsort(owner, kind="stable")
        self.bounds = np.searchsorted(owner[self.order], np.arange(len(kept) + 1))
        self.delta = delta
        self.ntotal, self.d = self.fine.shape

    def assign(self, q: np.ndarray, border: float, max_cells: int, block: int = 1 << 24) -> np.ndarray:
        """(n, max_cells) fine cells of unit rows q, best first, -1 padded; rows taken so that a
        slice's coarse scores hold at most `block` entries (3,000 coarse cells at LAION-2B)."""
        n = len(q)
        step = max(1024, block // max(len(self.coarse), 1))
        if n > step:
            return np.concatenate([self.assign(q[s:s + step], border, max_cells, block) for s in range(0, n, step)])
        cs = q @ self.coarse.T
        row, col = np.nonzero(cs >= cs.max(axis=1, keepdims=True) - self.delta)
        by = np.argsort(col, kind="stable")
        row, starts = row[by], np.searchsorted(col[by], np.arange(len(self.coarse) + 1))
        best_s = np.full((n, max_cells), -np.inf, np.float32)
        best_c = np.full((n, max_cells), -1, np.int64)
        for c in range(len(self.coarse)):
            who = row[starts[c]:starts[c + 1]]
            if not len(who):
                continue
            cells = self.order[self.bounds[c]:self.bounds[c + 1]]
            s = q[who] @ self.fine[cells].T
            s[s < s.max(axis=1, keepdims=True) - border] = -np.inf
            all_s = np.concatenate([best_s[who], s], axis=1)
            all_c = np.concatenate([best_c[who], np.broadcast_to(cells, s.shape)], axis=1)
            if all_s.shape[1] > max_cells:
                pick = np.argpartition(-all_s, max_cells - 1, axis=1)[:, :max_cells]
                all_s, all_c = np.take_along_axis(all_s, pick, axis=1), np.take_along_axis(all_c, pick, axis=1)
            best_s[who], best_c[who] = all_s, all_c
        order = np.argsort(-best_s, axis=1, kind="stable")
        best_s, best_c = np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_c, order, axis=1)
        return np.where(np.isfinite(best_s), best_c, -1)


def cell_index(centroids: np.ndarray, coarse: np.ndarray | None = None, points: np.ndarray | None = None,
               target: float = 0.999):
    """What assigns rows to cells, and how well it agrees with exhaustive assignment: exhaustive
    inner products for one level; for two levels a TwoLevel whose nprobe is twice the one at which
    the best cell of the sampled `points` agrees with exhaustive assignment at rate >= `target`
    (copies share their cell, so the sampled rate varies between samples: 0.9989 on one, 0.990
    on another at the same nprobe, bench corpus). Returns (index, info)."""
    import faiss
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    if coarse is None:
        index = faiss.IndexFlatIP(c.shape[1])
        index.add(c)
        return index, {"assign": "flat", "assign_agreement": 1.0}
    index = TwoLevel(c, coarse)
    agreement = None
    if points is not None and len(points):
        q = np.ascontiguousarray(points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12),
                                 dtype=np.float32)
        exact = np.argmax(q @ c.T, axis=1)
        for nprobe in (1, 2, 4, 8, 16, 32, 64, len(coarse)):
            index.nprobe = min(nprobe, len(coarse))
            agreement = float(np.mean(index.search(q, 1)[1][:, 0] == exact))
            if agreement >= target:
                break
        index.nprobe = min(2 * index.nprobe, len(coarse))
        agreement = float(np.mean(index.search(q, 1)[1][:, 0] == exact))
        if 2 * index.nprobe > len(coarse):
            # the coarse level does not prune (CLIP-like 10 M rows: 100 of 100 coarse cells):
            # one exhaustive product is then the faster way
            flat, _ = cell_index(c)
            return flat, {"assign": f"flat (two levels would probe {index.nprobe} of {len(coarse)} coarse cells)",
                          "assign_agreement": 1.0}
    return index, {"assign": f"two-level {len(coarse)} x {len(c) / len(coarse):.0f}", "assign_nprobe": index.nprobe,
                   "assign_agreement": None if agreement is None else round(agreement, 5)}


def assign(z: np.ndarray, cells, border: float, max_cells: int) -> np.ndarray:
    """(n, max_cells) cells of each vector, best first, -1 padded: the best cell, plus the cells
    scoring within `border` of it. `cells`: the centroids (exhaustive), or their cell_index. The
    cells may live in fewer dims than z (search.cell_dim): z's first dims, as they were trained."""
    if isinstance(cells, np.ndarray):              # centroids: exhaustive assignment
        import faiss
        flat = faiss.IndexFlatIP(cells.shape[1])
        flat.add(np.ascontiguousarray(cells, dtype=np.float32))
        cells = flat
    z = z[:, :cells.d]
    zn = np.ascontiguousarray(z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12), dtype=np.float32)
    if isinstance(cells, Nested):                  # search.assign = nested: its own rule, border per coarse cell
        return cells.assign(zn, border, max_cells)
    k = min(max_cells, cells.ntotal)
    score, cell = cells.search(zn, k)
    cell = np.where((score >= score[:, :1] - border) & (cell >= 0), cell, -1)
    out = np.full((len(z), max_cells), -1, np.int64)
    out[:, :k] = cell
    return out


def first_shared_cell(ca: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """Smallest cell present in both rows of two (n, k) cell sets (-1 = none)."""
    big = np.iinfo(np.int64).max
    same = (ca[:, :, None] == cb[:, None, :]) & (ca[:, :, None] >= 0)
    return np.where(same, ca[:, :, None], big).min(axis=(1, 2))


_UPPER: dict[int, np.ndarray] = {}


def _upper(k: int) -> np.ndarray:
    """Strictly upper-triangular k x k mask (cached)."""
    if k not in _UPPER:
        _UPPER[k] = np.triu(np.ones((k, k), dtype=bool), 1)
    return _UPPER[k]


def bound_cell(zr: np.ndarray, threshold: float, chunk: int = 2048, dense: float = 0.002) -> tuple[list, int]:
    """The candidate pairs of one cell by the projected bound alone (no stored vector read), as
    records to re-score with rescore_cell, and how many candidates there are. `zr` is [z, |r|] of
    the cell's rows: one product gives the bound z_i.z_j + |r_i||r_j|. A record is (rows, cols,
    i, j, block): the rows and columns (cell-local) of one chunk that have a candidate, the
    candidate pairs (i < j), and whether that chunk is re-scored as the exact product of its rows
    x columns (`block`: the candidates fill more than `dense` of it; on 2 cores a gathered pair
    costs ~4 us, a GEMM entry ~8 ns: break-even near 0.002) instead of pair by pair. Rows and
    columns without a candidate are never read."""
    out = []
    n_cand = 0
    n = len(zr)
    # row chunks against the columns from the chunk on: about a quarter of a cell per chunk, so
    # the products cover 5/8 of the square instead of all of it (i < j is all that is wanted)
    upper = _upper(chunk)               # one cached mask: its top-left corners are the smaller ones
    chunk = min(chunk, max(256, -(-n // 4)))
    for s in range(0, n, chunk):
        k = min(chunk, n - s)
        hit = zr[s:s + chunk] @ zr[s:].T >= threshold
        hit[:, :k] &= upper[:k, :k]                                      # keep i < j only
        count = int(np.count_nonzero(hit))
        n_cand += count
        if not count:
            continue
        rows = np.nonzero(hit.any(axis=1))[0]
        cols = np.nonzero(hit.any(axis=0))[0]
        block = count > dense * len(rows) * len(cols)
        i, j = (None, None) if block else np.nonzero(hit)
        out.append((rows + s, cols + s, None if block else i + s, None if block else j + s, block))
    return out, n_cand


def needed_rows(records: list) -> np.ndarray:
    """The cell-local rows bound_cell's records re-score (sorted, unique)."""
    if not records:
        return np.zeros(0, np.int64)
    return np.unique(np.concatenate([np.r_[r[0], r[1]] for r in records]))


def rescore_cell(records: list, x, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs of bound_cell's records with exact cosine >= threshold: (i, j, cosine), i < j.
    `x[rows]` gives the float32 vectors of cell-local rows (an array, or anything indexed so:
    join_members maps the cell's rows to the block's vectors read so far)."""
    out_i, out_j, out_s = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for rows, cols, i, j, block in records:
        if block:                                   # exact products of the candidate rows x columns only
            exact = x[rows] @ x[cols].T
            # exact >= threshold implies the bound passed (it is an upper bound): only i < j is left
            keep = exact >= threshold
            keep &= cols[None, :] > rows[:, None]
            flat = np.flatnonzero(keep)             # flat indices: 4x faster than 2-D nonzero + gather
            ii = flat // len(cols)
            i, j, sim = rows[ii], cols[flat - ii * len(cols)], exact.ravel()[flat]
        else:
            sim = np.einsum("ij,ij->i", x[i], x[j])
            keep = sim >= threshold
            i, j, sim = i[keep], j[keep], sim[keep]
        out_i.append(i); out_j.append(j); out_s.append(sim.astype(np.float32))
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


def join_cell(x: np.ndarray, zr: np.ndarray, threshold: float, chunk: int = 2048,
              dense: float = 0.002, idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Pairs (i < j, local indices) of one cell with exact cosine >= threshold, their cosines,
    and how many candidates passed the bound: bound_cell, then rescore_cell. The cell's vectors
    are x, or x[idx] with `idx` (only the rows with a candidate are then read)."""
    records, n_cand = bound_cell(zr, threshold, chunk, dense)
    need = needed_rows(records)
    local = _Local(need, x[need if idx is None else idx[need]])
    i, j, sim = rescore_cell(records, local, threshold)
    return i, j, sim, n_cand


class _Local:
    """Rows `need` (sorted) of a cell or block as one float32 array (or Vectors: float32 rows as
    they are indexed), indexed by their own numbers."""

    def __init__(self, need: np.ndarray, x):
        self.x = x if isinstance(x, Vectors) else np.asarray(x, dtype=np.float32)
        self.pos = np.zeros(int(need[-1]) + 1 if len(need) else 0, np.int64)
        self.pos[need] = np.arange(len(need))

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return self.x[self.pos[rows]]


DENSE_NEIGHBOURS = 32   # a cell whose probed rows average this many neighbours is joined as components


def _probe(n: int, probe: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(n, min(probe, n), replace=False)


def sparse_by_bound(zr: np.ndarray, threshold: float, probe: int = 64, seed: int = 0) -> bool:
    """is_dense's first look, from the projected bound alone (no vector read): True where the
    bound, an upper bound of the exact count, already finds the cell sparse."""
    pick = _probe(len(zr), probe, seed)
    return float(np.mean(np.count_nonzero(zr[pick] @ zr.T >= threshold, axis=1))) - 1 < DENSE_NEIGHBOURS


def is_dense(x: np.ndarray, threshold: float, probe: int = 64, seed: int = 0, zr: np.ndarray | None = None) -> bool:
    """Whether a cell is dense: `probe` of its rows (seeded) average DENSE_NEIGHBOURS or more rows
    at or above the threshold (exact products: probe x rows). Plain cells keep every pair and
    their near misses; a cell full of copies of one image is joined by join_cell_dense.
    With `zr` ([z, |r|], see join_cell) the probe is first counted with the projected bound, an
    upper bound of the exact count: a cell it already finds sparse is sparse (a sixth of the work)."""
    if zr is not None and sparse_by_bound(zr, threshold, probe, seed):
        return False
    pick = _probe(len(x), probe, seed)
    return float(np.mean(np.count_nonzero(x[pick] @ x.T >= threshold, axis=1))) - 1 >= DENSE_NEIGHBOURS


def join_cell_dense(x: np.ndarray, zr: np.ndarray, threshold: float, round_size: int = 64, min_ball: int = 16,
                    budget: int = 1 << 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The edges (i, j local, i < j) of a spanning forest of one cell's threshold graph (exact
    cosine >= threshold), their cosines, and how many products were computed or bounded.

    1. Leader rounds: `round_size` rows not yet in a ball (seeded draw) get their exact cosine to
       every row; taken in order of how many free rows they reach, a free candidate becomes a
       leader and its free neighbours its ball. Every edge of every candidate goes through the
       union-find, keeping those that join two components (so every edge at a candidate is
       accounted for). Rounds stop when a round's new ball members average below `min_ball`.
    2. The pairs not yet accounted for (neither row a candidate) matter only between different
       components: rows sorted by component, a component of `round_size` rows or more is bounded
       with the projected bound against the rows after it (never against itself: its own pairs
       cannot join anything), a run of smaller ones against itself and the rows after it, in
       chunks of `budget` products, and
       the survivors in different components are re-scored exactly; joining edges are kept.
    Exact: an edge (a, b) either has a candidate end (seen in 1) or is bounded in 2 unless a and
    b were already connected."""
    from .unionfind import UnionFind
    n = len(x)
    uf = UnionFind(n)
    ball = np.zeros(n, bool)
    seen = np.zeros(n, bool)                  # candidates: every edge at them is accounted for
    out_i, out_j, out_s = [], [], []
    n_work = 0
    rng = np.random.default_rng(seed)

    def keep_forest(a, b, sim):
        k = uf.forest(a, b)
        if k.any():
            out_i.append(np.minimum(a[k], b[k])); out_j.append(np.maximum(a[k], b[k])); out_s.append(sim[k])

    while True:
        free = np.flatnonzero(~ball)
        if not len(free):
            break
        cand = free if len(free) <= round_size else np.sort(rng.choice(free, round_size, replace=False))
        sims = x[cand] @ x.T
        n_work += sims.size
        hits = sims >= threshold
        reach = (hits & ~ball[None, :]).sum(axis=1)
        new = 0
        for c in np.argsort(-reach, kind="stable"):
            lead = cand[c]
            ys = np.flatnonzero(hits[c])
            ys = ys[ys != lead]
            if not ball[lead]:                  # a leader: its free neighbours are its ball
                fresh = ys[~ball[ys]]
                ball[fresh] = True
                ball[lead] = True
                new += len(fresh)
            keep_forest(np.full(len(ys), lead, np.int64), ys, sims[c, ys])
        seen[cand] = True
        if new < min_ball * len(cand):
            break

    rest = np.flatnonzero(~seen)
    lab = uf.find(rest)
    order = np.lexsort((rest, lab))
    rest, lab = rest[order], lab[order]
    starts = np.r_[0, np.nonzero(lab[1:] != lab[:-1])[0] + 1] if len(rest) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(rest)]
    seg = 2048
    ci = 0
    while ci < len(starts):
        p = starts[ci]
        if ends[ci] - p >= round_size:          # a big component: against the rows after it
            q, c0 = ends[ci], ends[ci]
            ci += 1
        else:                                   # a run of small components: against itself and after
            cj = ci
            while cj + 1 < len(starts) and ends[cj + 1] - starts[cj + 1] < round_size and ends[cj + 1] - p <= seg:
                cj += 1
            q, c0 = ends[cj], p
            ci = cj + 1
        cols = rest[c0:]
        step = max(1, budget // max(len(cols), 1))
        for r0 in range(p, q, step):
            r1 = min(r0 + step, q)
            hit = zr[rest[r0:r1]] @ zr[cols].T >= threshold
            n_work += hit.size
            ii, jj = np.nonzero(hit)
            ok = (c0 + jj) > (r0 + ii)          # each pair once (by position in `rest`)
            a, b = rest[r0 + ii[ok]], cols[jj[ok]]
            ok = uf.find(a) != uf.find(b)        # only pairs that could still join components
            a, b = a[ok], b[ok]
            sim = np.empty(len(a), np.float32)
            for g in range(0, len(a), 1 << 16):
                sim[g:g + (1 << 16)] = np.einsum("ij,ij->i", x[a[g:g + (1 << 16)]], x[b[g:g + (1 << 16)]])
            ok = sim >= threshold
            keep_forest(a[ok], b[ok], sim[ok])
    if not out_i:
        e = np.zeros(0, np.int64)
        return e, e, np.zeros(0, np.float32), n_work
    return (np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s).astype(np.float32), n_work)


def join_cell_torch(x, zr, threshold: float, chunk: int = 8192):
    """join_cell on torch tensors (a CUDA device when there is one): the same pairs, exact fp32
    products (TF32 off), dense blocks only — a GPU multiplies faster than it gathers."""
    import torch
    out_i, out_j, out_s = [], [], []
    n_cand = 0
    n = zr.shape[0]
    for s in range(0, n, chunk):
        rows = torch.arange(s, min(s + chunk, n), device=zr.device)[:, None]
        cols = torch.arange(s, n, device=zr.device)[None, :]
        hit = (zr[s:s + chunk] @ zr[s:].T >= threshold) & (cols > rows)
        count = int(hit.sum())
        n_cand += count
        if not count:
            continue
        r = torch.nonzero(hit.any(dim=1), as_tuple=True)[0]
        c = torch.nonzero(hit.any(dim=0), as_tuple=True)[0]
        exact = x[s + r] @ x[s + c].T               # candidate rows x columns only
        ii, jj = torch.nonzero(hit[r][:, c] & (exact >= threshold), as_tuple=True)
        out_i.append(r[ii] + s); out_j.append(c[jj] + s); out_s.append(exact[ii, jj])
    if not out_i:
        e = np.zeros(0, np.int64)
        return e, e, np.zeros(0, np.float32), n_cand
    cat = lambda t: torch.cat(t).cpu().numpy()  # noqa: E731
    return cat(out_i).astype(np.int64), cat(out_j).astype(np.int64), cat(out_s).astype(np.float32), n_cand


RESCORE_PAIRS = 1 << 22   # candidate pairs a join holds before it reads their rows and re-scores them


def join_members(gids: np.ndarray, cellsets: np.ndarray, x, proj: np.ndarray,
                 threshold: float, cells: tuple[int, int] | None = None,
                 device: str | None = None, dense_min: int = 0,
                 edge_threshold: float | None = None,
                 stats: dict | None = None, zr: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """All verified pairs (gid_a < gid_b, cosine) among vectors `x` (one row per gid: float32, or
    Vectors, or anything whose `x[idx]` gives the float32 rows idx: rows read on demand) whose cell
    sets are `cellsets` (n, k), joining the cells in [lo, hi) (default: all), and how many
    candidate pairs passed the bound. A pair sharing several cells is emitted only by the
    smallest one, so every pair appears exactly once across all blocks. `device` ("cpu", "cuda")
    runs the products with torch there; None uses numpy.
    `zr`: the rows' [z, |r|] (project_zr) where the caller has them (the search's assign step
    writes them); then x is read only for the rows of candidate pairs (about a third of a
    block's rows at 10 M rows), in one read per RESCORE_PAIRS candidates, sorted by row.
    A cell of `dense_min` rows or more (0: none) gives the edges of a spanning forest of its graph
    at `edge_threshold` instead (join_cell_dense, numpy): the same components, O(rows) edges. Its
    work is not a candidate count: `stats` (a dict, where given) gets `dense_cells` and
    `dense_products` (the products those cells computed or bounded) added."""
    cellsets = np.asarray(cellsets, dtype=np.int64).reshape(len(gids), -1)
    lo, hi = cells if cells is not None else (0, int(cellsets.max()) + 1)
    multi = (cellsets >= 0).sum(axis=1) > 1
    ascending = bool(np.all(gids[1:] > gids[:-1]))
    member, col = np.nonzero((cellsets >= lo) & (cellsets < hi))
    cell_of = cellsets[member, col]
    order = np.lexsort((member, cell_of))
    member, cell_of = member[order], cell_of[order]
    if zr is None:
        zr = x.project_zr(proj) if isinstance(x, Vectors) else project_zr(x, proj)
    xs = x
    if device:
        import torch
        torch.backends.cuda.matmul.allow_tf32 = False
        x = x[np.arange(len(x))] if not isinstance(x, np.ndarray) else x
        xs, zr = (torch.from_numpy(np.ascontiguousarray(v)).to(device) for v in (x, zr))
    starts = np.r_[0, np.nonzero(cell_of[1:] != cell_of[:-1])[0] + 1, len(cell_of)]
    a, b, s = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    n_cand = 0
    zr_np = zr if device is None else None
    pending, held = [], 0           # bounded cells waiting for their rows: (cell, members, records)

    def emit(cell: int, i: np.ndarray, j: np.ndarray, sim: np.ndarray) -> None:
        # a pair shares only this cell unless both rows have several; check those alone
        both = np.nonzero(multi[i] & multi[j])[0]
        if len(both):
            mine = np.ones(len(i), bool)
            mine[both] = first_shared_cell(cellsets[i[both]], cellsets[j[both]]) == cell
            i, j, sim = i[mine], j[mine], sim[mine]
        ga, gb = gids[i], gids[j]
        if not ascending:           # i < j already orders the pair when gids ascend with the rows
            ga, gb = np.minimum(ga, gb), np.maximum(ga, gb)
        a.append(ga); b.append(gb); s.append(sim)

    def rescore_pending() -> None:
        rows = np.unique(np.concatenate([m[needed_rows(rec)] for _, m, rec in pending]))
        # one read of every row a held candidate needs, held as stored (fp16: half the memory a
        # block touches; a cell's rows are converted as it is re-scored, bit for bit get's rows)
        block = _Local(rows, Vectors(*x.raw(rows)) if isinstance(x, Rows) else x[rows])
        for cell, m, rec in pending:
            i, j, sim = rescore_cell(rec, _Mapped(block, m), threshold)
            emit(cell, m[i], m[j], sim)
        pending.clear()

    for c0, c1 in zip(starts[:-1], starts[1:]):
        if c1 - c0 < 2:
            continue
        m = member[c0:c1]
        t_edge = threshold if edge_threshold is None else edge_threshold
        big = dense_min and c1 - c0 >= dense_min
        if big and device is None and sparse_by_bound(zr[m], t_edge, seed=int(cell_of[c0])):
            big = False                     # sparse by the bound alone: joined as any cell, nothing read yet
        xm = np.ascontiguousarray(x[m], dtype=np.float32) if big else None
        if xm is not None and is_dense(xm, t_edge, seed=int(cell_of[c0]), zr=None):
            if zr_np is None:
                zr_np = zr.cpu().numpy()
            i, j, sim, work = join_cell_dense(xm, zr_np[m], t_edge, seed=int(cell_of[c0]))
            if stats is not None:
                stats["dense_cells"] = stats.get("dense_cells", 0) + 1
                stats["dense_products"] = stats.get("dense_products", 0) + work
            emit(int(cell_of[c0]), m[i], m[j], sim)
        elif xm is not None and device is None:     # read for the exact look: joined with those rows
            i, j, sim, n = join_cell(xm, zr[m], threshold)
            n_cand += n
            emit(int(cell_of[c0]), m[i], m[j], sim)
        elif device is None:
            rec, n = bound_cell(zr[m], threshold)
            n_cand += n
            if rec:
                pending.append((int(cell_of[c0]), m, rec))
                held += n
            if held >= RESCORE_PAIRS:
                rescore_pending()
                held = 0
        else:
            mi = torch.from_numpy(m).to(device)
            i, j, sim, n = join_cell_torch(xs[mi], zr[mi], threshold)
            n_cand += n
            emit(int(cell_of[c0]), m[i], m[j], sim)
    if pending:
        rescore_pending()
    return np.concatenate(a), np.concatenate(b), np.concatenate(s), n_cand


class _Mapped:
    """A cell's rows (cell-local numbers) looked up in a block's _Local rows through the cell's members."""

    def __init__(self, block: _Local, members: np.ndarray):
        self.block, self.members = block, members

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return self.block[self.members[rows]]
