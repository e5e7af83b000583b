"""Binary codes of vectors: the sign of each value, 8 dimensions per byte (32x smaller than float32).

A `--quantize binary` index keeps these codes in a FAISS binary index, which compares them by
Hamming distance; the searcher then re-scores the best candidates with the full vectors.
(int8 is FAISS's own SQ8 codec, chosen by the index factory string.)
"""

from __future__ import annotations

import numpy as np


def binary_encode(vectors: np.ndarray) -> np.ndarray:
    """(N, D) float to (N, ceil(D/8)) uint8: one bit per dimension, set where the value is > 0."""
    return np.packbits(np.asarray(vectors) > 0, axis=1)
