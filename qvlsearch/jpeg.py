"""JPEG photos decoded where the model runs (opt-in: `Embedder(decode_jpeg_on_device=True)`).

On a GPU, decoding, resizing and patchifying photos in worker threads is what limits
throughput. On this path a worker only reads a JPEG file's bytes and header and computes
the item's token ids from the resized size; the batch's JPEGs are then decoded, resized
and patchified together on the model's device, in the thread that forms the batches.
Only items whose one medium is a local JPEG file in RGB or L mode take this path. A photo's
EXIF orientation is applied to the decoded pixels before resizing, as on the PIL path.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional
from torchvision.io import ImageReadMode, decode_jpeg

from .errors import MediaError
from .media import (
    IMAGE_PATCH_SIZE,
    MAX_IMAGE_PIXELS,
    failure,
    is_data_uri,
    is_url,
    local_path,
    media_reason,
    vision_process,
)
from .orientation import orientation_of, turns, upright, upright_tensor

if TYPE_CHECKING:
    from .batching import Encoded

JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class PendingJpeg:
    """A JPEG file's bytes, its stored size and orientation, and the size qwen-vl-utils would resize it to."""

    source: str  # as the item gave it, for error messages
    data: bytes
    width: int  # as stored, before the orientation is applied
    height: int
    resized: tuple[int, int]  # (height, width) of the photo as shown, multiples of 32
    orientation: int = 1  # EXIF Orientation

    @property
    def shown_size(self) -> tuple[int, int]:
        """(width, height) of the photo as shown: its orientation applied."""
        return (self.height, self.width) if turns(self.orientation) else (self.width, self.height)


def read_jpeg(parts: list[dict]) -> PendingJpeg | None:
    """The item's JPEG when its only medium is one local JPEG file (by content) in RGB or L mode.

    None for anything else, or when the file cannot be read: today's path then handles it
    and reports what is wrong.
    """
    images = [p for p in parts if p["type"] == "image"]
    if len(images) != 1 or any(p["type"] == "video" for p in parts):
        return None
    part = images[0]
    source = part["image"]
    if not isinstance(source, str) or is_url(source) or is_data_uri(source):
        return None
    try:
        with open(local_path(source), "rb") as file:
            data = file.read()
        if not data.startswith(JPEG_MAGIC):
            return None
        with Image.open(io.BytesIO(data)) as image:  # the header only
            width, height = image.size
            if image.mode not in ("RGB", "L") or width * height > MAX_IMAGE_PIXELS:  # today's path says why
                return None
            orientation = orientation_of(image)
        shown_height, shown_width = (width, height) if turns(orientation) else (height, width)
        resized = vision_process.smart_resize(
            shown_height, shown_width, factor=IMAGE_PATCH_SIZE * vision_process.SPATIAL_MERGE_SIZE,
            min_pixels=part["min_pixels"], max_pixels=part["max_pixels"],
        )
    except Exception:
        return None
    return PendingJpeg(source, data, width, height, resized, orientation)


def deferred_inputs(processor: Any, conversation: list[dict], parts: list[dict]
                    ) -> tuple[dict[str, torch.Tensor], PendingJpeg] | None:
    """Token ids and image grid of an item whose JPEG is decoded later, or None (see `read_jpeg`).

    The ids are the processor's: the chat template's one image token repeated once per
    merged patch (`Qwen3VLProcessor.replace_image_token`), then the tokenizer.
    """
    jpeg = read_jpeg(parts)
    if jpeg is None:
        return None
    text = processor.apply_chat_template([conversation], add_generation_prompt=True, tokenize=False)
    token = processor.image_token
    if sum(t.count(token) for t in text) != 1:  # the user's text holds one too: the processor says what is wrong
        return None
    image_processor = processor.image_processor
    grid_h, grid_w = (side // image_processor.patch_size for side in jpeg.resized)
    tokens = grid_h * grid_w // image_processor.merge_size**2
    ids = processor.tokenizer([t.replace(token, token * tokens) for t in text], padding=False, truncation=False,
                              return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "image_grid_thw": torch.tensor([[1, grid_h, grid_w]])}, jpeg


def pil_decode(jpeg: PendingJpeg) -> torch.Tensor:
    """Decode and resize as today's path does (PIL): for JPEGs the device decoder refuses."""
    try:
        with Image.open(io.BytesIO(jpeg.data)) as image:
            image.load()
            resized = vision_process.to_rgb(upright(image, jpeg.orientation)).resize(jpeg.resized[::-1])
    except Exception as exc:
        raise failure("image", jpeg.source, media_reason(exc)) from None
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic with antialiasing, as PIL resizes: across, then down, rounding to uint8 in between.

    The same float arithmetic on every device (torchvision's uint8 resize has its own CPU
    kernel), within one or two levels of PIL's fixed-point arithmetic.
    """
    x = image[None].float()
    for size in ((x.shape[-2], width), (height, width)):
        if tuple(x.shape[-2:]) != size:
            x = functional.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
            x = x.round_().clamp_(0, 255)
    return x[0].to(torch.uint8)


def decode_resized(jpegs: list[PendingJpeg], device: torch.device) -> list[torch.Tensor | MediaError]:
    """Each JPEG decoded on `device` (PIL where the device decoder refuses it) and resized, uint8 C×H×W."""
    data = [torch.frombuffer(bytearray(j.data), dtype=torch.uint8) for j in jpegs]
    try:
        decoded: list[torch.Tensor | None] = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad file fails the whole call: find it
        decoded = []
        for one in data:
            try:
                decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
    out: list[torch.Tensor | MediaError] = []
    for jpeg, image in zip(jpegs, decoded, strict=True):
        try:
            if image is None or tuple(image.shape[-2:]) != (jpeg.height, jpeg.width):
                out.append(pil_decode(jpeg).to(device))
            else:
                out.append(resize(upright_tensor(image, jpeg.orientation), *jpeg.resized))
        except MediaError as exc:
            out.append(exc)
    return out


def decode_pending(items: list[Encoded], image_processor: Any, device: torch.device, dtype: torch.dtype
                   ) -> tuple[list[Encoded], list[MediaError]]:
    """Give the items' pending JPEGs their `pixel_values`, made on `device` by the image processor.

    Returns the items ready for `collate` (the other items' pixels moved to `device` too, so
    that they concatenate) and the errors of the items whose JPEG cannot be decoded at all.
    """
    pending = [e for e in items if e.jpeg is not None]
    # torchvision's CUDA decoder writes on its own stream into memory allocated on the caller's
    # stream without waiting for it (pytorch/vision#9606): on the model's stream it could overwrite
    # pixels the model is still reading. So decode on a stream of our own, wait for it, and tell
    # the allocator that the consuming stream uses the results.
    consumer = torch.cuda.current_stream(device) if device.type == "cuda" else None
    stream = torch.cuda.Stream(device) if consumer is not None else None
    ready: list[Encoded] = []
    errors: list[MediaError] = []
    with torch.cuda.stream(stream):  # no-op when None
        images = []
        for e, image in zip(pending, decode_resized([e.jpeg for e in pending], device), strict=True):
            if isinstance(image, MediaError):
                image.index = e.index
                errors.append(image)
            else:
                ready.append(e)
                images.append(image)
        if ready:
            pixels = image_processor(images=images, do_resize=False, return_tensors="pt")["pixel_values"].to(dtype)
            for e, part in zip(ready, pixels.split([int(e.vision["image_grid_thw"].prod()) for e in ready]),
                               strict=True):
                e.vision["pixel_values"] = part
    if stream is not None:
        stream.synchronize()
        for e in ready:
            e.vision["pixel_values"].record_stream(consumer)
    others = [e for e in items if e.jpeg is None]
    for e in others:
        if "pixel_values" in e.vision:
            e.vision["pixel_values"] = e.vision["pixel_values"].to(device)
    kept = {id(e) for e in ready + others}
    return [e for e in items if id(e) in kept], errors
