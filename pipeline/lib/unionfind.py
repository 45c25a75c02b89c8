"""Exact connected components over edges that arrive in chunks (streamed from parquet), and the
spanning forest that proves them.

Memory: one int64 parent per node (8 bytes) plus the current edge chunk. Every operation is a
numpy array operation: no Python loop per edge. Parents always point to a smaller node index,
so no cycle can form; the root of a component is its smallest node index.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ..core.arrays import unique


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)
        self._hooks = 0         # roots hooked since the last whole-array compression

    def find(self, x: np.ndarray) -> np.ndarray:
        r = self.parent[x]
        while True:
            rr = self.parent[r]
            if np.array_equal(rr, r):
                return r
            r = rr

    def compress(self) -> None:
        """Every node pointed at its root, in place a slice at a time (whole-array pointer jumping
        held two more copies of the array: 160 MB at 10 M nodes)."""
        p = self.parent
        for i in range(0, len(p), 1 << 20):
            s = p[i:i + (1 << 20)]            # a view: updated in place
            while True:
                ps = p[s]
                if np.array_equal(ps, s):
                    break
                s[:] = ps
        self._hooks = 0

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Merge the components of every pair (a[i], b[i])."""
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        touched = np.concatenate([a, b])
        while len(a):
            ra, rb = self.find(a), self.find(b)
            diff = ra != rb
            ra, rb = ra[diff], rb[diff]
            if not len(ra):
                break
            lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
            np.minimum.at(self.parent, hi, lo)   # hook each root under its smallest proposal
            self._hooks += len(hi)
            a, b = lo, hi                        # pairs whose hook lost to another proposal retry
        # the paths of the nodes this call saw point at their roots now; the whole array is
        # compressed once the hooks since the last time reach a quarter of the nodes (a pass over
        # every node per call made the group stage's union-find O(nodes x chunks): 82 of its 170 s
        # at 10 M rows)
        if self._hooks * 4 >= len(self.parent):
            self.compress()
        elif len(touched):
            self.parent[touched] = self.find(touched)

    def union_stream(self, chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> "UnionFind":
        for a, b in chunks:
            self.union(a, b)
        return self

    def forest(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Merge the components of the pairs, keeping a spanning forest: a mask of the edges that
        joined two components (none closes a cycle). Vectorised Boruvka rounds: each component
        takes its incident live edge of smallest index; those edges are acyclic (distinct weights),
        their components merge, and the rest is filtered again (at most log2(n) rounds)."""
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        keep = np.zeros(len(a), bool)
        idx = np.arange(len(a))
        while len(idx):
            ra, rb = self.find(a[idx]), self.find(b[idx])
            live = ra != rb
            idx, ra, rb = idx[live], ra[live], rb[live]
            if not len(idx):
                break
            roots = np.concatenate([ra, rb])
            edge = np.concatenate([idx, idx])
            order = np.lexsort((edge, roots))
            first = np.ones(len(order), bool)
            first[1:] = roots[order][1:] != roots[order][:-1]
            picked = unique(edge[order][first])
            keep[picked] = True
            self.union(a[picked], b[picked])
        return keep

    def labels(self) -> np.ndarray:
        """Component label of every node: its component's smallest node index."""
        self.compress()
        return self.parent


def exact_edges(sha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(head, copy) index pairs: every row whose hash equals an earlier row's, linked to the first
    such row (stable: "first" follows the input order). Used to group exact copies and to embed
    each distinct image once."""
    if not len(sha):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(sha, kind="stable")
    s = sha[order]
    start = np.r_[0, np.nonzero(s[1:] != s[:-1])[0] + 1]
    head = np.repeat(order[start], np.diff(np.r_[start, len(s)]))
    keep = head != order
    return head[keep], order[keep]
