import numpy as np

from pipeline import group


class _Store:
    def __init__(self, vecs):
        self.vecs = vecs

    def get(self, gids):
        return self.vecs[np.asarray(gids)]


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_components_and_representative_rule():
    labels = group.components(5, np.array([0, 3]), np.array([1, 4]))
    assert labels[0] == labels[1] and labels[3] == labels[4] and len(set(labels)) == 3
    rank = np.array([1, 0, 2, 4, 3])                  # lower rank wins
    rep = group.representatives(labels, rank)
    assert rep.tolist() == [1, 1, 2, 4, 4]


def test_exact_edges_link_equal_hashes():
    a, b = group.exact_edges(np.array(["x", "y", "x", "x"], dtype=object))
    assert sorted(zip(a.tolist(), b.tolist())) == [(0, 2), (0, 3)]


def test_chaining_guard_splits_a_chain():
    # a chain of 6 vectors rotating by ~17 degrees per step: neighbours at cos 0.956, ends far apart
    ang = np.radians(17) * np.arange(6)
    vecs = _unit(np.stack([np.cos(ang), np.sin(ang), np.zeros(6)], 1))
    gids = np.arange(6)
    a, b = np.arange(5), np.arange(1, 6)
    rank = np.arange(6)                              # node 0 is the preferred representative
    rep, sim = group.group(gids, rank, a, b, _Store(vecs), guard=0.0)
    assert len(set(rep.tolist())) == 1               # no guard: one chained component
    rep, sim = group.group(gids, rank, a, b, _Store(vecs), guard=0.9)
    assert len(set(rep.tolist())) > 1
    assert np.all(sim >= 0.9)                        # every member close to its representative
    assert rep[0] == 0 and rep[1] == 0
