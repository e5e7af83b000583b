"""int8 and binary codes: round trips, and recall against float search on real (tiny-model) vectors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qvlsearch.quantize import Int8Quantizer, binary_encode, hamming_distances

COLORS = ["red", "blue", "green", "black", "white", "yellow"]
THINGS = ["cat", "dog", "boat", "cake", "camera", "tree", "bee", "chess board"]
PLACES = ["on a beach", "in the snow", "at night", "on a table", "by a lake", "in a city"]


@pytest.fixture(scope="module")
def corpus(embedder) -> np.ndarray:
    texts = [f"a {c} {t} {p}" for c, t, p in itertools.product(COLORS, THINGS, PLACES)]
    return embedder.embed([{"text": t} for t in texts])


def recall_at_k(exact: np.ndarray, approx: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(e[:k]) & set(a[:k])) / k for e, a in zip(exact, approx, strict=True)]))


def test_int8_round_trip_error_is_within_half_a_step(corpus):
    quantizer = Int8Quantizer.fit(corpus)
    codes = quantizer.encode(corpus)
    assert codes.dtype == np.uint8 and codes.shape == corpus.shape
    step = (quantizer.hi - quantizer.lo) / 256
    assert np.all(np.abs(quantizer.decode(codes) - corpus) <= step / 2 + 1e-6)
    np.testing.assert_array_equal(quantizer.encode(quantizer.decode(codes)), codes)


def test_int8_clips_values_outside_the_calibrated_range(corpus):
    quantizer = Int8Quantizer.fit(corpus)
    codes = quantizer.encode(np.stack([quantizer.lo - 1, quantizer.hi + 1]))
    assert (codes[0] == 0).all() and (codes[1] == 255).all()


def test_int8_calibration_needs_vectors():
    with pytest.raises(ValueError, match="non-empty"):
        Int8Quantizer.fit(np.zeros((0, 8)))


def test_binary_round_trip_keeps_signs(corpus):
    codes = binary_encode(corpus)
    assert codes.shape == (len(corpus), corpus.shape[1] // 8) and codes.dtype == np.uint8
    np.testing.assert_array_equal(np.unpackbits(codes, axis=1)[:, : corpus.shape[1]], corpus > 0)
    assert (hamming_distances(codes[:3], codes[:3]).diagonal() == 0).all()
    assert hamming_distances(codes[:1], binary_encode(-corpus[:1]))[0, 0] == corpus.shape[1] - (corpus[0] == 0).sum()


def test_recall_against_float_search(corpus):
    queries, base = corpus[::7], corpus
    exact = np.argsort(-(queries @ base.T), axis=1)
    quantizer = Int8Quantizer.fit(base)
    int8_order = np.argsort(-(queries @ quantizer.decode(quantizer.encode(base)).T), axis=1)
    hamming = hamming_distances(binary_encode(queries), binary_encode(base))
    shortlist = np.argsort(hamming, axis=1, kind="stable")[:, :40]
    rescored = np.take_along_axis(shortlist, np.argsort(-np.einsum("qd,qkd->qk", queries, base[shortlist]), 1), 1)
    int8_recall, binary_recall = recall_at_k(exact, int8_order), recall_at_k(exact, rescored)
    print(f"recall@10 vs float on {len(base)} vectors: int8 {int8_recall:.3f}, binary+rescore(40) {binary_recall:.3f}")
    assert int8_recall >= 0.95
    assert binary_recall >= 0.85
