"""Groups of thousands of near copies: the dense join and the spanning-forest output give exactly
the connected components of the threshold graph (brute force), with O(rows) edges."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.corpora import write_clip_like
from dedup2b.core.config import from_dict
from dedup2b.core.executor import LocalExecutor
from dedup2b.driver import run_stages
from dedup2b.lib import celljoin
from dedup2b.lib.unionfind import UnionFind

T = 0.95


def _unit(v):
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def hard_cell(seed: int, d: int = 64) -> np.ndarray:
    """A cell an adversary would build: a giant group of near copies (not a clique: copies of one
    original, pairs between copies down to ~0.90), a second group of look-alikes of the first
    original just below the threshold, a chain whose steps pass the threshold and whose ends are
    far apart, pairs placed exactly at the threshold's border, and scattered rows."""
    rng = np.random.default_rng(seed)
    o = _unit(rng.standard_normal(d))
    copies = _unit(o + rng.uniform(0.02, 0.32, (3000, 1)) * _unit(rng.standard_normal((3000, d))))
    look = _unit(o + 0.40 * _unit(rng.standard_normal((400, d))))
    v, w = _unit(rng.standard_normal(d)), _unit(rng.standard_normal(d))
    w = _unit(w - (v @ w) * v)
    step = np.arccos(T) * 0.97
    chain = np.stack([np.cos(k * step) * v + np.sin(k * step) * w for k in range(60)])
    base = _unit(rng.standard_normal((80, d)))
    side = _unit(rng.standard_normal((80, d)))
    side = _unit(side - np.sum(side * base, axis=1, keepdims=True) * base)
    eps = rng.choice([-2e-4, 2e-4], 80)[:, None]          # just above or just below the threshold
    border = np.cos(np.arccos(T) + eps) * base + np.sin(np.arccos(T) + eps) * side
    scatter = _unit(rng.standard_normal((500, d)))
    x = np.vstack([copies, look, chain, base, border, scatter]).astype(np.float32)
    return x[rng.permutation(len(x))]


def brute_labels(x: np.ndarray, t: float = T) -> np.ndarray:
    """Components of the exhaustive threshold graph (every product, in row chunks)."""
    def edges():
        for s in range(0, len(x), 2048):
            a, b = np.nonzero(x[s:s + 2048] @ x.T >= t)
            yield a + s, b
    return UnionFind(len(x)).union_stream(edges()).labels()


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return len(set(zip(a.tolist(), b.tolist()))) == len(np.unique(a)) == len(np.unique(b))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_join_is_a_spanning_forest_of_the_exact_graph(seed):
    x = hard_cell(seed)
    z, rn = celljoin.project(x, celljoin.train_projection(x, 16))
    zr = np.hstack([z, rn[:, None]]).astype(np.float32)
    i, j, sim, _ = celljoin.join_cell_dense(x, zr, T, budget=1 << 18, seed=seed)
    ref = brute_labels(x)
    got = UnionFind(len(x)).union_stream([(i, j)]).labels()
    assert np.array_equal(got, ref)                                   # the same components
    assert len(i) == len(x) - len(np.unique(ref))                     # a forest: no redundant edge
    assert np.all(i < j) and np.all(sim >= T)
    assert np.allclose(sim, np.einsum("ij,ij->i", x[i], x[j]), atol=1e-6)
    assert (np.bincount(ref)[ref] >= 3000).sum() >= 3000              # the giant group is one component


def bridged_groups(seed: int, d: int = 64) -> np.ndarray:
    """A cell of medium groups (80 to 600 near copies of one original each: components the
    leader rounds leave for the second step), pairs of them bridged by a chain whose steps pass
    the threshold, and look-alikes just below it."""
    rng = np.random.default_rng(seed)
    origins = _unit(rng.standard_normal((12, d)))
    parts = [_unit(o + rng.uniform(0.02, 0.3, (n, 1)) * _unit(rng.standard_normal((n, d))))
             for o, n in zip(origins, rng.integers(80, 600, len(origins)))]
    step = np.arccos(T) * 0.9
    for a, b in rng.choice(len(origins), (4, 2), replace=False):
        v, w = origins[a], _unit(origins[b] - (origins[a] @ origins[b]) * origins[a])
        end = np.arccos(np.clip(origins[a] @ origins[b], -1, 1))
        parts.append(np.stack([np.cos(t) * v + np.sin(t) * w for t in np.arange(step, end, step)]))
    parts.append(_unit(origins[rng.integers(0, 12, 300)] + 0.36 * _unit(rng.standard_normal((300, d)))))
    x = np.vstack(parts).astype(np.float32)
    return x[rng.permutation(len(x))]


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_join_joins_medium_components_exactly(seed):
    """Components of round_size rows or more are bounded only against the rows after them (not
    against themselves): still exactly the components of the threshold graph."""
    x = bridged_groups(seed)
    z, rn = celljoin.project(x, celljoin.train_projection(x, 16))
    zr = np.hstack([z, rn[:, None]]).astype(np.float32)
    i, j, sim, work = celljoin.join_cell_dense(x, zr, T, round_size=16, min_ball=4, budget=1 << 16, seed=seed)
    ref = brute_labels(x)
    got = UnionFind(len(x)).union_stream([(i, j)]).labels()
    assert np.array_equal(got, ref)
    assert len(i) == len(x) - len(np.unique(ref))
    assert work < len(x) ** 2 / 2                        # not every pair bounded


def test_join_members_dense_and_pairwise_agree():
    """A whole corpus through the cells: dense cells (forest) and every pair give the same components."""
    rng = np.random.default_rng(5)
    x = np.vstack([hard_cell(7), _unit(rng.standard_normal((3000, 64)))]).astype(np.float32)
    gids = np.arange(len(x), dtype=np.int64) + (3 << 32)
    proj = celljoin.train_projection(x, 16)
    z, _ = celljoin.project(x, proj)
    cents, _ = celljoin.train_cells(z, 8, seed=0)
    sets = celljoin.assign(z, cents, 0.01, 3)
    a0, b0, s0, cand0 = celljoin.join_members(gids, sets, x, proj, T)
    work = {}
    a1, b1, s1, cand1 = celljoin.join_members(gids, sets, x, proj, T, dense_min=500, edge_threshold=T, stats=work)
    # a dense cell's products are its work, not candidate pairs: counted apart
    assert work["dense_cells"] >= 1 and work["dense_products"] > 0
    assert cand1 < cand0
    pos = lambda g: g - (3 << 32)                                          # noqa: E731
    every = UnionFind(len(x)).union_stream([(pos(a0), pos(b0))]).labels()
    dense = UnionFind(len(x)).union_stream([(pos(a1), pos(b1))]).labels()
    assert np.array_equal(every, dense)
    assert len(a1) < len(a0) / 20                                          # O(rows), not O(pairs)


@pytest.fixture(scope="module")
def giant_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("giant")
    write_clip_like(root / "emb", 20_000, 96, dup_frac=0.4, seed=3, max_group=300, rows_per_shard=8_000,
                    giant=(4000, 2000))
    return root


def _run(root, name, pairs, cells=1, ex=None):
    """One cell: the join is exhaustive, so the groups can be held against brute force (many cells:
    test_join_members_dense_and_pairwise_agree; what cell borders hide: make bench-search)."""
    cfg = from_dict({"input": {"path": str(root / "emb"), "format": "embeddings"}, "run_dir": str(root / name),
                     "embed": {"model": "precomputed:test"}, "search": {"threshold": T, "pairs": pairs,
                     "dense_cell": 1000, "cells": cells}, "group": {"min_rep_similarity": -1},
                     "export": {"formats": ["keep"]}})
    run_stages(cfg, ex or LocalExecutor(), log=lambda *_: None)
    return cfg


def test_pipeline_groups_equal_brute_force_with_giant_groups(giant_corpus, monkeypatch, ray_executor):
    forest = _run(giant_corpus, "forest", "forest")
    every = _run(giant_corpus, "every", "all")
    sf = pq.read_table(forest.run_path / "report" / "samples.parquet").to_pandas()
    se = pq.read_table(every.run_path / "report" / "samples.parquet").to_pandas()
    assert sf.group_id.equals(se.group_id) and sf.group_size.max() >= 3900   # the planted 4,000 copies
    # the group stage in buckets of 500 rows, Ray tasks (the giant group's bucket holds it whole):
    # the same groups
    from dedup2b.stages import group
    monkeypatch.setattr(group, "BUCKET_ROWS", 500)
    bucketed = _run(giant_corpus, "buckets", "forest", ex=ray_executor)
    sb = pq.read_table(bucketed.run_path / "report" / "samples.parquet").to_pandas()
    assert sb.group_id.equals(sf.group_id) and sb.is_representative.equals(sf.is_representative)
    stats = [json.loads((c.run_path / "stage_stats.json").read_text())["group"] for c in (forest, bucketed)]
    assert stats[0]["buckets"] == 1 and stats[1]["buckets"] >= 10
    assert stats[0]["groups"] == stats[1]["groups"] == sf.group_id.nunique()   # a number, the same
    # against brute force over the stored vectors (fp16, as the pipeline sees them)
    from dedup2b.stages import open_run
    store = open_run(forest).vectors()
    x = store.get(sf.gid.to_numpy())
    assert same_partition(brute_labels(x), sf.group_id.to_numpy())
    # the report's pairs: a spanning forest of every group, not every pair
    pairs = pq.read_table(forest.run_path / "report" / "pairs.parquet")
    n_groups = sf.group_id.nunique()
    assert pairs.num_rows == len(sf) - n_groups
    assert pq.read_table(every.run_path / "report" / "pairs.parquet").num_rows > 20 * pairs.num_rows
