"""Cell join against brute force: lossless bound, sharded over tasks, resumed, on Ray."""
import numpy as np
import pyarrow.parquet as pq
import pytest

from dedup2b.lib import celljoin

from dedup2b.lib import codec as index
from dedup2b.core.config import CodecConfig, SearchConfig
from dedup2b.core.executor import LocalExecutor, ShardFailed
from dedup2b.stages.search import SearchJob, find_pairs, n_cells, pair_files
from bench.corpora import clip_like, exhaustive_pairs, write_corpus
from dedup2b.core.vectors import VectorStore


def test_bound_is_lossless_inside_a_cell():
    x, _ = clip_like(3000, 128, seed=5)
    x = x.astype(np.float16).astype(np.float32)
    proj = celljoin.train_projection(x, 16)            # a crude projection: the bound must still hold
    gids = np.arange(len(x), dtype=np.int64)
    a, b, sim, cand = celljoin.join_members(gids, np.zeros((len(x), 1), np.int64), x, proj, 0.9)
    assert set(zip(a.tolist(), b.tolist())) == exhaustive_pairs(x, 0.9)
    assert cand < len(x) * (len(x) - 1) // 2           # and it did prune
    np.testing.assert_allclose(sim, np.einsum("ij,ij->i", x[a], x[b]), atol=1e-6)


@pytest.mark.parametrize("dense", [0.0, 0.002, 1.0])   # always block products, the default, always gathered
def test_both_rescoring_paths_find_every_pair(dense):
    x, _ = clip_like(3000, 128, seed=5, max_group=200)
    x = x.astype(np.float16).astype(np.float32)
    z, rn = celljoin.project(x, celljoin.train_projection(x, 16))
    i, j, sim, cand = celljoin.join_cell(x, np.hstack([z, rn[:, None]]), 0.9, chunk=700, dense=dense)
    assert set(zip(i.tolist(), j.tolist())) == exhaustive_pairs(x, 0.9)
    assert len(i) == len(set(zip(i.tolist(), j.tolist()))) and np.all(i < j)
    np.testing.assert_allclose(sim, np.einsum("ij,ij->i", x[i], x[j]), atol=1e-6)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cj")
    x, src = clip_like(8000, 256, seed=7, max_group=300)
    names = write_corpus(root / "embed", x, src, rows_per_shard=3000)
    shards = {i: n for i, n in enumerate(names)}
    store = VectorStore(root / "embed", shards)
    counts = {i: len(store.shard(i)[0]) for i in shards}
    index.train_all(store, counts, CodecConfig(train_size=8000), root / "index", "fp-index", "synthetic",
                    cells=40, proj_dim=64)
    gids = np.concatenate([store.shard(i)[0] for i in shards])
    xs = store.get(gids)
    truth = {(int(gids[i]), int(gids[j])) for i, j in exhaustive_pairs(xs, 0.95)}
    return root, shards, truth


def _job(root, shards, out, **kw):
    cfg = SearchConfig(threshold=0.95, cells_per_task=8, pairs="all", **kw)   # every pair, held against exhaustive
    return SearchJob(root / "embed", shards, root / "index", out, cfg, "fp-index", "fp-search")


def _pairs(out, threshold=0.95):
    got = set()
    for p in pair_files(out):
        t = pq.read_table(p)
        keep = t["similarity"].to_numpy() >= threshold
        got.update(zip(t["gid_a"].to_numpy()[keep].tolist(), t["gid_b"].to_numpy()[keep].tolist()))
    return got


def test_sharded_and_resumed_search_equals_brute_force(corpus, tmp_path):
    root, shards, truth = corpus
    job = _job(root, shards, tmp_path / "s")
    stats = find_pairs(job, LocalExecutor())
    assert stats["shards"] == 3 and stats["blocks"] == -(-n_cells(root / "index") // 8)
    found = _pairs(job.out_dir)
    assert len(truth) > 1000 and found <= truth
    assert len(found) / len(truth) >= 0.99
    # the join read the projections the assign step wrote, and the vectors of candidates' rows only
    # (not every member of its cells); those projections are gone once every block is joined
    assert stats["assignments"] >= 8000 and 0 < stats["rows_read"] < stats["assignments"]
    assert not (job.out_dir / "zr").exists()
    # lose one block's output: only that block is redone, with the same result
    victim = pair_files(job.out_dir)[2]
    before = pq.read_table(victim).sort_by([("gid_a", "ascending"), ("gid_b", "ascending")])
    victim.unlink()
    again = find_pairs(job, LocalExecutor())        # without the projections: its members' vectors
    assert again["shards"] == 0 and again["blocks"] == 1
    assert _pairs(job.out_dir) == found
    after = pq.read_table(victim).sort_by([("gid_a", "ascending"), ("gid_b", "ascending")])
    assert after.num_rows == before.num_rows and after["gid_a"].equals(before["gid_a"])
    np.testing.assert_allclose(after["similarity"].to_numpy(), before["similarity"].to_numpy(), atol=1e-6)


def test_nested_assignment_keeps_copies_together_at_a_fraction_of_the_products():
    """search.assign = nested: every row gets its best coarse cell's best fine cell (at least one
    cell, best first); with every coarse cell probed and every cell within the border it is the
    exhaustive assignment; and near copies share a cell about as often as under the exhaustive
    rule (nearly, at this small scale), while a row is scored against a fraction of the cells."""
    x, src = clip_like(40_000, 128, seed=11, max_group=40)
    z, _ = celljoin.project(x, celljoin.train_projection(x[:20_000], 32))
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    fine, coarse = celljoin.train_cells(z[:20_000], 400, seed=0, two_levels=True)
    assert coarse is not None and abs(len(fine) - 400) <= 20 and len(coarse) == 20
    nest = celljoin.Nested(fine, coarse, 0.0075)
    q = z[20_000:]
    got = celljoin.assign(q, nest, 0.007, 6)
    assert np.all(got[:, 0] >= 0)
    scores = q @ fine.T
    held = np.take_along_axis(scores, np.maximum(got, 0), axis=1)
    assert np.all(np.where(got[:, 1:] >= 0, held[:, :-1] >= held[:, 1:] - 1e-6, True))     # best first
    cs = q @ nest.coarse.T
    probed = cs >= cs.max(axis=1, keepdims=True) - 0.0075
    owner = np.empty(len(fine), np.int64)
    for c in range(len(nest.coarse)):
        owner[nest.order[nest.bounds[c]:nest.bounds[c + 1]]] = c
    # the first cell is the best fine cell of the probed coarse cells
    np.testing.assert_array_equal(got[:, 0], np.where(probed[:, owner], scores, -np.inf).argmax(axis=1))
    everything = celljoin.Nested(fine, coarse, 2.0)
    np.testing.assert_array_equal(np.sort(celljoin.assign(q, everything, 2.0, 6), axis=1),
                                  np.sort(celljoin.assign(q, fine, 2.0, 6), axis=1))
    # copies (rows of one source at cosine >= 0.95) share a cell nearly always
    first = {}
    a, b = [], []
    for i, s in enumerate(src[20_000:]):
        if s in first:
            a.append(first[s]); b.append(i)
        else:
            first[s] = i
    a, b = np.array(a), np.array(b)
    close = np.einsum("ij,ij->i", x[20_000:][a], x[20_000:][b]) >= 0.95
    shared = celljoin.first_shared_cell(got[a[close]], got[b[close]]) < np.iinfo(np.int64).max
    flat = celljoin.assign(q, fine, 0.01, 3)
    shared_flat = celljoin.first_shared_cell(flat[a[close]], flat[b[close]]) < np.iinfo(np.int64).max
    # (0.992 against 0.9986 here, 20 coarse cells; at 10 M rows 0.99929 against 0.99942: bench.assign)
    assert close.sum() > 1000 and shared.mean() >= 0.99 and shared.mean() >= shared_flat.mean() - 0.01
    # a row is scored against its probed coarse cells' fine cells only
    sizes = np.diff(nest.bounds)
    assert (probed @ sizes).mean() < 0.5 * len(fine)


def test_gpu_benchmark_assigns_by_the_search_rule():
    """bench/gpu_search.py's torch assignment (the GPU search benchmark's code path) gives the
    cells celljoin.Nested gives, from cells it trained in two levels as the index stage does."""
    torch = pytest.importorskip("torch")
    from bench.gpu_search import SEARCH, _unit, nested_cells, two_level_kmeans
    g = torch.Generator().manual_seed(0)
    z = _unit(torch.randn(20_000, 16, generator=g) + 2 * _unit(torch.randn(1, 16, generator=g)))
    fine, owner, coarse = two_level_kmeans(z, 400, 5, 0)
    assert abs(len(fine) - 400) <= 20 and len(coarse) <= 20
    q = _unit(z[:4000] + 0.05 * torch.randn(4000, 16, generator=g))
    got = nested_cells(q, fine, (owner, coarse), SEARCH.coarse_delta, SEARCH.border, SEARCH.max_cells).numpy()
    ref = celljoin.Nested(fine.numpy(), coarse.numpy(), SEARCH.coarse_delta).assign(q.numpy(), SEARCH.border,
                                                                                     SEARCH.max_cells)
    assert (ref >= 0).sum(axis=1).mean() > 1.1                 # rows in several cells: the rule is exercised
    assert np.mean(np.all(got == ref, axis=1)) >= 0.999      # (a tie in fp32 scores may order two cells apart)


def test_cells_live_in_the_projections_first_dims(corpus, tmp_path):
    """search.cell_dim: cells are trained and rows assigned in the projection's first dims (the
    assignment's rows x cells product at a fraction of the cost); the join still bounds in all of
    them and re-scores exactly, and finds what brute force finds."""
    root, shards, truth = corpus
    store = VectorStore(root / "embed", shards)
    counts = {i: len(store.shard(i)[0]) for i in shards}
    codec, _ = index.train_all(store, counts, CodecConfig(train_size=8000), tmp_path / "index", "fp-index",
                               "synthetic", cells=40, proj_dim=64, cell_dim=16)
    cents = np.load(tmp_path / "index" / "centroids.npy")
    assert codec["cell_dim"] == 16 and codec["proj_dim"] == 64 and cents.shape == (codec["cells"], 16)
    z, _ = celljoin.project(store.get(store.shard(0)[0][:500]), np.load(tmp_path / "index" / "projection.npy"))
    np.testing.assert_array_equal(celljoin.assign(z, cents, 0.01, 3), celljoin.assign(z[:, :16], cents, 0.01, 3))
    job = SearchJob(root / "embed", shards, tmp_path / "index", tmp_path / "s",
                    SearchConfig(threshold=0.95, cells_per_task=8, pairs="all"), "fp-index", "fp-search")
    find_pairs(job, LocalExecutor())
    found = _pairs(job.out_dir)
    assert found <= truth and len(found) / len(truth) >= 0.99


def test_pq_method_finds_the_same_pairs(corpus, tmp_path):
    root, shards, truth = corpus
    job = _job(root, shards, tmp_path / "p", method="pq", margin=0.3, nprobe=16)
    find_pairs(job, LocalExecutor())
    found = _pairs(job.out_dir)
    assert found <= truth and len(found) / len(truth) >= 0.95


def test_ray_workers_give_the_same_pairs(corpus, tmp_path, ray_executor):
    root, shards, _ = corpus
    local, remote = _job(root, shards, tmp_path / "l"), _job(root, shards, tmp_path / "r")
    find_pairs(local, LocalExecutor())
    find_pairs(remote, ray_executor)
    assert _pairs(local.out_dir, 0.0) == _pairs(remote.out_dir, 0.0)


def test_stale_index_is_refused(corpus, tmp_path):
    root, shards, _ = corpus
    job = SearchJob(root / "embed", shards, root / "index", tmp_path / "x", SearchConfig(threshold=0.95),
                    "another-fingerprint", "fp")
    with pytest.raises(ShardFailed, match="(?s)IndexMismatch.*fingerprint"):
        find_pairs(job, LocalExecutor())


def test_torch_path_gives_the_numpy_pairs():
    """The GPU code path (torch), run on the CPU here, finds exactly the numpy path's pairs."""
    x, _ = clip_like(4000, 128, seed=9, max_group=200)
    x = x.astype(np.float16).astype(np.float32)
    proj = celljoin.train_projection(x, 32)
    rng = np.random.default_rng(0)
    first = rng.integers(0, 5, len(x))                       # distinct cells per row, as assign gives
    second = np.where(rng.random(len(x)) < 0.3, (first + rng.integers(1, 5, len(x))) % 5, -1)
    cells = np.stack([first, second], axis=1)
    gids = np.arange(len(x), dtype=np.int64)
    a1, b1, s1, _ = celljoin.join_members(gids, cells, x, proj, 0.93)
    a2, b2, s2, _ = celljoin.join_members(gids, cells, x, proj, 0.93, device="cpu")
    assert len(a1) > 100
    assert len(set(zip(a1.tolist(), b1.tolist()))) == len(a1)      # each pair once, across cells
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)
    np.testing.assert_allclose(s1, s2, atol=1e-5)


class _Counting:
    """Vectors read on demand (as the search's Rows), counting which rows were read."""

    def __init__(self, x):
        self.x, self.rows = x, []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, idx):
        self.rows.append(np.asarray(idx).ravel())
        return self.x[idx]


@pytest.mark.parametrize("dense_min", [0, 300])
def test_given_projections_read_only_the_rows_of_candidates(monkeypatch, dense_min):
    """With the rows' projections given (the assign step writes them), the join reads from the
    vectors only the rows of candidate pairs (and of cells big enough to be dense), in reads of
    several cells at once, and finds exactly what the join reading every row finds."""
    monkeypatch.setattr(celljoin, "RESCORE_PAIRS", 200)       # several reads in one block
    x, _ = clip_like(4000, 128, seed=9, max_group=300)
    x = x.astype(np.float16).astype(np.float32)
    proj = celljoin.train_projection(x, 96)       # a bound that prunes, as CLIP's 128 of 768 do
    rng = np.random.default_rng(1)
    first = rng.integers(0, 8, len(x))
    second = np.where(rng.random(len(x)) < 0.3, (first + rng.integers(1, 8, len(x))) % 8, -1)
    cells = np.stack([first, second], axis=1)
    gids = np.arange(len(x), dtype=np.int64)
    kw = dict(dense_min=dense_min, edge_threshold=0.95)
    a1, b1, s1, c1 = celljoin.join_members(gids, cells, x, proj, 0.93, **kw)
    lazy = _Counting(x)
    a2, b2, s2, c2 = celljoin.join_members(gids, cells, lazy, proj, 0.93, zr=celljoin.project_zr(x, proj), **kw)
    assert len(a1) > 1000 and c1 == c2
    one = {(a, b): s for a, b, s in zip(a1.tolist(), b1.tolist(), s1.tolist())}
    two = {(a, b): s for a, b, s in zip(a2.tolist(), b2.tolist(), s2.tolist())}
    assert one.keys() == two.keys() and len(two) == len(a2)
    np.testing.assert_allclose([two[k] for k in one], list(one.values()), atol=1e-6)
    read = np.concatenate(lazy.rows)
    assert len(lazy.rows) >= 2 and len(np.unique(read)) < 0.8 * len(x)
    assert set(a2.tolist()) | set(b2.tolist()) <= set(read.tolist())


def test_two_level_cells_assign_like_exhaustive(monkeypatch):
    """Beyond FLAT_CELLS cells: two-level k-means and an IVF over the centroids; the best cell of
    a row agrees with exhaustive assignment (the rate the index stage measures and records)."""
    monkeypatch.setattr(celljoin, "FLAT_CELLS", 256)     # two levels from a few hundred cells
    rng = np.random.default_rng(3)                        # rows around 40 well separated topics
    topics = rng.standard_normal((40, 64)).astype(np.float32)
    x = topics[rng.integers(0, 40, 60_000)] + 0.35 * rng.standard_normal((60_000, 64)).astype(np.float32)
    n = 1500
    cents, coarse = celljoin.train_cells(x, n, seed=0)
    assert abs(len(cents) - n) <= 0.05 * n and coarse is not None
    idx, info = celljoin.cell_index(cents, coarse, x[:10_000])
    assert info["assign"].startswith("two-level") and info["assign_agreement"] >= 0.999
    assert 2 * info["assign_nprobe"] <= len(coarse)
    got = celljoin.assign(x[10_000:20_000], idx, 0.01, 3)
    exact = celljoin.assign(x[10_000:20_000], cents, 0.01, 3)
    assert np.mean(got[:, 0] == exact[:, 0]) >= 0.995
    # where the coarse level cannot prune (CLIP-like rows: one dominant direction), one exhaustive
    # product is used instead
    y, _ = clip_like(60_000, 64, seed=3, max_group=50)
    cents, coarse = celljoin.train_cells(y, n, seed=0)
    _, info = celljoin.cell_index(cents, coarse, y[:10_000])
    assert info["assign"].startswith("flat (two levels would probe")


def test_two_level_search_equals_brute_force(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(celljoin, "FLAT_CELLS", 256)
    root, shards, truth = corpus
    store = VectorStore(root / "embed", shards)
    counts = {i: len(store.shard(i)[0]) for i in shards}
    codec, _ = index.train_all(store, counts, CodecConfig(train_size=8000), tmp_path / "index", "fp-index",
                               "synthetic", proj_dim=64, cell_rows=6, nested=False)     # search.assign = flat
    assert codec["cells"] > celljoin.FLAT_CELLS and codec["cells_train_rows"] >= codec["cells"]
    job = SearchJob(root / "embed", shards, tmp_path / "index", tmp_path / "s",
                    SearchConfig(threshold=0.95, cells_per_task=64, pairs="all", assign="flat", border=0.01,
                                 max_cells=3), "fp-index", "fp-search")      # the flat assignment's values
    find_pairs(job, LocalExecutor())
    found = _pairs(job.out_dir)
    assert found <= truth and len(found) / len(truth) >= 0.99
    # the search assigns as the index stage chose: two levels where it kept them, else exhaustively
    # (an index stage that finds the coarse level does not prune keeps no coarse.npy, and a
    # coarse.npy left beside that choice by an earlier version is not used)
    from dedup2b.stages.search import _codec
    assert "assign_nprobe" in codec and (tmp_path / "index" / "coarse.npy").exists()
    assert isinstance(_codec(job)[1], celljoin.TwoLevel)
    real = celljoin.cell_index
    monkeypatch.setattr(celljoin, "cell_index", lambda c, coarse=None, points=None: real(c))
    flat, _ = index.train_all(store, counts, CodecConfig(train_size=8000), tmp_path / "flat", "fp-index",
                              "synthetic", proj_dim=64, cell_rows=6, nested=False)
    assert "assign_nprobe" not in flat and not (tmp_path / "flat" / "coarse.npy").exists()
    job.index_dir = tmp_path / "flat"
    np.save(tmp_path / "flat" / "coarse.npy", np.zeros((4, 64), np.float32))
    assert not isinstance(_codec(job)[1], celljoin.TwoLevel)


def test_packed_projections_still_bound_every_pair():
    """The assign step stores the rows' projections in fp16 (pack_zr); unpacked, their products
    still bound every pair's exact cosine from above (so the join stays lossless), by little more
    than the float32 rows' own bound."""
    x, _ = clip_like(3000, 128, seed=11, max_group=400)
    x = x.astype(np.float16).astype(np.float32)                  # as stored: fp16 unit vectors
    proj = celljoin.train_projection(x, 64)
    zr = celljoin.project_zr(x, proj)
    packed = celljoin.pack_zr(zr)
    assert packed.dtype == np.float16 and packed.shape == zr.shape
    u = celljoin.unpack_zr(packed)
    bound, exact, before = u @ u.T, x @ x.T, zr @ zr.T
    assert np.all(bound >= exact - 1e-6)
    assert np.all(bound - before <= 3e-3)
    a, b, _, _ = celljoin.join_members(np.arange(len(x)), np.zeros((len(x), 1), np.int64), x, proj, 0.9, zr=u)
    assert set(zip(a.tolist(), b.tolist())) == exhaustive_pairs(x, 0.9)


def test_a_worker_opens_the_vector_store_once_until_its_files_change(corpus, tmp_path):
    """The join's blocks share one vector store per worker (shards opened once, not per block),
    and a store whose files were written again since is opened anew, even within the clock's
    grain: no stale memory map."""
    import os
    import shutil
    from dedup2b.core.io import write_npy
    from dedup2b.stages import search
    root, shards, _ = corpus
    shutil.copytree(root / "embed", tmp_path / "embed")
    job = SearchJob(tmp_path / "embed", shards, root / "index", tmp_path / "s",
                    SearchConfig(threshold=0.95), "fp-index", "fp-search")
    store = search._store(job)
    gid = int(store.shard(0)[0][5])
    first = store.get(np.array([gid]))
    assert search._store(job) is store
    path = tmp_path / "embed" / "img_emb" / f"img_emb_{shards[0]}.npy"
    x = np.load(path)
    x[5] = -x[5]
    mtime = os.stat(path).st_mtime_ns
    write_npy(path, x)                                         # written anew (temp name + replace)
    os.utime(path, ns=(mtime, mtime))                          # the same mtime: the inode still tells
    again = search._store(job)
    assert again is not store
    np.testing.assert_allclose(again.get(np.array([gid])), -first, atol=1e-3)
