"""Embedder: text, images, videos and mixtures of them to vectors with Qwen3-VL-Embedding."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import unicodedata
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
import torch

from . import DEFAULT_EMBEDDER
from .batching import Batch, Encoded, Failed
from .decoders import Decoders, crash_reason
from .errors import InputError, MediaError, QvlsearchError
from .jpeg import deferred_inputs
from .media import LoadedMedia, VisionOptions, check_item, content_parts, describe, load_media
from .pages import PdfPage
from .parallel import WorkerProcesses
from .qwen import QwenModel, encode_or_fail, encoded_from, run_processor

log = logging.getLogger("qvlsearch")

MIN_DIM = 32


@dataclass
class Embedding:
    """The outcome for one input item: its vector, or the error that stopped it."""

    index: int
    vector: np.ndarray | None
    error: QvlsearchError | None = None
    facts: dict[str, Any] = field(default_factory=dict)  # tokens, width, height, frames, duration_s
    batch_size: int = 1  # the items of the forward pass it came from (which share its time)


def with_final_punctuation(instruction: str) -> str:
    """The official models' rule: an instruction ends with a punctuation mark."""
    instruction = instruction.strip()
    if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
        instruction += "."
    return instruction


@dataclass
class ItemEncoder:
    """Turns one item into model inputs. It holds no model, so worker processes can run it."""

    processor: Any
    options: VisionOptions
    max_length: int
    default_instruction: str
    dtype: torch.dtype
    decode_jpeg_on_device: bool = False  # JPEG files: read here, decoded when batched (see jpeg.py)
    decoders: Decoders | None = None  # media decoded in worker processes (never set on a copy sent to one)

    def __call__(self, index: int, item: Any) -> Encoded | Failed:
        def build() -> Encoded:
            parts = content_parts(check_item(item, index), self.options)
            conversation = self.conversation(item, parts)
            deferred = deferred_inputs(self.processor, conversation, parts) if self.decode_jpeg_on_device else None
            if deferred is not None:
                inputs, jpeg = deferred
                media = LoadedMedia(parts, [], [], [jpeg.shown_size])
            else:
                jpeg, media = None, self.decoders.load(parts) if self.decoders else load_media(parts)
                inputs = run_processor(self.processor, conversation, media)
            ids = inputs["input_ids"][0].tolist()
            if len(ids) > self.max_length:
                ids = self.truncate(ids)
            encoded = encoded_from(index, inputs, ids, media, self.processor, self.dtype)
            encoded.jpeg = jpeg
            return encoded

        return encode_or_fail(index, build)

    def conversation(self, item: Mapping, parts: list[dict]) -> list[dict]:
        instruction = with_final_punctuation(item.get("instruction") or "") or self.default_instruction
        return [
            {"role": "system", "content": [{"type": "text", "text": instruction}]},
            {"role": "user", "content": parts},
        ]

    def truncate(self, ids: list[int]) -> list[int]:
        """Keep the first max_length tokens (as the official tokenizer call does), never half an image."""
        vision = (self.processor.image_token_id, self.processor.video_token_id)
        if any(t in vision for t in ids[self.max_length :]):
            raise MediaError(
                f"input is {len(ids)} tokens, over max_length={self.max_length}, and truncating would cut "
                "an image or video; lower max_pixels/total_pixels/max_frames or raise max_length"
            )
        return ids[: self.max_length]


def crashed(index: int, item: Any, how: str) -> Failed:
    """The failure of an item whose worker process died of it, alone (with `processes=True`)."""
    key = next((k for k in ("video", "image") if isinstance(item, Mapping) and item.get(k) is not None), None)
    source = item[key] if key else None
    if isinstance(source, list) and len(source) == 1:
        source = source[0]
    named = describe(source) if isinstance(source, (str, os.PathLike, PdfPage)) else type(source).__name__
    name = "" if key is None else f"{named}: " if isinstance(source, PdfPage) else f"{key} {named}: "
    reason = crash_reason(how)
    return Failed(index, MediaError(name + reason, index=index, reason=reason))


class Embedder(QwenModel):
    """Qwen3-VL-Embedding: multimodal objects in, L2-normalized float32 vectors out.

    Items are dicts with any of `text`, `image`, `video`, `instruction`, `fps`,
    `max_frames` (see README). Media are decoded in worker threads (or, with
    `processes=True`, whole items are encoded in worker processes: faster on a GPU) while the
    model runs, and items are batched by token count; a vector never depends on its batch
    neighbours. With `decoders` (a `Decoders`), the threads have the media of its kinds
    decoded in its worker processes, so that a crashing decoder fails only its item; with
    `processes=True`, that holds for every item. With
    `decode_jpeg_on_device=True`, items that are one local JPEG file are decoded, resized
    and patchified on the model's device instead, a batch at a time (for GPUs, where the
    CPU side is the limit); vectors then differ from the PIL path's by resampling noise.
    `compile="default"` (or "reduce-overhead", "max-autotune") runs the model's layers
    under `torch.compile` after a warm-up; if compiling fails, it runs them as before.
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_EMBEDDER,
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = None,
        max_length: int = 8192,
        min_pixels: int = 4096,
        max_pixels: int = 1843200,
        total_pixels: int = 7864320,
        fps: float = 1.0,
        max_frames: int = 64,
        default_instruction: str = "Represent the user's input.",
        max_batch_tokens: int | None = None,
        workers: int | None = None,
        processes: bool = False,
        compile: str | None = None,
        packing: bool = False,
        decode_jpeg_on_device: bool = False,
        decoders: Decoders | None = None,
    ):
        from transformers import Qwen3VLModel

        super().__init__(
            Qwen3VLModel,
            model_name_or_path,
            device=device,
            dtype=dtype,
            attn_implementation=attn_implementation,
            max_length=max_length,
            default_instruction=default_instruction,
            max_batch_tokens=max_batch_tokens,
            workers=workers,
            compile=compile,
            packing=packing,
            options=VisionOptions(min_pixels, max_pixels, total_pixels, fps, max_frames),
        )
        self.dim = self.model.config.text_config.hidden_size
        self.item_encoder = ItemEncoder(self.processor, self.options, max_length, default_instruction, self.dtype,
                                        decode_jpeg_on_device, None if processes else decoders)
        self.processes = processes

    def with_options(self, options: VisionOptions) -> Embedder:
        """This model with other media settings (resolution, frames), sharing its weights: `eval` compares them."""
        other = copy.copy(self)
        other.options = options
        other.item_encoder = dataclasses.replace(self.item_encoder, options=options)
        other.__dict__.pop("worker_processes", None)  # its own, started on first use
        return other

    def encode(self, index: int, item: Any) -> Encoded | Failed:
        """One item to model inputs (runs in a worker); errors become `Failed`."""
        return self.item_encoder(index, item)

    @cached_property
    def worker_processes(self) -> WorkerProcesses | None:
        """With `processes=True`, the worker processes, started on first use; else None."""
        if not self.processes:
            return None
        pool = WorkerProcesses(self.item_encoder, self.workers, crashed=crashed)
        weakref.finalize(self, pool.shutdown)
        return pool

    def stop_workers(self) -> None:
        """Stop the worker processes, if any run (an idle watcher's memory); the next item starts them again."""
        if self.__dict__.get("worker_processes") is not None:  # started: the cached property was read
            self.worker_processes.shutdown()

    def check_dim(self, dim: int | None) -> None:
        if dim is not None and not (MIN_DIM <= dim <= self.dim):
            raise InputError(f"dim must be between {MIN_DIM} and the model's hidden size {self.dim}, got {dim}")

    def embed_iter(
        self, items: Iterable[Any], *, dim: int | None = None, normalize: bool = True, batch_size: int | None = None
    ) -> Iterator[Embedding]:
        """Stream `Embedding`s as batches finish (not in input order); memory stays bounded."""
        self.check_dim(dim)
        with contextlib.closing(self.batches(self.encode, items, batch_size, self.worker_processes)) as batches:
            for batch in batches:
                if isinstance(batch, Failed):
                    yield Embedding(batch.index, None, batch.error)
                    continue
                vectors = self.vectors(batch, dim=dim, normalize=normalize)
                yield from (Embedding(e.index, v, facts=e.facts, batch_size=len(batch.items))
                            for e, v in zip(batch.items, vectors, strict=True))

    def vectors(self, batch: Batch, *, dim: int | None, normalize: bool) -> np.ndarray:
        pooled = self.forward_last_hidden(batch).float()
        if dim is not None:
            pooled = pooled[:, :dim]
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.cpu().numpy()

    def embed(
        self,
        items: Iterable[Any],
        *,
        dim: int | None = None,
        normalize: bool = True,
        batch_size: int | None = None,
        on_error: Literal["raise", "skip"] = "raise",
    ) -> np.ndarray:
        """Vectors for `items`, one row each, in input order.

        `dim` keeps the first `dim` values (Matryoshka) and renormalizes. With
        `on_error="skip"`, a broken item's row is NaN and its error is logged as a
        warning; with "raise" (the default) the first broken item raises its error.
        """
        if on_error not in ("raise", "skip"):
            raise InputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        items = list(items)
        out = np.full((len(items), dim or self.dim), np.nan, dtype=np.float32)
        with contextlib.closing(self.embed_iter(items, dim=dim, normalize=normalize, batch_size=batch_size)) as it:
            for result in it:
                if result.error is None:
                    out[result.index] = result.vector
                elif on_error == "raise":
                    raise result.error
                else:
                    log.warning("skipped %s", result.error)
        return out

    def process(self, inputs: list[dict[str, Any]], normalize: bool = True) -> np.ndarray:
        """Drop-in for the official `Qwen3VLEmbedder.process`: (N, hidden) float32 vectors."""
        return self.embed(inputs, normalize=normalize)
