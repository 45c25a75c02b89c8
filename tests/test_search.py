"""PQ candidates + exact re-rank against brute force on CLIP-like seeded vectors."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedup2b.lib import codec as index

from dedup2b.stages import search
from bench.corpora import clip_like, exhaustive_pairs
from dedup2b.core.vectors import VectorStore, emb_path, meta_path


def _embed_dir(tmp_path, x, shards=2):
    """Lay vectors out as the embed stage does: fp16 npy + metadata parquet per shard."""
    per = (len(x) + shards - 1) // shards
    names, gids_all = {}, []
    for s in range(shards):
        part = x[s * per:(s + 1) * per]
        gids = (np.int64(s) << 32) | np.arange(len(part), dtype=np.int64)
        name = f"{s:05d}"
        emb_path(tmp_path, name).parent.mkdir(parents=True, exist_ok=True)
        meta_path(tmp_path, name).parent.mkdir(parents=True, exist_ok=True)
        np.save(emb_path(tmp_path, name), part.astype(np.float16))
        pq.write_table(pa.table({"gid": gids}), meta_path(tmp_path, name))
        names[s] = name
        gids_all.append(gids)
    return VectorStore(tmp_path, names), np.concatenate(gids_all)


def _built(tmp_path, store, counts, codec):
    """The IVF-PQ index as the index stage builds it (a part per shard, merged on disk)."""
    from dedup2b.lib import ivfbuild
    path = tmp_path / "ivf" / "index.faiss"
    ivfbuild.build(path, store, counts, {**codec, "seed": 1})
    return ivfbuild.read(path)


def test_pq_candidates_with_rerank_match_brute_force(tmp_path):
    x, _ = clip_like(6000, 256, seed=3)
    store, gids = _embed_dir(tmp_path, x)
    x16 = store.get(gids)                       # what the pipeline sees: fp16-rounded vectors
    threshold = 0.9
    truth = {(int(gids[i]), int(gids[j])) for i, j in exhaustive_pairs(x16, threshold)}
    counts = {0: 3000, 1: 3000}
    codec = index.choose_codec(6000, 256, m=16)
    codec["train_size"] = 6000
    idx = _built(tmp_path, store, counts, codec)
    a, b, _ = search.candidates(idx, x16, gids, threshold - 0.15, nprobe=8)
    sim = search.rescore(store, a, b)
    found = {(int(p), int(q)) for p, q, s in zip(a, b, sim) if s >= threshold}
    assert len(truth) > 1000
    assert found <= truth                       # verified pairs are exact: no false positives
    recall = len(found & truth) / len(truth)
    assert recall >= 0.99, recall
    # exact re-scores equal the brute-force cosine
    i = np.searchsorted(gids, a[:50]); j = np.searchsorted(gids, b[:50])
    np.testing.assert_allclose(sim[:50], np.einsum("ij,ij->i", x16[i], x16[j]), atol=1e-5)


def test_candidates_are_unique_and_ordered(tmp_path):
    x, _ = clip_like(1000, 64, seed=4)
    store, gids = _embed_dir(tmp_path, x, shards=1)
    codec = index.choose_codec(1000, 64, m=8)
    codec["train_size"] = 1000
    idx = _built(tmp_path, store, {0: 1000}, codec)
    a, b, _ = search.candidates(idx, store.get(gids), gids, 0.7, nprobe=4)
    assert np.all(a < b)
    assert len(set(zip(a.tolist(), b.tolist()))) == len(a)


def test_growing_knn_gives_the_range_search_candidates(tmp_path):
    """The GPU path (k-NN with k grown for queries whose k-th neighbour is still above the radius,
    CPU range search past the largest k) finds exactly the range-search candidates; run on CPU."""
    x, _ = clip_like(4000, 128, seed=6, max_group=300)      # groups far larger than the first k
    store, gids = _embed_dir(tmp_path, x)
    codec = index.choose_codec(4000, 128, m=16)
    codec["train_size"] = 4000
    idx = _built(tmp_path, store, {0: 2000, 1: 2000}, codec)
    x16 = store.get(gids)
    want = search.candidates(idx, x16, gids, 0.8, nprobe=8)
    for k_max in (2048, 64):                                 # 64: the CPU fallback takes over
        lims, dist, ids = search._range_by_knn(idx, x16[:500], 0.8, k0=16, k_max=k_max, cpu=idx)
        ref_lims, _, ref_ids = idx.range_search(x16[:500], 0.8)
        assert np.array_equal(np.diff(lims), np.diff(ref_lims))
        for i in range(500):
            assert set(ids[lims[i]:lims[i + 1]].tolist()) == set(ref_ids[ref_lims[i]:ref_lims[i + 1]].tolist())
    got = search.candidates(idx, x16, gids, 0.8, nprobe=8, knn=True)
    assert all(np.array_equal(g, w) for g, w in zip(got[:2], want[:2])) and max(np.diff(ref_lims)) > 64


def test_vector_gather_in_any_order_equals_the_stored_rows(tmp_path, monkeypatch):
    """VectorStore.get converts fp16 rows a chunk at a time, ascending or not, across shards."""
    from dedup2b.core import vectors
    monkeypatch.setattr(vectors, "GATHER_CHUNK", 7)          # many chunks, and a ragged last one
    x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    store, gids = _embed_dir(tmp_path, x, shards=3)
    ref = x.astype(np.float16).astype(np.float32)
    rng = np.random.default_rng(1)
    for pick in (np.arange(300), np.sort(rng.choice(300, 101, replace=False)), rng.permutation(300),
                 rng.choice(300, 50)):                          # ascending, sparse, shuffled, repeats
        assert np.array_equal(store.get(gids[pick]), ref[pick])
    one = gids[rng.permutation(100)]                            # one shard, shuffled
    assert np.array_equal(store.get(one), ref[(one & 0xFFFFFFFF).astype(int)])
    with np.testing.assert_raises(KeyError):
        store.get(np.array([gids[0] + 1000]))
