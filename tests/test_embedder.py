"""Embedder against the reference implementation, on real files and real tiny checkpoints."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PHOTOS
from PIL import Image
from reference import ReferenceEmbedder

from qvlsearch import Embedder, InputError, MediaError, ModelLoadError

CAT, BEE, BOATS = str(PHOTOS / "cat.jpg"), str(PHOTOS / "bee.jpg"), str(PHOTOS / "boats on a lake.png")


def every_kind(media) -> list[dict]:
    """One item of each input kind the model card lists, plus mixtures and the empty item."""
    return [
        {"text": "a cat sleeping on a chair"},
        {"image": CAT},
        {"image": Image.open(BOATS)},
        {"text": "a bee on a flower", "image": BEE},
        {"video": str(media["video"])},
        {"video": [str(p) for p in media["frames"]]},
        {"video": [Image.open(p) for p in media["frames"][:3]]},
        {"text": "a moving square", "video": str(media["video2"])},
        {},
        {"text": "find the cat", "instruction": "Retrieve images relevant to the query"},
        {"image": [CAT, BEE], "text": ["two", "photos"]},
    ]


@pytest.fixture(scope="module", params=["tiny", "foreign"])
def model_pair(request, checkpoints, foreign_checkpoints):
    path = str((checkpoints if request.param == "tiny" else foreign_checkpoints)["embedder"])
    return Embedder(path, device="cpu"), ReferenceEmbedder(path)


def test_matches_reference_batched_and_one_by_one(model_pair, media):
    ours, reference = model_pair
    items = every_kind(media)
    expected_batched = reference.process(items)
    expected_single = np.concatenate([reference.process([item]) for item in items])
    got = ours.process(items)
    assert got.dtype == np.float32 and got.shape == (len(items), ours.dim)
    np.testing.assert_allclose(got, expected_batched, atol=1e-5)
    np.testing.assert_allclose(got, expected_single, atol=1e-5)
    for i, item in enumerate(items):
        np.testing.assert_allclose(ours.process([item])[0], expected_single[i], atol=1e-5)


def test_matryoshka_dim_is_truncated_then_renormalized(model_pair, media):
    ours, reference = model_pair
    items = every_kind(media)[:5]
    full = reference.process(items)
    expected = full[:, :32] / np.linalg.norm(full[:, :32], axis=1, keepdims=True)
    got = ours.embed(items, dim=32)
    assert got.shape == (5, 32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_vectors_do_not_depend_on_batch_neighbours_or_batch_size(embedder, media):
    items = every_kind(media) * 2
    singles = np.concatenate([embedder.embed([item]) for item in items])
    for batch_size in (1, 3, 64):
        np.testing.assert_allclose(embedder.embed(items, batch_size=batch_size), singles, atol=1e-5)


def test_results_keep_input_order_despite_length_sorting(embedder):
    texts = [{"text": "word " * n} for n in (40, 1, 25, 3, 60, 2, 10)]
    batched = embedder.embed(texts)
    for i, item in enumerate(texts):
        np.testing.assert_allclose(batched[i], embedder.embed([item])[0], atol=1e-5)
    assert len({tuple(np.round(v, 4)) for v in batched}) == len(texts)


def test_unnormalized_vectors_have_model_scale(embedder):
    raw = embedder.embed([{"text": "hello"}], normalize=False)
    unit = embedder.embed([{"text": "hello"}])
    np.testing.assert_allclose(raw / np.linalg.norm(raw), unit, atol=1e-6)
    assert abs(np.linalg.norm(raw) - 1) > 1e-3


def test_pil_image_equals_its_file(embedder):
    from_path = embedder.embed([{"image": CAT}])
    from_pil = embedder.embed([{"image": Image.open(CAT)}])
    from_pathlib = embedder.embed([{"image": Path(CAT)}])
    np.testing.assert_allclose(from_pil, from_path, atol=1e-6)
    np.testing.assert_allclose(from_pathlib, from_path, atol=1e-6)


def test_image_url_equals_local_file(embedder, http_base):
    url = http_base + "/photos/cat.jpg"
    np.testing.assert_allclose(embedder.embed([{"image": url}]), embedder.embed([{"image": CAT}]), atol=1e-6)


def test_video_url_equals_local_file(embedder, http_base):
    local = Path(__file__).resolve().parent.parent / "sample_data" / "videos" / "cat pan.mp4"
    url = http_base + "/videos/cat%20pan.mp4"
    np.testing.assert_allclose(embedder.embed([{"video": url}]), embedder.embed([{"video": str(local)}]), atol=1e-6)


def test_instruction_changes_the_vector_and_gets_final_punctuation(embedder):
    plain, inst, inst_dot, blank = embedder.embed(
        [
            {"text": "a cat"},
            {"text": "a cat", "instruction": "Find pets"},
            {"text": "a cat", "instruction": "Find pets."},
            {"text": "a cat", "instruction": "   "},
        ]
    )
    assert np.dot(plain, inst) < 0.9999
    np.testing.assert_allclose(inst, inst_dot, atol=1e-6)
    np.testing.assert_allclose(blank, plain, atol=1e-6)


def test_modalities_give_distinct_vectors(embedder, media):
    vectors = embedder.embed(every_kind(media))
    sims = vectors @ vectors.T
    off_diagonal = sims[~np.eye(len(vectors), dtype=bool)]
    assert off_diagonal.max() < 0.999


BROKEN = {
    "missing file": lambda m: ({"image": str(m["missing"])}, "no such file"),
    "corrupt jpeg": lambda m: ({"image": str(m["corrupt.jpg"])}, "not a readable image"),
    "zero bytes": lambda m: ({"image": str(m["empty.png"])}, "not a readable image"),
    "text named .jpg": lambda m: ({"image": str(m["text.jpg"])}, "not a readable image"),
    "corrupt video": lambda m: ({"video": str(m["corrupt.mp4"])}, "video"),
    "one-frame video": lambda m: ({"video": str(m["one-frame.mp4"])}, "at least 2"),
    "dead url": lambda m: ({"image": "http://127.0.0.1:9/nothing.jpg"}, "cannot fetch"),
    "directory": lambda m: ({"image": str(m["video"].parent)}, "directory"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_item_raises_an_error_naming_it(embedder, media, case):
    item, reason = BROKEN[case](media)
    with pytest.raises(MediaError) as info:
        embedder.embed([{"text": "fine"}, item])
    assert info.value.index == 1
    assert str(info.value).startswith("item 1: ")
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


def test_http_404_is_reported(embedder, http_base):
    with pytest.raises(MediaError, match="HTTP 404"):
        embedder.embed([{"image": http_base + "/photos/nope.jpg"}])


@pytest.mark.parametrize(
    "item, message",
    [
        ("just a string", "must be a dict"),
        ({"text": 42}, "text must be a string"),
        ({"image": 3.5}, "image must be a path"),
        ({"imgae": CAT}, "unknown key"),
        ({"video": [[]]}, "video must be"),
        ({"video": 5}, "video must be"),
    ],
)
def test_wrong_types_are_input_errors(embedder, item, message):
    with pytest.raises(InputError, match=message):
        embedder.embed([item])


def test_skip_keeps_good_rows_and_reports_bad_ones(embedder, media, caplog):
    items = [{"text": "one"}, {"image": str(media["corrupt.jpg"])}, {"image": CAT}, {"text": 7}]
    with caplog.at_level(logging.WARNING, logger="qvlsearch"):
        got = embedder.embed(items, on_error="skip")
    assert np.isnan(got[1]).all() and np.isnan(got[3]).all()
    np.testing.assert_allclose(got[0], embedder.embed([items[0]])[0], atol=1e-5)
    np.testing.assert_allclose(got[2], embedder.embed([items[2]])[0], atol=1e-5)
    assert "corrupt.jpg" in caplog.text and "item 3" in caplog.text


def test_embed_iter_streams_every_item_once(embedder, media):
    items = [{"text": f"text {i}"} for i in range(10)] + [{"image": str(media["missing"])}]
    results = list(embedder.embed_iter(items))
    assert sorted(r.index for r in results) == list(range(11))
    failed = [r for r in results if r.error is not None]
    assert [r.index for r in failed] == [10] and failed[0].vector is None


@pytest.mark.parametrize("dim", [0, 31, 65])
def test_out_of_range_dim_is_refused(embedder, dim):
    with pytest.raises(InputError, match="dim must be between 32"):
        embedder.embed([{"text": "x"}], dim=dim)


def test_long_text_is_truncated_to_max_length(checkpoints):
    short = Embedder(str(checkpoints["embedder"]), max_length=24, device="cpu")
    reference = ReferenceEmbedder(str(checkpoints["embedder"]), max_length=24)
    items = [{"text": "a very long text about cats " * 40}, {"text": "short"}]
    np.testing.assert_allclose(short.embed(items), reference.process(items), atol=1e-5)


def test_truncation_never_cuts_an_image(checkpoints):
    short = Embedder(str(checkpoints["embedder"]), max_length=24, device="cpu")
    with pytest.raises(MediaError, match="would cut an image or video"):
        short.embed([{"image": CAT}])


def test_hub_layout_and_headless_layout_load_the_same_weights(checkpoints, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    full = Qwen3VLForConditionalGeneration.from_pretrained(checkpoints["embedder"])
    full.model.save_pretrained(tmp_path / "headless")
    Qwen3VLProcessor.from_pretrained(checkpoints["embedder"]).save_pretrained(tmp_path / "headless")
    items = [{"text": "a cat"}, {"image": CAT}]
    np.testing.assert_allclose(
        Embedder(str(tmp_path / "headless"), device="cpu").embed(items),
        Embedder(str(checkpoints["embedder"]), device="cpu").embed(items),
        atol=1e-6,
    )


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache"):
        Embedder("no-such-org/no-such-model")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="not a complete Qwen3-VL checkpoint"):
        Embedder(str(tmp_path))


def test_float32_and_sdpa_on_cpu(embedder):
    import torch

    assert embedder.device.type == "cpu" and embedder.dtype == torch.float32
    assert embedder.attn_implementation == "sdpa"
    assert next(embedder.model.parameters()).dtype == torch.float32


def test_worker_processes_give_the_same_vectors_and_errors_as_threads(checkpoints, embedder, media):
    items = every_kind(media) + [{"image": str(media["corrupt.jpg"])}, {"text": 7}]
    in_processes = Embedder(str(checkpoints["embedder"]), processes=True, workers=2, device="cpu")
    got = in_processes.embed(items, on_error="skip")
    expected = embedder.embed(items, on_error="skip")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    errors = {r.index: r.error for r in in_processes.embed_iter(items) if r.error is not None}
    assert sorted(errors) == [len(items) - 2, len(items) - 1]
    assert isinstance(errors[len(items) - 2], MediaError) and "corrupt.jpg" in str(errors[len(items) - 2])
    assert isinstance(errors[len(items) - 1], InputError)


def test_encoded_items_survive_pickling_in_bfloat16(checkpoints):
    bf16 = Embedder(str(checkpoints["embedder"]), dtype="bfloat16")
    item = bf16.encode(0, {"text": "a bee", "image": BEE})
    assert item.vision["pixel_values"].dtype == torch.bfloat16  # cast in the worker, as the model would
    copy = pickle.loads(pickle.dumps(item))
    assert copy.input_ids == item.input_ids and copy.facts == item.facts
    assert all(torch.equal(copy.vision[k], item.vision[k]) and copy.vision[k].dtype == item.vision[k].dtype
               for k in item.vision)


def test_text_items_skip_the_processor_but_get_its_ids(embedder):
    for text in ["a cat", "Ünïcödé — 東京の猫 🐈", "tabs\tand\nnew lines  ", "<|im_start|> looks special", "x " * 600]:
        item = embedder.encode(0, {"text": text})
        conversation = embedder.item_encoder.conversation({}, [{"type": "text", "text": text}])
        templated = embedder.processor.apply_chat_template([conversation], add_generation_prompt=True, tokenize=False)
        expected = embedder.processor(text=templated, padding=False, truncation=False, return_tensors="pt")
        assert item.input_ids == expected["input_ids"][0].tolist()
        assert item.mm_token_type_ids == [0] * len(item.input_ids) and item.vision == {}


class KillsItsWorker:
    """Unpickled in a worker process, it ends that process at once, as a crash in a decoder would."""

    def __reduce__(self):
        return os._exit, (1,)


def test_a_dead_worker_process_costs_only_the_item_that_killed_it(checkpoints):
    in_processes = Embedder(str(checkpoints["embedder"]), processes=True, workers=1, device="cpu")
    expected = in_processes.embed([{"text": "a cat"}])
    for process in list(in_processes.worker_processes.pool._processes.values()):
        process.kill()  # between calls, as the kernel's out-of-memory killer would: new workers start
        process.join()
    np.testing.assert_array_equal(in_processes.embed([{"text": "a cat"}]), expected)
    items = [{"text": "a dog"}, {"image": KillsItsWorker()}, {"text": "a bee"}]
    with pytest.raises(MediaError, match=r"^item 1: image KillsItsWorker: the decoder crashed \(exit code 1\)"):
        in_processes.embed(items)
    got = in_processes.embed(items, on_error="skip")
    assert np.isnan(got[1]).all()
    np.testing.assert_array_equal(got[[0, 2]], in_processes.embed([items[0], items[2]]))
    np.testing.assert_array_equal(in_processes.embed([{"text": "a cat"}]), expected)
