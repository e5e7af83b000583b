"""Reranker against the reference implementation (one pair per forward pass)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import PHOTOS
from PIL import Image
from reference import ReferenceReranker

from qvlsearch import InputError, MediaError, Reranker
from qvlsearch.batching import Encoded, collate
from qvlsearch.reranker import Prefix

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


@pytest.fixture(scope="module")
def full_path(checkpoints):
    """The tiny reranker that runs every pair's whole sequence."""
    return Reranker(str(checkpoints["reranker"]), device="cpu", share_prefix=False)


@contextlib.contextmanager
def language_model_inputs(reranker: Reranker) -> Iterator[list[tuple[int, int]]]:
    """(pairs, tokens) of each forward pass through the language model."""
    shapes: list[tuple[int, int]] = []
    hook = reranker.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    try:
        yield shapes
    finally:
        hook.remove()


def test_many_pairs_run_in_one_forward_pass(reranker):
    with language_model_inputs(reranker) as shapes:
        scores = reranker.rerank("a cat", [f"document number {i}" for i in range(20)])
    assert len(scores) == 20 and [pairs for pairs, _ in shapes] == [1, 20]  # the shared prefix, then all pairs
    with language_model_inputs(reranker) as shapes:
        reranker.rerank("a cat", ["one document"])
    assert [pairs for pairs, _ in shapes] == [1]  # nothing to share: its whole sequence at once


def test_the_shared_prefix_runs_once_and_the_batches_only_over_the_documents_tokens(reranker, full_path):
    docs = [f"document number {i} " * (1 + i % 3) for i in range(12)]
    with language_model_inputs(reranker) as shapes:
        scores = reranker.rerank("a cat", docs, batch_size=4)
    with language_model_inputs(full_path) as full_shapes:
        expected = full_path.rerank("a cat", docs, batch_size=4)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    (one, prefix), *batches = shapes
    assert one == 1 and prefix > 40  # system prompt, instruction, query
    assert [pairs for pairs, _ in batches] == [pairs for pairs, _ in full_shapes] == [4, 4, 4]
    # The tiny tokenizer merges nothing across "<Document>:", so every batch shares the whole prefix.
    assert [full - tokens for (_, tokens), (_, full) in zip(batches, full_shapes, strict=True)] == [prefix] * 3


def test_the_query_image_goes_through_the_vision_encoder_once(reranker):
    calls = []
    hook = reranker.model.visual.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        reranker.rerank({"image": CAT}, ["a cat", "a boat", "a bee"], batch_size=1)
    finally:
        hook.remove()
    assert len(calls) == 1


@pytest.mark.parametrize("query", sorted(QUERIES))
def test_shared_prefix_gives_the_scores_of_the_full_path(reranker, full_path, media, query):
    same_size_images = [{"image": str(media["frames"][0])}, {"image": str(media["frames"][1])}]  # same pad ids
    docs = documents(media) + same_size_images + [{"image": str(media["corrupt.jpg"])}]
    for batch_size in (None, 1):
        with language_model_inputs(reranker) as shapes:
            scores, errors = reranker.scores_and_errors(QUERIES[query], docs, batch_size=batch_size)
        with language_model_inputs(full_path) as full_shapes:
            expected, expected_errors = full_path.scores_and_errors(QUERIES[query], docs, batch_size=batch_size)
        assert errors.keys() == expected_errors.keys() == {len(docs) - 1}
        np.testing.assert_allclose(np.array(scores, dtype=float), np.array(expected, dtype=float), atol=1e-5)
        assert len(shapes) == len(full_shapes) + 1  # the prefix pass
        assert sum(p * t for p, t in shapes) < sum(p * t for p, t in full_shapes)


@pytest.mark.parametrize("max_length", [20, 60])
def test_shared_prefix_with_truncation_gives_the_scores_of_the_full_path(checkpoints, media, max_length):
    path = str(checkpoints["reranker"])
    ours = Reranker(path, max_length=max_length, device="cpu")
    full = Reranker(path, max_length=max_length, device="cpu", share_prefix=False)
    query = {"text": "cats and more cats " * 10, "image": BEE}
    docs = [{"text": "long text about cats " * 30}, {"image": CAT}, {"text": "short"}, {"image": media["frames"][2]}]
    for batch_size in (None, 1):
        np.testing.assert_allclose(ours.rerank(query, docs, batch_size=batch_size),
                                   full.rerank(query, docs, batch_size=batch_size), atol=1e-5)


def test_shared_length_is_the_common_prefix_of_the_ids_within_limits():
    def batch(*rows: list[int]):
        return collate([Encoded(i, row, [0] * len(row), {}) for i, row in enumerate(rows)], pad_id=0,
                       rope_index=None, pin=False)  # text only: no M-RoPE index needed

    prefix = Prefix(list(range(1, 21)), cache=None, vision_end=0, images=0, videos=0)
    pair = list(range(1, 21)) + [50, 51]
    assert Reranker.shared_length(batch(pair, pair[:19] + [99, 50]), prefix) == 19  # BPE merged ":" and the text
    assert Reranker.shared_length(batch(pair[:21]), prefix) == 20
    assert Reranker.shared_length(batch(pair[:20]), prefix) == 19  # each pair keeps its last token
    assert Reranker.shared_length(batch(pair, [1, 2, 3, 4, 5, 99]), prefix) == 0  # too few to be worth a pass
    with_image = Prefix(list(range(1, 21)), cache=None, vision_end=15, images=1, videos=0)
    assert Reranker.shared_length(batch(pair, pair[:16] + [99]), with_image) == 16
    assert Reranker.shared_length(batch(pair, pair[:12] + [99]), with_image) == 0  # the query's image cut


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


def test_fps_and_max_frames_are_checked_like_the_embedders(reranker):
    """Overrides of the call and the items' own keys, each refused in one line naming it (limits.py's ranges)."""
    from qvlsearch.errors import SettingError

    for override, message in (({"fps": 0}, "fps must be a number above 0, got 0"),
                              ({"max_frames": 1}, "max_frames must be an integer of at least 2, got 1"),
                              ({"fps": float("nan")}, "fps must be a number above 0, got nan")):
        with pytest.raises(SettingError, match=f"^{message}$"):
            reranker.rerank("a cat", ["a dog"], **override)
    with pytest.raises(InputError, match=r"^item 1: fps must be a number above 0, got -1$"):
        reranker.rerank("a cat", ["a dog", {"text": "a cow", "fps": -1}])
    assert reranker.rerank("a cat", [{"text": "a cow", "max_frames": 1}, "a dog"], on_error="skip")[0] is None
    with pytest.raises(InputError, match=r"^query: max_frames must be an integer of at least 2, got 1$"):
        reranker.rerank({"text": "a cat", "max_frames": 1}, ["a dog"])
