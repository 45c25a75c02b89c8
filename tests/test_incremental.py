"""Incremental dedup (`run --against NAME`): two increments give the all-at-once kept set."""
import json
import shutil

import faiss
import pyarrow.parquet as pq
import pytest

from dedup2b import demo
from dedup2b.core.config import from_dict
from dedup2b.lib.registry import TargetError
from dedup2b.core.executor import LocalExecutor
from dedup2b.driver import run_stages


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("incr")
    shards = demo.build(root / "corpus", rows_per_shard=40)      # 4 shards
    for part, names in (("a", ["00000", "00001"]), ("b", ["00002", "00003"])):
        (root / part).mkdir()
        for n in names:
            for ext in (".tar", ".parquet"):
                shutil.copy(shards / f"{n}{ext}", root / part / f"{n}{ext}")
    return root, shards


def _cfg(root, inp, name, rule, **kw):
    return from_dict({"input": {"path": str(inp)}, "run_dir": str(root / rule / name),
                      "index_dir": str(root / rule / "idx" / name), "group": {"representative": rule}, **kw})


def _kept(root, rule, name):
    return set(pq.read_table(root / rule / name / "export" / "keep.parquet")["key"].to_pylist())


def _runs(root, shards, rule):
    ex = LocalExecutor()
    quiet = dict(log=lambda *_: None)
    run_stages(_cfg(root, shards, "all", rule), ex, **quiet)
    run_stages(_cfg(root, root / "a", "inc1", rule), ex, **quiet)
    before = (root / rule / "inc1" / "export" / "keep.parquet").read_bytes()
    stats = run_stages(_cfg(root, root / "b", "inc2", rule, against=str(root / rule / "idx" / "inc1")), ex, **quiet)
    return before, stats


def test_two_increments_keep_exactly_the_all_at_once_rows(parts):
    root, shards = parts
    before, stats = _runs(root, shards, "first")
    assert _kept(root, "first", "all") == _kept(root, "first", "inc1") | _kept(root, "first", "inc2")
    # the earlier run's rows never change status; its groups grew; its index was extended
    assert (root / "first" / "inc1" / "export" / "keep.parquet").read_bytes() == before
    assert stats["group"]["earlier_groups_grown"] > 0 and stats["group"]["rows_joining_earlier_groups"] > 0
    idx = root / "first" / "idx" / "inc1"
    registry = pq.read_table(idx / "registry" / "registry.parquet")
    assert registry.num_rows == faiss.read_index(str(idx / "registry" / "index.faiss")).ntotal
    all_ok = pq.read_table(root / "first" / "all" / "report" / "samples.parquet").to_pandas()
    assert registry.num_rows == int((all_ok.status == "ok").sum())
    # grown groups: rows of the second increment sit in groups whose representative is an earlier row
    s2 = pq.read_table(root / "first" / "inc2" / "report" / "samples.parquet").to_pandas()
    s1 = pq.read_table(root / "first" / "inc1" / "report" / "samples.parquet").to_pandas()
    assert s2.representative_key.isin(set(s1.key)).sum() == stats["group"]["rows_joining_earlier_groups"]
    summary = json.loads((root / "first" / "inc2" / "report" / "summary.json").read_text())
    assert summary["rows_joining_earlier_groups"] == stats["group"]["rows_joining_earlier_groups"]
    assert summary["invariant_holds"]
    # the same partition into groups as the all-at-once run
    by_rep = lambda s: {frozenset(g.key) for _, g in s.dropna(subset=["group_id"]).groupby("representative_key")}  # noqa: E731
    import pandas as pd
    assert by_rep(pd.concat([s1, s2])) == by_rep(all_ok)

    # a rerun of the increment is a no-op: the registry and index are not extended twice
    ex = LocalExecutor()
    run_stages(_cfg(root, root / "b", "inc2", "first", against=str(idx)), ex, log=lambda *_: None)
    assert pq.read_table(idx / "registry" / "registry.parquet").num_rows == registry.num_rows
    assert faiss.read_index(str(idx / "registry" / "index.faiss")).ntotal == registry.num_rows


def test_quality_rule_keeps_one_row_per_group_and_never_touches_earlier_rows(parts, monkeypatch):
    root, shards = parts
    before, stats = _runs(root, shards, "quality")
    assert (root / "quality" / "inc1" / "export" / "keep.parquet").read_bytes() == before
    assert len(_kept(root, "quality", "all")) == len(_kept(root, "quality", "inc1") | _kept(root, "quality", "inc2"))
    # the group stage in buckets of 3 rows gives the rows and counts of one bucket
    from dedup2b.stages import group
    run = root / "quality" / "inc2"
    rows = pq.read_table(run / "group" / "rows")
    monkeypatch.setattr(group, "BUCKET_ROWS", 3)
    (run / "group" / "_done" / "group.json").unlink()
    again = run_stages(_cfg(root, root / "b", "inc2", "quality", against=str(root / "quality" / "idx" / "inc1")),
                       LocalExecutor(), stages=("group",), log=lambda *_: None)["group"]
    assert again["buckets"] > 1 and stats["group"]["buckets"] == 1
    assert pq.read_table(run / "group" / "rows").equals(rows)
    for k in ("groups", "edges", "rows_joining_earlier_groups", "earlier_groups_grown"):
        assert again[k] == stats["group"][k], k


def test_increments_grouped_in_buckets_as_tasks_keep_the_all_at_once_rows(parts, monkeypatch):
    """Without the pixel check the group stage's buckets run as tasks, earlier groups included."""
    from dedup2b.stages import group
    root, shards = parts
    monkeypatch.setattr(group, "BUCKET_ROWS", 3)
    off = {"verify": {"method": "off"}}
    ex, quiet = LocalExecutor(), dict(log=lambda *_: None)
    run_stages(_cfg(root, shards, "all-off", "first", **off), ex, **quiet)
    run_stages(_cfg(root, root / "a", "inc1-off", "first", **off), ex, **quiet)
    stats = run_stages(_cfg(root, root / "b", "inc2-off", "first", against=str(root / "first" / "idx" / "inc1-off"),
                            **off), ex, **quiet)["group"]
    assert stats["buckets"] > 1 and stats["earlier_groups_grown"] > 0 and stats["rows_joining_earlier_groups"] > 0
    assert _kept(root, "first", "all-off") == _kept(root, "first", "inc1-off") | _kept(root, "first", "inc2-off")


def test_an_increment_must_continue_the_shard_numbering(parts, tmp_path):
    root, shards = parts
    idx = root / "first" / "idx" / "inc1"
    if not (idx / "registry" / "registry.parquet").exists():
        run_stages(_cfg(root, root / "a", "inc1", "first"), LocalExecutor(), log=lambda *_: None)
    with pytest.raises(TargetError, match="shard numbers"):
        run_stages(from_dict({"input": {"path": str(root / "a")}, "run_dir": str(tmp_path / "again"),
                                "against": str(idx)}), LocalExecutor(), log=lambda *_: None)
    with pytest.raises(TargetError, match="no registry"):
        run_stages(from_dict({"input": {"path": str(root / "b")}, "run_dir": str(tmp_path / "x"),
                                "against": str(tmp_path)}), LocalExecutor(), log=lambda *_: None)


def test_cross_search_finds_copies_that_a_short_code_underestimates():
    """The cross search's candidates are nearest neighbours by the IVF-PQ estimate, re-scored
    exactly: a short code shrinks every estimate (cosine 0.98 estimated below 0.1 here), so a
    range search at any fixed radius finds nothing, while the estimate's order still finds every
    copy; k grows past a group of 300 copies of one row."""
    import faiss
    import numpy as np

    from dedup2b.lib.registry import knn_matches
    rng = np.random.default_rng(0)
    n, d, base = 5000, 768, 3 << 32
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[1000:1300] = x[0] + 0.15 * rng.standard_normal((300, d)).astype(np.float32) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = faiss.index_factory(d, "IVF16,PQ8x8", faiss.METRIC_INNER_PRODUCT)
    index.do_polysemous_training = False
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)                     # seconds, not a minute, on a busy box
    try:
        index.train(x)
    finally:
        faiss.omp_set_num_threads(threads)
    index.add_with_ids(x, np.arange(n, dtype=np.int64) + base)
    faiss.extract_index_ivf(index).nprobe = 16     # every cell: the estimate alone is tested
    q = x[:20] + 0.2 * rng.standard_normal((20, d)).astype(np.float32) / np.sqrt(d)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = q @ x.T
    truth = set(zip(*np.nonzero(exact >= 0.9)))
    assert len(truth) == 20 + 300 and index.range_search(q[1:], 0.80)[2].size == 0   # the single copies

    class Stored:
        def get(self, ids):
            return x[ids - base]
    rows, ids, sims, scored = knn_matches(index, q, Stored(), 0.9, lambda i: np.ones(len(i), bool))
    got = set(zip(rows.tolist(), (ids - base).tolist()))
    assert got == truth
    np.testing.assert_allclose(sims, exact[rows, ids - base], atol=1e-5)
    assert scored < 20 * 16 + 4 * 2048               # k grew for the one query that needed it
    # rows the registry does not hold are never returned
    rows, ids, _, _ = knn_matches(index, q, Stored(), 0.9, lambda i: i - base >= 1000)
    assert set((ids - base).tolist()) <= set(range(1000, 1300)) and set(rows.tolist()) == {0}
