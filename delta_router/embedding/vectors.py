"""Unit vectors: every cosine in the project (index, router, clustering) is an inner product of these.

One normaliser, so FAISS, the router and the metrics agree on what a cosine is. Plain numpy rather
than sklearn's ``normalize``: it sits on the search hot path, where sklearn's input checks cost
more than the arithmetic (tens of microseconds per query).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

UNIT_TOLERANCE = 1e-5  # |norm - 1| below which a row counts as unit already (float32 sums of squares round)


def unit_rows(vectors: ArrayLike) -> np.ndarray:
    """``[N, d]`` (or one ``[d]`` vector) -> ``[N, d]`` float32, C-contiguous, rows of L2 norm 1
    (zero rows stay zero).

    Idempotent: a row already of norm 1 within ``UNIT_TOLERANCE`` is kept bit for bit, so unit rows
    saved and normalised again on load (a router's profiles, a background's tasks) come back exact;
    dividing by a norm that float32 rounding puts an ulp off 1 would move them by an ulp.
    """
    matrix = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    norms = np.sqrt((matrix * matrix).sum(axis=1, keepdims=True))  # = np.linalg.norm, 2 us less per call
    norms[np.abs(norms - 1) <= UNIT_TOLERANCE] = 1
    out = matrix / np.maximum(norms, np.float32(1e-12))
    return out if out.flags.c_contiguous else np.ascontiguousarray(out)
