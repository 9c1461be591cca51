"""Unit vectors: every cosine in the project (index, router, clustering) is an inner product of these.

One normaliser, sklearn's ``normalize`` (zero rows stay zero), so FAISS, the router and the metrics
agree on what a cosine is.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from sklearn.preprocessing import normalize


def unit_rows(vectors: ArrayLike) -> np.ndarray:
    """``[N, d]`` (or one ``[d]`` vector) -> ``[N, d]`` float32, C-contiguous, rows of L2 norm 1."""
    matrix = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    return np.ascontiguousarray(normalize(matrix))
