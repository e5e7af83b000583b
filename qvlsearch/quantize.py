"""Compact codes for stored vectors: int8 (4x smaller) and binary (32x smaller).

int8 works as FAISS's SQ8 and sentence-transformers' int8 do: each dimension gets its
own range [lo, hi], calibrated on a sample of real vectors, split into 256 equal steps;
a value is stored as the index of its step and read back as the step's centre. Values
outside the calibrated range are clipped. Binary keeps only the sign of each value,
8 dimensions per byte; compare binary codes by Hamming distance, then rescore the best
candidates with full vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVELS = 256


@dataclass(frozen=True)
class Int8Quantizer:
    """Per-dimension ranges for int8 codes (store `lo` and `hi` beside the codes)."""

    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def fit(cls, sample: np.ndarray) -> Int8Quantizer:
        """Calibrate the ranges on a sample of vectors (N, D)."""
        sample = np.asarray(sample, dtype=np.float32)
        if sample.ndim != 2 or len(sample) == 0:
            raise ValueError(f"calibration needs a non-empty (N, D) array, got shape {sample.shape}")
        lo, hi = sample.min(axis=0), sample.max(axis=0)
        hi = np.where(hi > lo, hi, lo + 1e-6)  # a constant dimension still gets a valid range
        return cls(lo.astype(np.float32), hi.astype(np.float32))

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """(N, D) float32 to (N, D) uint8 step indices."""
        scaled = (np.asarray(vectors, dtype=np.float32) - self.lo) / (self.hi - self.lo) * LEVELS
        return np.clip(np.floor(scaled), 0, LEVELS - 1).astype(np.uint8)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(N, D) uint8 back to float32 step centres."""
        return self.lo + (codes.astype(np.float32) + 0.5) / LEVELS * (self.hi - self.lo)


def binary_encode(vectors: np.ndarray) -> np.ndarray:
    """(N, D) float to (N, ceil(D/8)) uint8: one bit per dimension, set where the value is > 0."""
    return np.packbits(np.asarray(vectors) > 0, axis=1)


def hamming_distances(query_codes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """(Q, B) and (N, B) packed codes to (Q, N) numbers of differing bits."""
    return np.unpackbits(query_codes[:, None, :] ^ codes[None, :, :], axis=2).sum(axis=2, dtype=np.int32)
