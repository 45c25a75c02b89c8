"""Reads of given rows from memory-mapped vector files: the pages of scattered rows are asked for
before they are read, every row's bytes covered, nearby rows in one call; the rows read are the
rows stored."""
import os

import numpy as np
import pytest

from dedup2b.core import vectors


def test_prefetch_asks_for_every_scattered_row_in_few_calls(tmp_path, monkeypatch):
    x = np.random.default_rng(0).standard_normal((20_000, 768)).astype(np.float16)
    np.save(tmp_path / "v.npy", x)
    m = np.load(tmp_path / "v.npy", mmap_mode="r")
    row = 768 * 2
    pos = np.sort(np.r_[np.arange(100, 140), np.random.default_rng(1).choice(np.arange(1000, 20_000), 300, replace=False)])
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append((off, n, advice)))
    vectors.prefetch(m, pos)
    assert calls and all(a == os.POSIX_FADV_WILLNEED for *_, a in calls)
    covered = np.zeros(m.offset + len(x) * row, bool)
    for off, n, _ in calls:
        covered[off:off + n] = True
    for p in pos:                                             # every row's bytes asked for
        assert covered[m.offset + p * row:m.offset + (p + 1) * row].all()
    # rows closer than 64 KB share a call (the 40 consecutive ones: one), farther ones do not
    assert len(calls) == 1 + np.count_nonzero(np.diff(pos) > 65536 // row) < len(pos) - 30
    assert covered.sum() < 0.6 * len(covered)                 # not the whole file
    vectors.prefetch(np.asarray(m), pos)                      # not a memmap: nothing asked
    assert len(calls) == len(set(calls))


@pytest.mark.parametrize("consecutive", [True, False])
def test_gather_of_scattered_rows_reads_the_stored_rows(tmp_path, consecutive):
    """Rows found by arithmetic (a shard whose gids are one run: (first, count)) or by search in
    its gid column, gathered from the memory-mapped file; a gid the shard lacks is refused."""
    x = np.random.default_rng(2).standard_normal((5_000, 32)).astype(np.float16)
    np.save(tmp_path / "v.npy", x)
    m = np.load(tmp_path / "v.npy", mmap_mode="r")
    pos = np.random.default_rng(3).choice(len(x), 200, replace=False)      # unsorted, sparse
    first = 7 << 32
    gids = (first, len(x)) if consecutive else first + 2 * np.arange(len(x), dtype=np.int64)
    store = vectors.VectorStore.__new__(vectors.VectorStore)
    store.shards = {7: "00007"}
    store._open = lambda index: (gids, m)
    store.release = lambda index: None
    out = np.empty((len(pos), 32), np.float32)
    store._gather(7, first + (1 if consecutive else 2) * pos.astype(np.int64), out)
    np.testing.assert_array_equal(out, x[pos].astype(np.float32))
    with pytest.raises(KeyError, match="00007"):
        store._gather(7, np.array([first + 2 * len(x)], np.int64), out[:1])
