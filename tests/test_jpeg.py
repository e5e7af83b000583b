"""JPEG photos decoded on the model's device (`decode_jpeg_on_device=True`), here the CPU:
same ids, grids and facts as the PIL path, pixels within resampling noise, the same errors."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
from conftest import PHOTOS
from PIL import Image

import qvlsearch.jpeg
from qvlsearch import Embedder, MediaError
from qvlsearch.jpeg import decode_pending

JPEGS = sorted(str(p) for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
CAT, BEE = str(PHOTOS / "cat.jpg"), str(PHOTOS / "bee.jpg")
LEVEL = 1 / 255 / 0.5  # one uint8 level in pixel_values (the checkpoint normalizes with std 0.5)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """JPEGs of other kinds, made from the cat photo."""
    root = tmp_path_factory.mktemp("jpegs")
    cat = Image.open(CAT)
    cat.convert("L").save(root / "gray.jpg")
    cat.convert("CMYK").save(root / "cmyk.jpg")
    cat.resize((60, 40)).save(root / "small.jpg")  # smaller than min_pixels: scaled up
    cat.save(root / "progressive.jpg", progressive=True, quality=80)
    shutil.copy(CAT, root / "jpeg named.png")
    cat.save(root / "png named.jpg", format="PNG")
    data = (PHOTOS / "cat.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return {p.name: str(p) for p in root.iterdir()}


@pytest.fixture(scope="module")
def pair(checkpoints):
    """The PIL path and the device path, default options (the sample photos need no resizing)."""
    path = str(checkpoints["embedder"])
    return Embedder(path, device="cpu"), Embedder(path, device="cpu", decode_jpeg_on_device=True)


@pytest.fixture(scope="module")
def resizing_pair(checkpoints):
    """The same, with a pixel budget that scales every sample photo down (384x256 to 288x192)."""
    path = str(checkpoints["embedder"])
    return (Embedder(path, device="cpu", max_pixels=65536),
            Embedder(path, device="cpu", max_pixels=65536, decode_jpeg_on_device=True))


def deferred_items(files: dict[str, str]) -> list[dict]:
    return ([{"image": p} for p in JPEGS]
            + [{"image": files[n]} for n in ("gray.jpg", "small.jpg", "progressive.jpg", "jpeg named.png")]
            + [{"text": "a cat", "image": CAT}, {"image": BEE, "instruction": "Find photos of insects"}])


def test_ids_grid_and_facts_equal_the_processor_path_without_decoding(resizing_pair, files):
    default, on_device = resizing_pair
    for item in deferred_items(files):
        expected, got = default.encode(0, item), on_device.encode(0, item)
        assert got.jpeg is not None and "pixel_values" not in got.vision, item
        assert got.input_ids == expected.input_ids and got.mm_token_type_ids == expected.mm_token_type_ids
        assert torch.equal(got.vision["image_grid_thw"], expected.vision["image_grid_thw"])
        assert got.facts == expected.facts


@pytest.mark.parametrize("name", ["cmyk.jpg", "png named.jpg"])
def test_other_files_take_todays_path(pair, files, name):
    default, on_device = pair
    got = on_device.encode(0, {"image": files[name]})
    assert got.jpeg is None
    assert torch.equal(got.vision["pixel_values"], default.encode(0, {"image": files[name]}).vision["pixel_values"])
    np.testing.assert_array_equal(on_device.embed([{"image": files[name]}]), default.embed([{"image": files[name]}]))


def test_other_items_take_todays_path(pair, http_base):
    default, on_device = pair
    assert on_device.encode(0, {"image": "file://" + CAT}).jpeg is not None
    for item in [{"image": [CAT, BEE]}, {"image": Image.open(CAT)}, {"image": http_base + "/photos/cat.jpg"},
                 {"video": [CAT, BEE]}]:
        assert on_device.encode(0, item).jpeg is None
    # The image token in the user's text: the processor's error, as today.
    item = {"image": CAT, "text": "<|image_pad|>"}
    assert str(on_device.encode(0, item).error) == str(default.encode(0, item).error)


def decoded(embedder: Embedder, item: dict) -> torch.Tensor:
    encoded = embedder.encode(0, item)
    ready, errors = decode_pending([encoded], embedder.processor.image_processor, embedder.device, embedder.dtype)
    assert ready == [encoded] and errors == []
    return encoded.vision["pixel_values"]


def test_pixels_equal_the_pil_path_when_no_resizing_is_needed(pair):
    default, on_device = pair
    for path in JPEGS:
        torch.testing.assert_close(decoded(on_device, {"image": path}),
                                   default.encode(0, {"image": path}).vision["pixel_values"], atol=1e-6, rtol=0)


def test_resized_pixels_are_within_two_levels_of_pil(resizing_pair, files):
    default, on_device = resizing_pair
    for item in deferred_items(files):
        diff = (decoded(on_device, item) - default.encode(0, item).vision["pixel_values"]).abs()
        assert diff.max() <= 2 * LEVEL + 1e-6 and diff.mean() <= 0.05 * LEVEL, item


@pytest.mark.parametrize("which", ["pair", "resizing_pair"])
def test_vectors_are_within_cosine_0999_of_the_pil_path(request, files, which):
    default, on_device = request.getfixturevalue(which)
    items = deferred_items(files) + [{"image": files["cmyk.jpg"]}, {"text": "a cat"}]
    expected, got = default.embed(items), on_device.embed(items)
    cosines = (expected * got).sum(axis=1)
    assert cosines.min() >= 0.999
    if which == "pair":  # the sample photos need no resizing: the same pixels
        np.testing.assert_allclose(got[: len(JPEGS)], expected[: len(JPEGS)], atol=1e-5)


def test_a_truncated_jpeg_is_its_items_one_line_error_and_the_batch_goes_on(pair, files):
    default, on_device = pair
    items = [{"image": CAT}, {"image": files["truncated.jpg"]}, {"text": "a bee", "image": BEE}]
    assert on_device.encode(1, items[1]).jpeg is not None  # its header is fine: the decoders find out
    got = on_device.embed(items, on_error="skip")
    expected = default.embed(items, on_error="skip")
    assert np.isnan(got[1]).all() and not np.isnan(got[[0, 2]]).any()
    np.testing.assert_allclose(got[[0, 2]], expected[[0, 2]], atol=1e-5)
    [error] = [r.error for r in on_device.embed_iter(items) if r.error is not None]
    [expected_error] = [r.error for r in default.embed_iter(items) if r.error is not None]
    assert isinstance(error, MediaError) and error.index == 1
    assert str(error) == str(expected_error) and "truncated.jpg" in str(error) and "\n" not in str(error)


def test_broken_files_give_todays_errors(pair, media):
    default, on_device = pair
    items = [{"image": str(media[k])} for k in ("missing", "corrupt.jpg", "text.jpg", "empty.png")]
    items.append({"image": str(media["video"].parent)})
    errors = [str(r.error) for r in sorted(on_device.embed_iter(items), key=lambda r: r.index)]
    assert errors == [str(r.error) for r in sorted(default.embed_iter(items), key=lambda r: r.index)]


def test_a_jpeg_the_device_decoder_refuses_is_decoded_by_pil(resizing_pair, monkeypatch):
    default, on_device = resizing_pair
    refused = (PHOTOS / "bee.jpg").read_bytes()
    real = qvlsearch.jpeg.decode_jpeg

    def picky(data, **kwargs):
        if any(bytes(d.numpy()) == refused for d in (data if isinstance(data, list) else [data])):
            raise RuntimeError("unsupported JPEG")
        return real(data, **kwargs)

    monkeypatch.setattr(qvlsearch.jpeg, "decode_jpeg", picky)
    items = [{"image": CAT}, {"image": BEE}, {"image": str(PHOTOS / "cake.jpg")}]
    got, expected = on_device.embed(items), default.embed(items)
    np.testing.assert_allclose(got[1], expected[1], atol=1e-5)  # PIL decoding and resizing: today's pixels
    assert (got * expected).sum(axis=1).min() >= 0.999


def test_pending_jpegs_survive_pickling_to_worker_processes(resizing_pair):
    _, on_device = resizing_pair
    item = on_device.encode(0, {"text": "a bee", "image": BEE})
    copy = pickle.loads(pickle.dumps(item))
    assert copy.jpeg == item.jpeg and copy.input_ids == item.input_ids
    image_processor = on_device.processor.image_processor
    decode_pending([item, copy], image_processor, on_device.device, on_device.dtype)
    assert torch.equal(copy.vision["pixel_values"], item.vision["pixel_values"])


def test_worker_processes_defer_jpegs_too(checkpoints, pair, files):
    default, _ = pair
    in_processes = Embedder(str(checkpoints["embedder"]), device="cpu", processes=True, workers=1,
                            decode_jpeg_on_device=True)
    items = [{"image": CAT}, {"image": files["truncated.jpg"]}, {"text": "a cat"}, {"image": files["cmyk.jpg"]}]
    got, expected = in_processes.embed(items, on_error="skip"), default.embed(items, on_error="skip")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, atol=1e-5)
