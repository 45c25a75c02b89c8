"""The IVF-PQ index built a shard per task and merged into on-disk lists: the same index as one
built in memory row by row, readable after its folder moves, extended without writing the base."""
import shutil

import faiss
import numpy as np

from bench.corpora import clip_like, write_corpus
from dedup2b.core.executor import LocalExecutor
from dedup2b.core.vectors import VectorStore
from dedup2b.lib import codec as codec_lib
from dedup2b.lib import ivfbuild


def _store(tmp_path, n=6000, d=64, shards=3):
    x, _ = clip_like(n, d, seed=4, max_group=20)
    write_corpus(tmp_path / "emb", x, np.zeros(n, np.int64), rows_per_shard=n // shards)
    names = {i: f"{i:05d}" for i in range(shards)}
    store = VectorStore(tmp_path / "emb", names)
    return store, {i: len(store.shard(i)[0]) for i in names}


def _search(index, q, nprobe):
    faiss.extract_index_ivf(index).nprobe = nprobe
    return index.search(q, 10)


def test_parts_merged_on_disk_equal_one_index_built_in_memory(tmp_path):
    store, counts = _store(tmp_path)
    codec = {**codec_lib.choose_codec(6000, 64), "train_size": 5000, "seed": 0}
    path = tmp_path / "ix" / "index.faiss"
    out = ivfbuild.build(path, store, counts, codec, LocalExecutor())
    assert out["ntotal"] == 6000 and (path.parent / out["ivfdata"]).exists()
    assert not path.with_suffix(".parts").exists()             # the parts go once merged
    # the reference: the same trained codec, every row added in one process, lists in memory
    ref = ivfbuild.train(store, counts, codec)
    for i in sorted(counts):
        g, v = store.shard(i)
        ref.add_with_ids(np.asarray(v, np.float32), g)
    q = np.asarray(store.shard(1)[1][:300], np.float32)
    built = ivfbuild.read(path)
    nlist = faiss.extract_index_ivf(ref).nlist
    d0, i0 = _search(ref, q, nlist)
    d1, i1 = _search(built, q, nlist)
    assert np.array_equal(i0, i1) and np.allclose(d0, d1)
    # moved: the lists are found beside the index file
    shutil.move(str(tmp_path / "ix"), str(tmp_path / "moved"))
    d2, i2 = _search(ivfbuild.read(tmp_path / "moved" / "index.faiss"), q, nlist)
    assert np.array_equal(i0, i2)


def test_an_index_extended_with_more_rows_keeps_the_old_ones(tmp_path):
    store, counts = _store(tmp_path)
    codec = {**codec_lib.choose_codec(6000, 64), "train_size": 5000, "seed": 0}
    first = tmp_path / "a" / "index.faiss"
    ivfbuild.build(first, store, {0: counts[0], 1: counts[1]}, codec)
    before = first.read_bytes()
    grown = tmp_path / "b" / "index.faiss"
    out = ivfbuild.build(grown, store, {2: counts[2]}, codec, base=first)
    assert out["ntotal"] == 6000 and first.read_bytes() == before   # the base is never written
    lists_a, lists_b = (_lists(ivfbuild.read(p)) for p in (first, grown))
    every = np.concatenate([store.shard(i)[0] for i in sorted(counts)])
    assert sorted(k for ids, _ in lists_b.values() for k in ids) == sorted(every.tolist())
    for lst, (ids, codes) in lists_a.items():           # the old rows: the same lists, the same codes
        ids_b, codes_b = lists_b[lst]
        assert ids_b[:len(ids)] == ids and codes_b[:len(codes)] == codes


def _lists(index) -> dict:
    """list number -> (ids, codes bytes) of an IVF index."""
    ivf = faiss.extract_index_ivf(index)
    il, out = ivf.invlists, {}
    for lst in range(ivf.nlist):
        n = il.list_size(lst)
        ids = faiss.rev_swig_ptr(il.get_ids(lst), n).tolist() if n else []
        codes = bytes(faiss.rev_swig_ptr(il.get_codes(lst), n * il.code_size)) if n else b""
        out[lst] = (ids, codes)
    return out
