"""``unit_rows``: the one normaliser behind every cosine."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from delta_router.embedding.vectors import unit_rows

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 600)), elements=finite))
def test_unit_rows_are_unit_and_normalising_again_changes_no_bit(matrix):
    once = unit_rows(matrix)
    norms = np.linalg.norm(once, axis=1)
    nonzero = np.linalg.norm(matrix.astype(np.float64), axis=1) > 1e-6
    np.testing.assert_allclose(norms[nonzero], 1, atol=1e-5)
    again = unit_rows(once)
    np.testing.assert_array_equal(again[nonzero], once[nonzero])  # a saved router's rows load back exact
    np.testing.assert_array_equal(unit_rows(np.zeros_like(matrix)), 0)
