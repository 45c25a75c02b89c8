import numpy as np
import pyarrow.parquet as pq

from bench.corpora import write_clip_like
from dedup2b.core.vectors import VectorStore


def _load(root, names):
    store = VectorStore(root, dict(enumerate(names)))
    gids = np.concatenate([store.shard(i)[0] for i in range(len(names))])
    return gids, store.get(gids)


def test_write_clip_like_streams_deterministic_and_clip_like(tmp_path):
    names = write_clip_like(tmp_path / "a", 5000, 64, seed=3, max_group=40, rows_per_shard=1200, chunk=700)
    again = write_clip_like(tmp_path / "b", 5000, 64, seed=3, max_group=40, rows_per_shard=1200, chunk=700)
    assert names == again == ["00000", "00001", "00002", "00003", "00004"]
    gids, x = _load(tmp_path / "a", names)
    _, y = _load(tmp_path / "b", names)
    assert len(x) == 5000 and np.array_equal(x, y)
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=2e-3)
    gt = pq.read_table(tmp_path / "a" / "ground_truth.parquet").to_pandas()
    assert np.array_equal(gt["gid"].to_numpy(), gids)
    src = gt["source"].to_numpy()
    assert len(np.unique(src)) == int(5000 * 0.7)
    # copies of one source sit at cosine ~0.95-0.999; unrelated rows well below
    order = np.argsort(src, kind="stable")
    same = src[order][1:] == src[order][:-1]
    cos = np.sum(x[order][1:] * x[order][:-1], axis=1)[same]
    assert same.sum() > 500 and np.median(cos) > 0.95 and cos.min() > 0.9
    rnd = np.sum(x[:2000] * x[2000:4000], axis=1)
    assert np.median(rnd) < 0.9 and np.median(rnd) > 0.3     # anisotropic: shared mean direction
