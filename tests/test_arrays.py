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
