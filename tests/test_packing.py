"""`packing=True`: a batch is one row of items without padding, attention kept within each item;
vectors and scores are those of padded batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PHOTOS

from qvlsearch import Embedder, Reranker
from qvlsearch.batching import Batch, packed_attention


def mixed_items(media) -> list[dict]:
    return [
        {"text": "a cat on a chair"},
        {"text": "boats on a calm lake at dawn " * 30},
        {"image": str(PHOTOS / "cat.jpg")},
        {"text": "a bee", "image": str(PHOTOS / "bee.jpg")},
        {"video": str(media["video"])},
        {"video": [str(p) for p in media["frames"][:4]]},
        {},
        {"image": str(media["corrupt.jpg"])},  # fails: its neighbours must not notice
        {"text": "x"},
    ]


@pytest.fixture(scope="module")
def packed_embedder(checkpoints):
    return Embedder(str(checkpoints["embedder"]), device="cpu", packing=True)


def test_packed_batches_give_the_padded_vectors(packed_embedder, embedder, media):
    items = mixed_items(media)
    expected = embedder.embed(items, on_error="skip")
    np.testing.assert_allclose(packed_embedder.embed(items, on_error="skip"), expected, atol=1e-5, equal_nan=True)
    one_each = packed_embedder.embed(items, on_error="skip", batch_size=1)
    np.testing.assert_allclose(one_each, expected, atol=1e-5, equal_nan=True)
    assert np.isnan(expected[7]).all() and not np.isnan(np.delete(expected, 7, axis=0)).any()


def test_a_packed_batch_is_one_row_without_padding(packed_embedder, media):
    items = [it for it in mixed_items(media) if "corrupt" not in str(it.get("image", ""))]
    encoded = [packed_embedder.encode(i, item) for i, item in enumerate(items)]
    [group] = list(packed_embedder.token_batches(encoded))  # one batch: the tiny items fit the CPU budget
    batch = packed_embedder.collate(group)
    assert batch.inputs["input_ids"].shape == (1, sum(len(e) for e in encoded))
    text_positions = batch.inputs["position_ids"][0, 0]
    assert (text_positions == 0).sum() == len(items)  # each item starts again at position 0


def test_packed_reranker_gives_the_padded_scores(checkpoints, reranker, media):
    packed = Reranker(str(checkpoints["reranker"]), device="cpu", packing=True)
    documents = [{"text": "A black cat sleeps on a chair."}, {"image": str(PHOTOS / "cat.jpg")},
                 {"video": str(media["video"])}, {"text": "boats " * 40}, {}]
    for query in ({"text": "a cat"}, {"image": str(PHOTOS / "bee.jpg")}):
        np.testing.assert_allclose(packed.rerank(query, documents), reranker.rerank(query, documents), atol=1e-5)


def test_packed_attention_equals_sdpa_with_a_block_diagonal_causal_mask():
    """Three items of 5, 1 and 7 tokens; 4 query heads share 2 key/value heads."""
    torch.manual_seed(0)
    lengths = [5, 1, 7]
    total = sum(lengths)
    query, key, value = torch.randn(1, 4, total, 8), torch.randn(1, 2, total, 8), torch.randn(1, 2, total, 8)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    out, _ = packed_attention(torch.nn.Module(), query, key, value, None, scaling=0.3, position_ids=positions)
    item = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = (item[:, None] == item[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=0.3,
                                                                enable_gqa=True)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-6, rtol=1e-5)


def test_packing_and_jpeg_decoding_on_the_device_go_together(checkpoints):
    items = [{"image": str(PHOTOS / name)} for name in ("cat.jpg", "bee.jpg", "cake.jpg")] + [{"text": "a cat"}]
    path = str(checkpoints["embedder"])
    padded = Embedder(path, device="cpu", decode_jpeg_on_device=True).embed(items)
    packed = Embedder(path, device="cpu", decode_jpeg_on_device=True, packing=True).embed(items)
    np.testing.assert_allclose(packed, padded, atol=1e-5)


def test_padded_batches_bring_their_position_ids_so_the_model_computes_none(embedder, media, monkeypatch):
    """M-RoPE positions are computed as batches form (on GPUs the model's own code syncs with the host)."""
    items = [{"text": "a cat"}, {"image": str(PHOTOS / "cat.jpg")}, {"video": str(media["video"])}]
    batch = embedder.collate([embedder.encode(i, item) for i, item in enumerate(items)])
    assert batch.inputs["position_ids"].shape == (4, *batch.inputs["input_ids"].shape)
    calls = []
    model = embedder.model
    monkeypatch.setattr(model, "get_rope_index", lambda *a, **k: calls.append(1) or type(model).get_rope_index(
        model, *a, **k))
    with_positions = embedder.forward_last_hidden(batch)
    assert calls == []
    without = {k: v for k, v in batch.inputs.items() if k != "position_ids"}
    torch.testing.assert_close(embedder.forward_last_hidden(Batch(batch.items, without)), with_positions)
    assert calls == [1]  # the model's own computation, for comparison
