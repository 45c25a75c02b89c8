import numpy as np

from dedup2b.lib.unionfind import exact_edges
from dedup2b.stages import group


class _Store:
    def __init__(self, vecs):
        self.vecs = vecs

    def get(self, gids):
        return self.vecs[np.asarray(gids)]


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_components_and_representative_rule():
    labels = group.components(5, [(np.array([0, 3]), np.array([1, 4]))])
    assert labels[0] == labels[1] and labels[3] == labels[4] and len(set(labels)) == 3
    rank = np.array([1, 0, 2, 4, 3])                  # lower rank wins
    rep = group.representatives(labels, rank)
    assert rep.tolist() == [1, 1, 2, 4, 4]


def test_exact_edges_link_equal_hashes():
    a, b = exact_edges(np.array(["x", "y", "x", "x"], dtype=object))
    assert sorted(zip(a.tolist(), b.tolist())) == [(0, 2), (0, 3)]


def test_chaining_guard_splits_a_chain():
    # a chain of 6 vectors rotating by ~17 degrees per step: neighbours at cos 0.956, ends far apart
    ang = np.radians(17) * np.arange(6)
    vecs = _unit(np.stack([np.cos(ang), np.sin(ang), np.zeros(6)], 1))
    gids = np.arange(6)
    a, b = np.arange(5), np.arange(1, 6)
    rank = np.arange(6)                              # node 0 is the preferred representative
    rep, sim = group.group_nodes(gids, rank, lambda: [(a, b)], _Store(vecs), guard=0.0)
    assert len(set(rep.tolist())) == 1               # no guard: one chained component
    rep, sim = group.group_nodes(gids, rank, lambda: [(a, b)], _Store(vecs), guard=0.9)
    assert len(set(rep.tolist())) > 1
    assert np.all(sim >= 0.9)                        # every member close to its representative
    assert rep[0] == 0 and rep[1] == 0


def test_similarities_to_the_representative_come_from_its_edges_or_the_vectors():
    """With the edges' similarities (`similar`), a member joined to its representative by an edge
    takes that edge's similarity, the others their vectors' product; the guard sees the same
    numbers either way. The store is asked only for the members without such an edge."""
    rng = np.random.default_rng(4)
    base = _unit(rng.normal(size=(1, 16)))
    vecs = _unit(base + 0.15 * rng.normal(size=(8, 16)))
    gids = np.arange(8)
    a, b = np.array([0, 0, 0, 3, 5, 6]), np.array([1, 2, 3, 4, 6, 7])      # 4 via 3; 5-6-7 a chain
    exact = np.einsum("ij,ij->i", vecs[a], vecs[b])
    asked = []

    class Store(_Store):
        def get(self, g):
            asked.extend(np.asarray(g).tolist())
            return super().get(g)
    for guard in (0.0, 0.9):
        plain = group.group_nodes(gids, gids, lambda: [(a, b)], _Store(vecs), guard)
        asked.clear()
        rep, sim = group.group_nodes(gids, gids, lambda: [(a, b)], Store(vecs), guard,
                                     similar=lambda: [(a, b, exact)])
        assert rep.tolist() == plain[0].tolist()
        np.testing.assert_allclose(sim, plain[1], atol=1e-6)
        direct = {(x, y) for x, y in zip(a.tolist(), b.tolist())} | {(y, x) for x, y in zip(a.tolist(), b.tolist())}
        far = [m for m in range(8) if rep[m] != m and (m, int(rep[m])) not in direct]
        if guard == 0.0:                             # one round: 4 and 7 have no edge to theirs
            assert far == [4, 7] and set(asked) == {4, 7} | set(rep[far].tolist()), asked


def test_members_that_are_not_copies_of_their_representative_are_split_off():
    """A chain 0-1-2-3 where only 0-1 and 2-3 are copies (confirm says so): every member of a
    group is confirmed against its representative, whatever the descriptor says."""
    vecs = _unit(np.ones((4, 3)))                    # the descriptor cannot tell them apart
    gids = np.arange(4)
    a, b = np.array([0, 1, 2]), np.array([1, 2, 3])
    copies = {(1, 0), (3, 2)}
    asked = []

    def confirm(nodes, rep, sims):
        asked.extend(zip(nodes.tolist(), rep[nodes].tolist()))
        return np.array([(m, r) in copies for m, r in zip(nodes.tolist(), rep[nodes].tolist())])
    rep, sim = group.group_nodes(gids, np.arange(4), lambda: [(a, b)], _Store(vecs), 0.0, confirm)
    assert rep.tolist() == [0, 0, 2, 2]
    assert len(asked) == len(set(asked))             # one question per (member, representative)
    # a member confirmed by no one stands alone
    rep, _ = group.group_nodes(gids, np.arange(4), lambda: [(a, b)], _Store(vecs), 0.0,
                               lambda n, r, s: np.zeros(len(n), bool))
    assert rep.tolist() == [0, 1, 2, 3]


def test_chunked_edges_give_the_same_groups_and_nearest_neighbours():
    """group() and Nearest see the edges in chunks (bounded memory): any chunking, same result."""
    rng = np.random.default_rng(3)
    n = 300
    centres = _unit(rng.normal(size=(12, 16)))
    vecs = _unit(centres[rng.integers(0, 12, n)] + 0.25 * rng.normal(size=(n, 16)))
    sims = vecs @ vecs.T
    a, b = np.nonzero(np.triu(sims >= 0.9, 1))
    s = sims[a, b].astype(np.float32)
    rank = rng.permutation(n)
    gids = np.arange(n) + (7 << 32)

    def chunks(size):
        return lambda: [(a[i:i + size], b[i:i + size]) for i in range(0, len(a), size)]
    whole = group.group_nodes(gids, rank, chunks(len(a)), _GidStore(gids, vecs), 0.93)
    parts = group.group_nodes(gids, rank, chunks(5), _GidStore(gids, vecs), 0.93)
    assert len(set(whole[0].tolist())) > 12            # the guard split components
    np.testing.assert_array_equal(whole[0], parts[0])
    np.testing.assert_array_equal(whole[1], parts[1])

    one, many = group.Nearest(n), group.Nearest(n)
    node, other, sim = np.r_[a, b], np.r_[gids[b], gids[a]], np.r_[s, s]
    one.update(node, other, sim)
    for i in range(0, len(node), 11):
        many.update(node[i:i + 11], other[i:i + 11], sim[i:i + 11])
    np.testing.assert_array_equal(one.gid, many.gid)
    best = np.where(np.eye(n, dtype=bool), -np.inf, np.where(sims >= 0.9, sims, -np.inf))
    has = np.isfinite(best).any(axis=1)
    assert (one.gid >= 0).tolist() == has.tolist()
    np.testing.assert_allclose(one.sim[has], best[has].max(axis=1), rtol=1e-6)


class _GidStore:
    def __init__(self, gids, vecs):
        self.gids, self.vecs = gids, vecs

    def get(self, g):
        return self.vecs[np.searchsorted(self.gids, g)]


def test_nearest_is_the_most_similar_neighbour_smallest_gid_on_ties():
    """Nearest against a per-node brute force, with many tied similarities and improving chunks."""
    rng = np.random.default_rng(4)
    n, m = 200, 5000
    node, other = rng.integers(0, n - 20, m), rng.integers(0, 10_000, m)
    sim = rng.integers(0, 6, m).astype(np.float32) / 5          # six values: ties everywhere
    near = group.Nearest(n)
    for lo in range(0, m, 333):                                 # later chunks raise some nodes' best
        near.update(node[lo:lo + 333], other[lo:lo + 333], sim[lo:lo + 333])
    for v in range(n):
        mine = node == v
        if not mine.any():
            assert near.gid[v] == -1 and near.sim[v] == -np.inf
            continue
        best = sim[mine].max()
        assert near.sim[v] == best and near.gid[v] == other[mine][sim[mine] == best].min()


def test_caption_aware_duplicates(tmp_path):
    """duplicate_key image+text: one picture under different questions is not a duplicate."""
    import io
    import json
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from conftest import make_config
    from dedup2b.core.executor import LocalExecutor
    from dedup2b.driver import run_stages

    assert group.normalize_text("  What  COLOUR is\tthe cat?\u00a0") == "what colour is the cat?"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 120, 200)).save(buf, format="PNG")
    other = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 120, 200)).save(other, format="JPEG", quality=90)
    captions = {"a": "What colour is the cat?", "b": "what  colour is the CAT?", "c": "How many cats?",
                "d": "What colour is the cat?"}
    images = {"a": buf.getvalue(), "b": buf.getvalue(), "c": buf.getvalue(), "d": other.getvalue()}
    folder = tmp_path / "in"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for k, data in images.items():
            info = tarfile.TarInfo(f"{k}.{'jpg' if k == 'd' else 'png'}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"key": list(captions), "caption": list(captions.values()),
                             "url": [f"u{k}" for k in captions]}), folder / "00000.parquet")
    groups = {}
    for mode in ("image", "image+text"):
        cfg = make_config(tmp_path / mode.replace("+", "_"), folder, group={"duplicate_key": mode})
        run_stages(cfg, LocalExecutor(), log=lambda *_: None)
        s = pq.read_table(cfg.run_path / "report" / "samples.parquet").to_pandas().set_index("key")
        groups[mode] = s.group_id
        assert json.loads((cfg.run_path / "report" / "summary.json").read_text())["invariant_holds"]
    assert groups["image"].nunique() == 1                               # one picture, four rows
    t = groups["image+text"]
    assert t["a"] == t["b"] == t["d"] and t["c"] != t["a"]              # same normalised text only


def test_quality_rank_equals_a_sort_of_the_whole_keys():
    """The rank from numbers and 16-byte key prefixes (full keys read back only for tied runs)
    orders rows exactly as sorting (pixels desc, bytes desc, key asc, input order) over every
    row's whole key: keys sharing long prefixes, non-ASCII keys, short keys, equal sizes."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from dedup2b.lib.nodes import key_prefix, quality_rank
    rng = np.random.default_rng(7)
    n = 4000
    stems = ["a", "img", "photos/2023/summer/holiday/IMG_", "photos/2023/summer/holiday/IMG_0", "zé/ü/", ""]
    keys = [stems[rng.integers(len(stems))] + str(rng.integers(0, 300)) for _ in range(n)]
    pixels = rng.choice([0, 640 * 480, 1024 * 768], n).astype(np.int64)
    nbytes = rng.choice([0, 1000, 2000], n).astype(np.int64)
    gids = np.arange(n, dtype=np.int64) * 3 + 5
    asked = []

    def full(g):
        asked.append(len(g))
        return [keys[(int(x) - 5) // 3] for x in g]
    rank = quality_rank(gids, pixels, nbytes, key_prefix(keys), full)
    table = pa.table({"pixels": pixels, "nbytes": nbytes, "key": keys})
    order = pc.sort_indices(table, sort_keys=[("pixels", "descending"), ("nbytes", "descending"),
                                              ("key", "ascending")]).to_numpy()   # stable: input order last
    expect = np.empty(n, np.int64)
    expect[order] = np.arange(n)
    assert np.array_equal(rank, expect)
    assert 0 < sum(asked) < n                     # only the tied long-prefix rows were read back


def test_gid_positions_by_arithmetic_and_by_search_agree():
    from dedup2b.lib.nodes import GidIndex
    rng = np.random.default_rng(2)
    whole = (np.int64(3) << 32) | np.arange(500)                    # a shard with every row
    holes = (np.int64(7) << 32) | np.sort(rng.choice(900, 400, replace=False))   # failed rows missing
    late = (np.int64(9) << 32) | np.arange(1, 300)                  # row 0 missing
    gids = np.concatenate([whole, holes, late])
    ask = rng.choice(gids, 3000)
    assert np.array_equal(GidIndex(gids)(ask), np.searchsorted(gids, ask))
