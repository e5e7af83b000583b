"""Reranker against the reference implementation (one pair per forward pass)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import PHOTOS
from PIL import Image
from reference import ReferenceReranker

from qvlsearch import InputError, MediaError, Reranker

CAT, BEE, CAKE = str(PHOTOS / "cat.jpg"), str(PHOTOS / "bee.jpg"), str(PHOTOS / "cake.jpg")


def documents(media) -> list[dict]:
    return [
        {"text": "A black cat sleeps on a wooden chair."},
        {"text": "Boats on a calm lake at dawn, " * 3},
        {"image": CAT},
        {"image": Image.open(CAKE)},
        {"text": "a bee", "image": BEE},
        {"video": str(media["video"])},
        {"video": [str(p) for p in media["frames"][:4]]},
        {},
        {"text": "cat"},
    ]


QUERIES = {
    "text": {"text": "a cat"},
    "image": {"image": CAT},
    "text+image": {"text": "this photo, but at night", "image": BEE},
    "video": {"video": str(PHOTOS.parent / "videos" / "cat pan.mp4")},
}


@pytest.fixture(scope="module", params=["tiny", "foreign"])
def model_pair(request, checkpoints, foreign_checkpoints):
    path = str((checkpoints if request.param == "tiny" else foreign_checkpoints)["reranker"])
    return Reranker(path, device="cpu"), ReferenceReranker(path)


@pytest.mark.parametrize("query", sorted(QUERIES))
def test_matches_reference_for_every_kind_of_query_and_document(model_pair, media, query):
    ours, reference = model_pair
    inputs = {"query": QUERIES[query], "documents": documents(media), "instruction": "Find the cat."}
    expected = reference.process(inputs)
    np.testing.assert_allclose(ours.process(inputs), expected, atol=1e-5)
    one_pair_per_batch = ours.rerank(inputs["query"], inputs["documents"], instruction="Find the cat.", batch_size=1)
    np.testing.assert_allclose(one_pair_per_batch, expected, atol=1e-5)


def test_default_instruction_fps_and_max_frames_follow_the_official_inputs(model_pair, media):
    ours, reference = model_pair
    inputs = {
        "query": {"text": "moving square"},
        "documents": [{"video": str(media["video"])}],
        "fps": 2.0,
        "max_frames": 8,
    }
    np.testing.assert_allclose(ours.process(inputs), reference.process(inputs), atol=1e-5)
    assert ours.process({**inputs, "fps": 4.0}) != ours.process(inputs)


def test_many_pairs_run_in_one_forward_pass(reranker):
    calls = []
    hook = reranker.model.register_forward_hook(lambda module, args, kwargs_out: calls.append(1))
    try:
        scores = reranker.rerank("a cat", [f"document number {i}" for i in range(20)])
    finally:
        hook.remove()
    assert len(scores) == 20 and len(calls) == 1


def test_scores_are_probabilities_in_input_order(reranker):
    docs = ["the cat sat on the mat", "x", "a long document " * 30, "cat"]
    scores = reranker.rerank("cat", docs)
    assert all(0.0 <= s <= 1.0 for s in scores)
    for i, doc in enumerate(docs):
        assert scores[i] == pytest.approx(reranker.rerank("cat", [doc])[0], abs=1e-5)
    assert len(set(np.round(scores, 5))) == len(docs)


def test_instruction_changes_scores(reranker):
    docs = ["a cat", "a boat"]
    assert reranker.rerank("cat", docs) != reranker.rerank("cat", docs, instruction="Find boats.")


def test_truncation_keeps_special_and_closing_tokens(checkpoints, media):
    path = str(checkpoints["reranker"])
    ours, reference = Reranker(path, max_length=40, device="cpu"), ReferenceReranker(path, max_length=40)
    inputs = {
        "query": {"text": "cat"},
        "documents": [{"text": "long text about cats " * 30}, {"image": CAT}, {"text": "short"}],
    }
    np.testing.assert_allclose(ours.process(inputs), reference.process(inputs), atol=1e-5)


def test_broken_document_raises_naming_it(reranker, media):
    with pytest.raises(MediaError, match=r"^item 1: image .*corrupt\.jpg.*not a readable image"):
        reranker.rerank("cat", [{"text": "ok"}, {"image": str(media["corrupt.jpg"])}])


def test_skip_scores_broken_documents_none(reranker, media, caplog):
    docs = [{"text": "ok"}, {"video": str(media["corrupt.mp4"])}, {"image": CAT}, 12]
    with caplog.at_level(logging.WARNING, logger="qvlsearch"):
        scores = reranker.rerank("cat", docs, on_error="skip")
    assert scores[1] is None and scores[3] is None
    assert scores[0] == pytest.approx(reranker.rerank("cat", [docs[0]])[0], abs=1e-5)
    assert scores[2] == pytest.approx(reranker.rerank("cat", [docs[2]])[0], abs=1e-5)
    assert "corrupt.mp4" in caplog.text and "item 3" in caplog.text


def test_broken_query_raises(reranker, media):
    with pytest.raises(MediaError, match="^query: image"):
        reranker.rerank({"image": str(media["missing"])}, ["a"])
    with pytest.raises(InputError):
        reranker.rerank(42, ["a"])


def test_empty_query_or_documents_give_no_scores(reranker):
    assert reranker.process({"query": {}, "documents": [{"text": "a"}]}) == []
    assert reranker.process({"query": {"text": "a"}, "documents": []}) == []
