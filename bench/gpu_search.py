"""GPU search benchmark: the cell join on 100 M CLIP-like 768-d vectors on one GPU.

    bash bench/gpu_search.sh                                         # the 100 M run (bench/GPU.md)
    python -m bench.gpu_search --rows 200000 --device cpu --queries 200  # same code, small, on CPU

Target (the search issue): the whole search, candidates and exact re-score, over 100 M vectors in
at most 10 minutes on one H200, with pair recall and precision measured against exhaustive search.

100 M x 768 fp16 vectors are 154 GB, more than the GPU, the RAM or the disk hold, so the corpus is
virtual: row i is a deterministic function of (seed, i), computed on the device for any rows in any
order (`Corpus`). Its distribution follows bench.corpora.clip_like: a shared mean direction,
topics in a rank-96 subspace whose members sit at cosine ~0.8-0.93 (the hard negatives), a little
full-rank noise, and Zipf duplicate groups (most 1-3 copies, the largest capped at --max-group)
whose copies sit at cosine ~0.97-0.999 from their source. Vectors are rounded to fp16, as the
pipeline stores them; a pair's cosine is the fp32 dot product of the stored vectors.

Phases, each timed on its own (the device is synchronised at phase ends):
  generate    one pass producing every row: what reading the stored vectors once costs here
  train       the pipeline's projection (celljoin.train_projection, r = 128) and spherical
              k-means cells (about sqrt(rows), 64 sample rows a cell) in its first 64 dims
              (search.cell_dim) on a seeded sample, in torch; in two levels as the index stage
              trains them (celljoin.train_cells: sqrt(cells) coarse cells, fine cells inside each)
  assign      every row regenerated and projected: z and |residual| kept as fp16 on the device,
              its cells by the search's rule (search.assign, its defaults: nested, the coarse
              cells within `coarse_delta` of the best and in each the fine cells within `border`
              of that one's best, at most `max_cells`; celljoin.Nested, tested equal); --assign
              flat: the best cell plus the cells within `border` of it
  join        per cell: the bound z_a.z_b + |r_a||r_b| >= threshold - slack as one fp16 product,
              the candidates' vectors regenerated and re-scored exactly in fp32, each pair kept by
              the smallest cell both rows share. Pairs stay on the device: they are counted, and
              those touching a sampled query are kept for scoring
Then the exhaustive check: the sampled queries' exact cosines against every row (fp32, the
truth), timed without the regeneration and extrapolated to all rows as queries; the same product
in fp16 on tensor cores gives a faster, still exhaustive, reference. Recall and precision count
pairs from the query's side, as bench/search.py does.

Prints a table; writes the numbers as JSON to --json (default $OUT/gpu_search.json when OUT is
set) and, with --save, to bench/results/gpu_search.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dedup2b.core.config import SearchConfig
from dedup2b.lib.celljoin import train_projection
from bench.corpora import group_owners

RESULTS = Path(__file__).parent / "results"
SEARCH = SearchConfig()            # the search's defaults: the assignment's rule and its settings
_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    c &= _MASK64
    return c - (1 << 64) if c >> 63 else c


_C1, _C2 = _signed(0xFF51AFD7ED558CCD), _signed(0xC4CEB9FE1A85EC53)
_GOLDEN = _signed(0x9E3779B97F4A7C15)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch shifts arithmetically)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit finaliser (xor-shift-multiply, a bijection with full avalanche) on int64 tensors;
    multiplication wraps, so the bits are those of the unsigned arithmetic."""
    x = x ^ _shr(x, 33)
    x = x * _C1
    x = x ^ _shr(x, 33)
    x = x * _C2
    return x ^ _shr(x, 33)


def _mix64_reference(x: int) -> int:
    """mix64 in Python integers, to check the tensor version's wrapping on the device."""
    x &= _MASK64
    for c in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        x = ((x ^ (x >> 33)) * c) & _MASK64
    return x ^ (x >> 33)


def check_mix64(device: torch.device) -> None:
    xs = [0, 1, 12345, (1 << 63) - 1, -1, -(1 << 63), _GOLDEN]
    got = mix64(torch.tensor(xs, dtype=torch.int64, device=device)).tolist()
    want = [_signed(_mix64_reference(x)) for x in xs]
    if got != want:
        raise RuntimeError(f"int64 arithmetic on {device} does not wrap as expected: {got} != {want}")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


class Corpus:
    """n virtual CLIP-like unit vectors (fp16), row i a function of (seed, i) alone.

    Rows [0, n_src) are sources, rows [n_src, n) duplicates of `owner[i - n_src]`. A source is
    unit(0.9 mean + unit(low) + 0.08 unit(noise)) with low = its topic's centre plus a spread in
    the rank-`rank` topic subspace; a duplicate is unit(source + s unit(noise)), s ~ U(0.03, 0.25)
    (bench.corpora.clip_like's recipe). Per-row draws come from a counter hash of
    (seed, row, slot); the spread and the noise are signed sums of `terms` rows of fixed random
    banks (an embedding bag): gathers and elementwise work, no per-row matrix product, so a row
    comes out the same in any batch (`regeneration_difference` checks). Tables are built once on
    the device: topic centres (n / 40 x d fp32, 5.4 GB at 100 M rows), two banks of `bank` rows,
    the owner of each duplicate (bench.corpora's Zipf draw)."""

    def __init__(self, n: int, d: int, device: torch.device, dup_frac: float = 0.3, rank: int = 96,
                 seed: int = 0, max_group: int = 2000, tail: float = 2.3, bank: int = 4096, terms: int = 8):
        self.n, self.d, self.device, self.terms, self.bank = n, d, device, terms, bank
        self.n_src = max(1, int(n * (1 - dup_frac)))
        self.n_topics = max(1, self.n_src // 40)
        self.key = _signed(seed * _GOLDEN + 1)
        g = torch.Generator(device=device).manual_seed(seed)
        rank = min(rank, d)
        basis = torch.linalg.qr(torch.randn(d, rank, generator=g, device=device))[0].T   # rank x d
        self.mean = _unit(torch.randn(d, generator=g, device=device))
        topics = torch.randn(self.n_topics, rank, generator=g, device=device) @ basis
        spread = torch.randn(bank, rank, generator=g, device=device) @ basis
        self.low_table = torch.cat([topics, spread])          # bag rows: topic centres, then spreads
        del topics
        self.noise_bank = _unit(torch.randn(bank, d, generator=g, device=device))
        owners = group_owners(np.random.default_rng(seed), self.n_src, n - self.n_src, max_group, tail)
        self.owner = torch.from_numpy(owners).to(device)

    def _draws(self, ids: torch.Tensor, first: int, count: int) -> torch.Tensor:
        """(len(ids), count) int64 hashes of slots first..first+count-1 of each row."""
        slots = torch.arange(first, first + count, device=ids.device, dtype=torch.int64) * _GOLDEN
        return mix64(mix64(ids[:, None] + self.key) + slots)

    def _bag(self, table: torch.Tensor, h: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Signed sum of `table` rows offset + (h mod bank), sign from bit 39 of h, / sqrt(terms)."""
        sign = (1 - 2 * (_shr(h, 39) & 1)).to(table.dtype) / math.sqrt(h.shape[1])
        return F.embedding_bag(offset + (h & (self.bank - 1)), table, per_sample_weights=sign, mode="sum")

    def _sources(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.terms
        h = self._draws(ids, 0, 1 + 2 * t)
        topic = _shr(h[:, 0], 16) % self.n_topics
        low = self.low_table[topic] + 0.55 * self._bag(self.low_table, h[:, 1:1 + t], self.n_topics)
        noise = self._bag(self.noise_bank, h[:, 1 + t:])
        return _unit(0.9 * self.mean + _unit(low) + 0.08 * _unit(noise))

    def _duplicates(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.terms
        src = self._sources(self.owner[ids - self.n_src])
        h = self._draws(ids, 1 + 2 * t, 1 + t)
        scale = 0.03 + 0.22 * (_shr(h[:, :1], 40).to(torch.float32) / 2 ** 24)
        return _unit(src + scale * _unit(self._bag(self.noise_bank, h[:, 1:])))

    def vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """The stored (fp16) vectors of rows `ids` (int64, on the device)."""
        out = torch.empty((len(ids), self.d), dtype=torch.float16, device=ids.device)
        dup = ids >= self.n_src
        s, u = torch.nonzero(~dup, as_tuple=True)[0], torch.nonzero(dup, as_tuple=True)[0]
        if len(s):
            out[s] = self._sources(ids[s]).half()
        if len(u):
            out[u] = self._duplicates(ids[u]).half()
        return out


class Clock:
    """Phase wall times (device synchronised at both ends) and the device time of spans inside
    them (regeneration, products), from CUDA events on a GPU, else the wall clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: dict[str, list] = {}
        self.phases: dict[str, float] = {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def phase(self, name: str):
        self.sync()
        t0 = time.perf_counter()
        yield
        self.sync()
        self.phases[name] = time.perf_counter() - t0
        print(f"   {name}: {self.phases[name]:.1f} s", flush=True)

    @contextmanager
    def span(self, name: str):
        if self.cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            yield
            e1.record()
            self.spans.setdefault(name, []).append((e0, e1))
        else:
            t0 = time.perf_counter()
            yield
            self.spans.setdefault(name, []).append(time.perf_counter() - t0)

    def total(self, name: str) -> float:
        self.sync()
        got = self.spans.get(name, [])
        return sum(e0.elapsed_time(e1) / 1000 for e0, e1 in got) if self.cuda else sum(got)


def ranges(n: int, chunk: int, device: torch.device):
    """Row id tensors [lo, lo + chunk) covering 0..n-1."""
    for lo in range(0, n, chunk):
        yield torch.arange(lo, min(lo + chunk, n), device=device, dtype=torch.int64)


def generate_all(corpus: Corpus, clock: Clock, chunk: int) -> float:
    """One pass producing every row; returns a checksum so the work cannot be skipped."""
    acc = torch.zeros((), dtype=torch.float64, device=corpus.device)
    for ids in ranges(corpus.n, chunk, corpus.device):
        with clock.span("generate"):
            acc += corpus.vectors(ids)[:, 0].double().sum()
    return float(acc)


def spherical_kmeans(x: torch.Tensor, k: int, niter: int, seed: int, chunk: int = 65536) -> torch.Tensor:
    """(k, dim) unit centroids of unit rows x: seeded random rows to start, then `niter` rounds of
    best-centroid assignment and normalised means; a centroid left empty keeps its place."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    cent = x[torch.randperm(len(x), generator=g, device=x.device)[:k]].clone()
    for _ in range(niter):
        total = torch.zeros_like(cent)
        for lo in range(0, len(x), chunk):
            part = x[lo:lo + chunk]
            total.index_add_(0, (part @ cent.T).argmax(dim=1), part)
        norm = total.norm(dim=1, keepdim=True)
        cent = torch.where(norm > 0, total / norm.clamp_min(1e-12), cent)
    return cent


def two_level_kmeans(z: torch.Tensor, k: int, niter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """celljoin.train_cells(two_levels=True) in torch: sqrt(k) coarse centroids, then each coarse
    cell's rows split into fine cells in proportion to its share. Returns (fine centroids, each
    one's coarse cell, the coarse centroids that own a fine one), the owner being the fine
    centroid's best coarse centroid, as celljoin.Nested takes it."""
    coarse = spherical_kmeans(z, max(1, int(round(math.sqrt(k)))), niter, seed)
    owner = (z @ coarse.T).argmax(dim=1)
    counts = torch.bincount(owner, minlength=len(coarse))
    fine = []
    for c in torch.nonzero(counts, as_tuple=True)[0].tolist():
        pts = z[owner == c]
        share = max(1, round(k * int(counts[c]) / len(z)))
        fine.append(spherical_kmeans(pts, min(share, len(pts)), niter, seed + c))
    fine = torch.cat(fine)
    owner = (fine @ coarse.T).argmax(dim=1)
    kept, owner = torch.unique(owner, return_inverse=True)
    return fine, owner, coarse[kept]


def train(corpus: Corpus, n_cells: int, rank: int, seed: int, chunk: int, niter: int = 10,
          projection_rows: int = 200_000, cell_dim: int = 64, nested: bool = True):
    """(projection r x d, centroids, (fine cells' coarse cell, coarse centroids) or None) from a
    seeded sample of 64 rows a cell, at least 20,000 (the index stage's rule, without its
    train_size cap); the projection from `projection_rows` of it; the cells in the projection's
    first `cell_dim` dims (search.cell_dim; 0: all), in two levels where `nested`."""
    size = min(corpus.n, max(20_000, 64 * n_cells))
    ids = torch.from_numpy(np.random.default_rng(seed + 1).choice(corpus.n, size, replace=False)).to(corpus.device)
    x = torch.cat([corpus.vectors(ids[lo:lo + chunk]).float() for lo in range(0, size, chunk)])
    proj = torch.from_numpy(train_projection(x[:projection_rows].cpu().numpy(), rank)).to(corpus.device)
    z = _unit((x @ proj.T)[:, :cell_dim or None])
    del x
    if not nested:
        return proj, spherical_kmeans(z, min(n_cells, size), niter, seed), None
    fine, owner, coarse = two_level_kmeans(z, min(n_cells, size), niter, seed)
    return proj, fine, (owner, coarse)


def nested_cells(zn: torch.Tensor, cent: torch.Tensor, levels: tuple, delta: float, border: float,
                 k: int) -> torch.Tensor:
    """celljoin.Nested.assign's rule for unit rows zn: the coarse cells within `delta` of the row's
    best coarse score, in each the fine cells within `border` of that coarse cell's best, the
    best k of those (-1 padded). Computed from every fine cell's score, masked (on a GPU one
    product over all cells is cheaper than gathering per coarse cell); the cells chosen are the
    same."""
    owner, coarse = levels
    cs = zn @ coarse.T
    near = cs >= cs.amax(dim=1, keepdim=True) - delta                       # (b, coarse)
    s = zn @ cent.T                                                           # (b, fine)
    best = torch.full_like(cs, -torch.inf).scatter_reduce(1, owner.expand_as(s), s, "amax")
    ok = near[:, owner] & (s >= best[:, owner] - border)
    score, cell = torch.where(ok, s, -torch.inf).topk(k, dim=1)
    return torch.where(torch.isfinite(score), cell, -1)


def assign_all(corpus: Corpus, proj: torch.Tensor, cent: torch.Tensor, border: float, max_cells: int,
               clock: Clock, chunk: int, max_block: int = 1 << 28, levels: tuple | None = None,
               delta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """zr: (n, width) fp16 rows [z, |residual|, 0 padding] (width a multiple of 8 for the tensor
    cores); cells: (n, max_cells) int32, best first, -1 padded (celljoin.assign's rule: nested
    where `levels` (train's) are given, else the best cell and those within `border` of it).
    Cell scores in blocks of at most `max_block` entries."""
    n, r = corpus.n, proj.shape[0]
    width = -(-(r + 1) // 8) * 8
    zr = torch.zeros((n, width), dtype=torch.float16, device=corpus.device)
    k = min(max_cells, len(cent))
    cells = torch.full((n, max_cells), -1, dtype=torch.int32, device=corpus.device)
    step = max(1, max_block // len(cent))
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        with clock.span("assign regenerate"):
            x = corpus.vectors(torch.arange(lo, hi, device=corpus.device)).float()
        z = x @ proj.T
        zr[lo:hi, :r] = z.half()
        zr[lo:hi, r] = (x - z @ proj).norm(dim=1).half()     # the residual itself: no cancellation
        zn = _unit(z[:, :cent.shape[1]])            # the cells' own dims (search.cell_dim)
        for s in range(0, hi - lo, step):
            if levels is not None:
                got = nested_cells(zn[s:s + step], cent, levels, delta, border, k)
                cells[lo + s:lo + s + len(got), :k] = got.int()
                continue
            score, best = (zn[s:s + step] @ cent.T).topk(k, dim=1)
            cells[lo + s:lo + s + len(score), :k] = torch.where(score >= score[:, :1] - border, best, -1).int()
    return zr, cells


def cell_members(cells: torch.Tensor, n_cells: int) -> tuple[torch.Tensor, list[int]]:
    """Rows of every cell, cell by cell, rows ascending inside a cell; and the cells' offsets."""
    flat = cells.reshape(-1)
    slot = torch.nonzero(flat >= 0, as_tuple=True)[0]
    cell_of = flat[slot]
    order = torch.sort(cell_of, stable=True).indices
    members = slot[order] // cells.shape[1]
    counts = torch.bincount(cell_of.long(), minlength=n_cells)
    return members, [0] + torch.cumsum(counts, 0).tolist()


def first_shared_cell(ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """Smallest cell present in both rows of two (n, k) cell sets (celljoin.first_shared_cell)."""
    same = (ca[:, :, None] == cb[:, None, :]) & (ca[:, :, None] >= 0)
    return torch.where(same, ca[:, :, None], torch.iinfo(ca.dtype).max).amin(dim=(1, 2))


class Join:
    """The join of every cell, on the device. Bound: zr rows as one fp16 product (fp32
    accumulation, reduced-precision reductions off). Each of z, |r| and the product's result is
    rounded once to fp16 (unit roundoff u = 2^-11); as |x| = |y| = 1, the bound moves by at most
    about 3u = 1.5e-3, and the threshold's own fp16 rounding by 0.5e-3: `slack` (0.004) covers both,
    so no pair at or above the threshold is dropped. Exact re-score in fp32 of the regenerated
    vectors: one product of the candidate rows x columns where candidates fill more than `dense` of
    that block (a duplicate group), else row-wise dot products of the candidate pairs."""

    def __init__(self, corpus: Corpus, zr: torch.Tensor, cells: torch.Tensor, threshold: float,
                 slack: float, is_query: torch.Tensor, clock: Clock, max_block: int = 1 << 28,
                 dense: float = 0.02, pair_batch: int = 1 << 16):
        self.corpus, self.zr, self.cells, self.threshold = corpus, zr, cells, threshold
        self.bound = threshold - slack
        self.is_query, self.clock = is_query, clock
        self.max_block, self.dense, self.pair_batch = max_block, dense, pair_batch
        dev = zr.device
        self.candidates = self.bound_entries = self.regenerated = 0
        self.pairs = torch.zeros((), dtype=torch.int64, device=dev)
        self.query_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def cell(self, c: int, m: torch.Tensor) -> None:
        """Every pair of cell c's rows m (ascending) with exact cosine >= threshold, kept where c
        is the smallest cell the pair shares."""
        n = len(m)
        zr = self.zr[m]
        step = max(1, min(n, self.max_block // n))
        for s in range(0, n, step):
            k = min(step, n - s)
            hit = zr[s:s + k] @ zr[s:].T >= self.bound
            self.bound_entries += hit.numel()
            ar = torch.arange(k, device=m.device)
            hit[:, :k] &= ar[:, None] < ar[None, :]                  # i < j only
            i, j = torch.nonzero(hit, as_tuple=True)
            if not len(i):
                continue
            self.candidates += len(i)
            i, j, sim = self._rescore(m[s:], hit, i, j)
            keep = sim >= self.threshold
            a, b = m[s + i[keep]], m[s + j[keep]]
            mine = first_shared_cell(self.cells[a], self.cells[b]) == c
            a, b = a[mine], b[mine]
            self.pairs += len(a)
            q = self.is_query[a] | self.is_query[b]
            self.query_pairs.append((a[q], b[q]))

    def _rescore(self, m: torch.Tensor, hit: torch.Tensor, i: torch.Tensor, j: torch.Tensor):
        """(i, j, exact cosine) of the candidates (i, j) of block `hit` (rows m[:k] x m)."""
        k = hit.shape[0]
        rows, cols = hit.any(dim=1), hit.any(dim=0)
        need = cols.clone()
        need[:k] |= rows
        pos = torch.cumsum(need, 0) - 1                              # local index -> row of x
        rows_needed = m[torch.nonzero(need, as_tuple=True)[0]]
        self.regenerated += len(rows_needed)
        with self.clock.span("join regenerate"):
            x = self.corpus.vectors(rows_needed).float()
        r, c = torch.nonzero(rows, as_tuple=True)[0], torch.nonzero(cols, as_tuple=True)[0]
        if len(i) > self.dense * len(r) * len(c):
            exact = x[pos[r]] @ x[pos[c]].T
            ii, jj = torch.nonzero(hit[r][:, c], as_tuple=True)
            return r[ii], c[jj], exact[ii, jj]
        sim = torch.cat([(x[pos[i[p:p + self.pair_batch]]] * x[pos[j[p:p + self.pair_batch]]]).sum(dim=1)
                         for p in range(0, len(i), self.pair_batch)])
        return i, j, sim


def exhaustive(corpus: Corpus, queries: torch.Tensor, threshold: float, clock: Clock,
               chunk: int) -> torch.Tensor:
    """Codes q * n + row of every (sampled query, other row) pair at cosine >= threshold, by
    exact fp32 products against every row. Spans: the fp32 products, and the same in fp16."""
    xq = corpus.vectors(queries)
    xq32 = xq.float()
    codes = []
    for ids in ranges(corpus.n, chunk, corpus.device):
        with clock.span("exhaustive regenerate"):
            x = corpus.vectors(ids)
        with clock.span("exhaustive fp32"):
            qi, cj = torch.nonzero(xq32 @ x.float().T >= threshold, as_tuple=True)
        with clock.span("exhaustive fp16"):
            torch.count_nonzero(xq @ x.T >= threshold)
        keep = ids[cj] != queries[qi]
        codes.append(queries[qi[keep]] * corpus.n + ids[cj[keep]])
    return torch.cat(codes)


def join_all(corpus: Corpus, zr: torch.Tensor, cells: torch.Tensor, n_cells: int, threshold: float,
             slack: float, is_query: torch.Tensor, clock: Clock) -> dict:
    """Join every cell: pair and candidate counts, cell sizes, and the pairs touching a sampled
    query as codes q * n + other (from each query's side)."""
    members, offsets = cell_members(cells, n_cells)
    join = Join(corpus, zr, cells, threshold, slack, is_query, clock)
    t0 = time.perf_counter()
    for c in range(n_cells):
        if offsets[c + 1] - offsets[c] > 1:
            join.cell(c, members[offsets[c]:offsets[c + 1]])
        if (c + 1) % max(1, n_cells // 10) == 0:
            print(f"      {c + 1:,}/{n_cells:,} cells joined, {int(join.pairs):,} pairs, "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
    a = torch.cat([p[0] for p in join.query_pairs] + [members[:0]])
    b = torch.cat([p[1] for p in join.query_pairs] + [members[:0]])
    n = corpus.n
    codes = torch.cat([a[is_query[a]] * n + b[is_query[a]], b[is_query[b]] * n + a[is_query[b]]])
    return {"pairs": int(join.pairs), "candidates": join.candidates, "bound_entries": join.bound_entries,
            "regenerated_rows": join.regenerated, "cell_sizes": np.diff(offsets), "query_codes": codes}


def score(found: torch.Tensor, truth: torch.Tensor) -> dict:
    f, t = np.unique(found.cpu().numpy()), np.unique(truth.cpu().numpy())
    tp = len(np.intersect1d(f, t, assume_unique=True))
    return {"recall": tp / len(t) if len(t) else 1.0, "precision": tp / len(f) if len(f) else 1.0,
            "true_pairs_sampled": len(t), "found_pairs_sampled": len(f)}


def regeneration_difference(corpus: Corpus, rows: int = 4096) -> float:
    """Largest difference between rows computed alone and inside a larger, shuffled batch: 0 where
    a row's bits do not depend on its batch. Elsewhere (a reduction's order can follow the batch
    size on a GPU) it is fp32 rounding, moving a cosine by about 1e-6 at most: it can only flip a
    pair that close to the threshold, and the bound's slack covers it."""
    g = torch.Generator(device=corpus.device).manual_seed(7)
    ids = torch.randint(0, corpus.n, (rows,), generator=g, device=corpus.device)
    alone = corpus.vectors(ids[: rows // 4])
    perm = torch.randperm(rows, generator=g, device=corpus.device)
    mixed = torch.empty_like(ids)
    mixed[perm] = ids
    inside = corpus.vectors(mixed)[perm[: rows // 4]]
    return float((alone.float() - inside.float()).abs().max())


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def run(args) -> dict:
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False                   # fp32 products stay fp32
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    check_mix64(device)
    chunk = args.chunk or (1 << 18 if device.type == "cuda" else 1 << 16)
    n_cells = args.cells or max(1, int(math.sqrt(args.rows)))
    clock = Clock(device)
    print(f"== {args.rows:,} rows x {args.dim} on {device_name(device)}; {n_cells:,} cells", flush=True)

    t0 = time.perf_counter()
    corpus = Corpus(args.rows, args.dim, device, dup_frac=args.dup_frac, seed=args.seed, max_group=args.max_group)
    clock.sync()
    tables_s = time.perf_counter() - t0
    regen_diff = regeneration_difference(corpus)
    print(f"   tables: {tables_s:.1f} s; a row alone vs inside a batch, largest difference: {regen_diff}", flush=True)
    with clock.phase("generate"):
        generate_all(corpus, clock, chunk)
    with clock.phase("train"):
        proj, cent, levels = train(corpus, n_cells, args.rank, args.seed, chunk, cell_dim=args.cell_dim,
                                   nested=args.assign == "nested")
    with clock.phase("assign"):
        zr, cells = assign_all(corpus, proj, cent, args.border, args.max_cells, clock, chunk, levels=levels,
                               delta=args.coarse_delta)
    rng = np.random.default_rng(args.seed + 2)
    queries = torch.from_numpy(np.sort(rng.choice(args.rows, min(args.queries, args.rows), replace=False))).to(device)
    is_query = torch.zeros(args.rows, dtype=torch.bool, device=device)
    is_query[queries] = True
    with clock.phase("join"):
        joined = join_all(corpus, zr, cells, len(cent), args.threshold, args.slack, is_query, clock)
    del zr
    with clock.phase("exhaustive sample"):
        truth = exhaustive(corpus, queries, args.threshold, clock, chunk)
    got = score(joined["query_codes"], truth)
    sizes = joined["cell_sizes"]

    search_s = sum(clock.phases[p] for p in ("train", "assign", "join"))
    scale = args.rows / len(queries)
    exh32, exh16 = clock.total("exhaustive fp32") * scale, clock.total("exhaustive fp16") * scale
    return {
        "rows": args.rows, "dim": args.dim, "device": device_name(device), "cells": len(cent),
        "rank": args.rank, "cell_dim": int(cent.shape[1]), "threshold": args.threshold, "border": args.border, "max_cells": args.max_cells,
        "assign": args.assign, "coarse_delta": args.coarse_delta,
        "slack": args.slack, "max_group": args.max_group, "dup_frac": args.dup_frac, "seed": args.seed,
        "regeneration_max_difference": regen_diff, "tables_s": round(tables_s, 2),
        "generate_s": round(clock.phases["generate"], 2), "train_s": round(clock.phases["train"], 2),
        "assign_s": round(clock.phases["assign"], 2), "join_s": round(clock.phases["join"], 2),
        "assign_regenerate_s": round(clock.total("assign regenerate"), 2),
        "join_regenerate_s": round(clock.total("join regenerate"), 2),
        "search_s": round(search_s, 2),
        "exhaustive_sample_s": round(clock.phases["exhaustive sample"], 2),
        "exhaustive_regenerate_s": round(clock.total("exhaustive regenerate"), 2),
        "exhaustive_fp32_s": round(exh32, 1), "exhaustive_fp16_s": round(exh16, 1),
        "ratio_vs_exhaustive_fp32": round(search_s / exh32, 6), "ratio_vs_exhaustive_fp16": round(search_s / exh16, 6),
        "queries": len(queries), **got,
        "pairs": joined["pairs"], "candidates": joined["candidates"], "bound_entries": joined["bound_entries"],
        "join_regenerated_rows": joined["regenerated_rows"], "memberships": int(sizes.sum()),
        "memberships_per_row": round(float(sizes.sum()) / args.rows, 3), "largest_cell": int(sizes.max()),
        "peak_memory_gb": round(peak_memory_gb(device), 2), "torch": torch.__version__,
        "command": "python -m bench.gpu_search " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"


def table(r: dict) -> str:
    mem = "GPU" if "CPU" not in r["device"] else "RSS"
    rows = [
        ("rows x dim", f"{r['rows']:,} x {r['dim']} ({r['device']})"),
        ("cells; memberships a row; largest cell", f"{r['cells']:,}; {r['memberships_per_row']}; {r['largest_cell']:,}"),
        ("generate s (one pass over every row)", r["generate_s"]),
        ("train s (projection + k-means)", r["train_s"]),
        ("assign s (of which regenerating)", f"{r['assign_s']} ({r['assign_regenerate_s']})"),
        ("join s (of which regenerating)", f"{r['join_s']} ({r['join_regenerate_s']})"),
        ("search s: train + assign + join (target <= 600)", r["search_s"]),
        ("exhaustive fp32 s, extrapolated", f"{r['exhaustive_fp32_s']:,}"),
        ("ratio to it", f"1/{1 / r['ratio_vs_exhaustive_fp32']:,.0f}"),
        ("exhaustive fp16 products s, extrapolated", f"{r['exhaustive_fp16_s']:,}"),
        ("ratio to it", f"1/{1 / r['ratio_vs_exhaustive_fp16']:,.0f}"),
        ("recall / precision (sampled queries)", f"{r['recall']:.4f} / {r['precision']:.4f}"),
        ("queries; their true pairs", f"{r['queries']:,}; {r['true_pairs_sampled']:,}"),
        ("pairs found; bound candidates", f"{r['pairs']:,}; {r['candidates']:,}"),
        (f"peak {mem} memory GB", r["peak_memory_gb"]),
    ]
    return "\n".join(["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cells", type=int, default=0, help="0: about sqrt(rows), as the index stage")
    ap.add_argument("--rank", type=int, default=128, help="projection rank (search.proj_dim)")
    ap.add_argument("--cell-dim", type=int, default=64, help="dims the cells live in (search.cell_dim; 0: all)")
    ap.add_argument("--assign", choices=("nested", "flat"), default=SEARCH.assign, help="search.assign")
    ap.add_argument("--coarse-delta", type=float, default=SEARCH.coarse_delta, help="search.coarse_delta")
    ap.add_argument("--border", type=float, default=SEARCH.border, help="search.border")
    ap.add_argument("--max-cells", type=int, default=SEARCH.max_cells, help="search.max_cells")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--slack", type=float, default=0.004, help="bound slack for its fp16 rounding")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--max-group", type=int, default=2000, help="largest duplicate group")
    ap.add_argument("--dup-frac", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=0, help="rows a batch; 0: 262144 on a GPU, 65536 on CPU")
    ap.add_argument("--json", default="", help="default: $OUT/gpu_search.json when OUT is set")
    ap.add_argument("--save", action="store_true", help="also write bench/results/gpu_search.json")
    args = ap.parse_args(argv)
    result = run(args)
    print(table(result), flush=True)
    paths = [Path(args.json)] if args.json else ([Path(os.environ["OUT"]) / "gpu_search.json"] if os.environ.get("OUT") else [])
    if args.save:
        paths.append(RESULTS / "gpu_search.json")
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(result, indent=2))
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
