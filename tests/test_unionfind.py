"""Union-find over edge chunks: the components of scipy's connected_components, and a spanning
forest of n - components edges, on chains (deep trees) and random graphs, in many small chunks."""
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dedup2b.lib.unionfind import UnionFind


def _truth(n, a, b):
    g = coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    k, lab = connected_components(g, directed=False)
    return k, lab


def _same_partition(x, y):
    # a bijection between labels: pairs (x, y) determine each other
    pairs = np.unique(np.stack([x, y], axis=1), axis=0)
    return len(pairs) == len(np.unique(x)) == len(np.unique(y))


def test_components_and_forest_match_scipy_in_small_chunks():
    rng = np.random.default_rng(0)
    n = 20000
    chain = np.arange(5000)
    rng.shuffle(chain)                                     # one long chain, hooked out of order
    a = np.concatenate([chain[:-1], rng.integers(5000, n, 12000)])
    b = np.concatenate([chain[1:], rng.integers(5000, n, 12000)])
    order = rng.permutation(len(a))
    a, b = a[order], b[order]
    k, lab = _truth(n, a, b)
    uf, kept = UnionFind(n), 0
    for s in range(0, len(a), 700):                        # many chunks: partial compressions
        keep = uf.forest(a[s:s + 700], b[s:s + 700])
        kept += int(keep.sum())
    labels = uf.labels()
    assert _same_partition(labels, lab)
    assert kept == n - k                                   # a spanning forest: no cycle kept
    uf2 = UnionFind(n).union_stream((a[s:s + 333], b[s:s + 333]) for s in range(0, len(a), 333))
    assert np.array_equal(uf2.labels(), labels)
    assert np.all(labels <= np.arange(n)) and np.all(labels[labels] == labels)   # roots: smallest members
