import numpy as np
import pytest

from dedup2b.core.arrays import unique


@pytest.mark.parametrize("seed", range(4))
def test_unique_answers_as_numpy(seed):
    """core.arrays.unique (one sort) against np.unique: values, first-occurrence index, inverse,
    counts, for every combination of the flags, on ints with many repeats, few, none, and floats."""
    rng = np.random.default_rng(seed)
    for a in (rng.integers(0, 40, 3000), rng.integers(-10**12, 10**12, 5000), np.zeros(0, np.int64),
              np.array([5]), rng.integers(0, 3, 17).astype(np.int32), rng.standard_normal(300).round(1)):
        for flags in range(8):
            kw = dict(return_index=bool(flags & 1), return_inverse=bool(flags & 2), return_counts=bool(flags & 4))
            want, got = np.unique(a, **kw), unique(a, **kw)
            want, got = (want if isinstance(want, tuple) else (want,)), (got if isinstance(got, tuple) else (got,))
            assert len(want) == len(got)
            for w, g in zip(want, got):
                assert np.array_equal(w.ravel(), g)


def test_ahead_gives_every_result_in_order_computed_on_its_own_thread():
    """core.io.ahead: fn over the items in order, each computed on a thread of its own while the
    caller holds the one before; an item's error reaches the caller at that item."""
    import threading

    from dedup2b.core.io import ahead
    main = threading.get_ident()
    seen = []

    def fn(x):
        seen.append((x, threading.get_ident() != main))
        if x == 7:
            raise ValueError("item 7")
        return x * x
    assert list(ahead(fn, range(5))) == [0, 1, 4, 9, 16]
    assert [x for x, _ in seen] == list(range(5)) and all(other for _, other in seen)
    assert list(ahead(fn, [])) == []
    got = []
    with pytest.raises(ValueError, match="item 7"):
        for r in ahead(fn, range(5, 10)):
            got.append(r)
    assert got == [25, 36]


def test_npy_files_are_opened_one_thread_at_a_time(tmp_path, monkeypatch):
    """numpy parses a .npy header with ast, which CPython 3.11 cannot do in two threads at once
    (SystemError: AST constructor recursion depth mismatch): core.io.load_npy opens every .npy and
    .npz under one lock, and gives what np.load gives."""
    import threading

    from dedup2b.core import io
    x = np.arange(12, dtype=np.float16).reshape(3, 4)
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", x=x, y=x[:1])
    real, inside, seen = np.load, [], []

    def spy(*args, **kwargs):
        seen.append(io._NPY_LOCK.locked())
        inside.append(threading.get_ident())
        return real(*args, **kwargs)
    monkeypatch.setattr(np, "load", spy)
    got = [None] * 8
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, io.load_npy(tmp_path / ("a.npy" if i % 2 else "b.npz"),
                                                                                mmap=bool(i % 4 == 1))))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8 and all(seen)
    for i, g in enumerate(got):
        if i % 2:
            np.testing.assert_array_equal(g, x)
        else:
            assert sorted(g) == ["x", "y"] and np.array_equal(g["y"], x[:1])
    assert isinstance(got[1], np.memmap) and not isinstance(got[3], np.memmap)
