"""PQ candidates + exact re-rank against brute force on CLIP-like seeded vectors."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import index, search
from pipeline.synthetic import clip_like, exhaustive_pairs
from pipeline.vectors import VectorStore, emb_path, meta_path


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


def test_pq_candidates_with_rerank_match_brute_force(tmp_path):
    x, _ = clip_like(6000, 256, seed=3)
    store, gids = _embed_dir(tmp_path, x)
    x16 = store.get(gids)                       # what the pipeline sees: fp16-rounded vectors
    threshold = 0.9
    truth = {(int(gids[i]), int(gids[j])) for i, j in exhaustive_pairs(x16, threshold)}
    counts = {0: 3000, 1: 3000}
    codec = index.choose_codec(6000, 256, m=16)
    codec["train_size"] = 6000
    idx, _ = index.build(store, counts, codec, seed=1)
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
    idx, _ = index.build(store, {0: 1000}, codec, seed=1)
    a, b, _ = search.candidates(idx, store.get(gids), gids, 0.7, nprobe=4)
    assert np.all(a < b)
    assert len(set(zip(a.tolist(), b.tolist()))) == len(a)
