"""int8 and binary indexes as the store builds them: recall against float search on real (tiny-model) vectors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qvlsearch.quantize import binary_encode
from qvlsearch.store import build_faiss

COLORS = ["red", "blue", "green", "black", "white", "yellow"]
THINGS = ["cat", "dog", "boat", "cake", "camera", "tree", "bee", "chess board"]
PLACES = ["on a beach", "in the snow", "at night", "on a table", "by a lake", "in a city"]


@pytest.fixture(scope="module")
def corpus(embedder) -> np.ndarray:
    texts = [f"a {c} {t} {p}" for c, t, p in itertools.product(COLORS, THINGS, PLACES)]
    return embedder.embed([{"text": t} for t in texts])


def recall_at_k(exact: np.ndarray, approx: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(e[:k]) & set(a[:k])) / k for e, a in zip(exact, approx, strict=True)]))


def test_binary_codes_keep_signs(corpus):
    codes = binary_encode(corpus)
    assert codes.shape == (len(corpus), corpus.shape[1] // 8) and codes.dtype == np.uint8
    np.testing.assert_array_equal(np.unpackbits(codes, axis=1)[:, : corpus.shape[1]], corpus > 0)


def test_recall_against_float_search(corpus):
    queries, base, dim = corpus[::7], corpus, corpus.shape[1]
    exact = np.argsort(-(queries @ base.T), axis=1)
    _, int8_order = build_faiss(base, dim, "int8", "SQ8").search(queries, 10)
    _, shortlist = build_faiss(base, dim, "binary", "BinaryFlat").search(binary_encode(queries), 40)
    rescored = np.take_along_axis(shortlist, np.argsort(-np.einsum("qd,qkd->qk", queries, base[shortlist]), 1), 1)
    int8_recall, binary_recall = recall_at_k(exact, int8_order), recall_at_k(exact, rescored)
    print(f"recall@10 vs float on {len(base)} vectors: int8 {int8_recall:.3f}, binary+rescore(40) {binary_recall:.3f}")
    assert int8_recall >= 0.95
    assert binary_recall >= 0.85
