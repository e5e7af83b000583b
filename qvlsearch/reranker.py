"""Reranker: relevance scores for (query, document) pairs with Qwen3-VL-Reranker."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from . import DEFAULT_RERANKER
from .batching import Batch, Encoded, Failed, collate
from .decoders import Decoders
from .errors import InputError, MediaError, QvlsearchError, check_setting
from .limits import LIMITS
from .media import LoadedMedia, VisionOptions, check_item, content_parts, load_media
from .qwen import QwenModel, encode_or_fail, encoded_from, run_processor

if TYPE_CHECKING:
    from transformers import DynamicCache

log = logging.getLogger("qvlsearch")

JUDGE_PROMPT = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
# `<|im_end|>\n<|im_start|>assistant\n` closes every prompt: 5 tokens, never truncated.
CLOSING_TOKENS = 5
# A shorter shared prefix is not worth its own forward pass (the system prompt alone is ~40 tokens).
MIN_SHARED_TOKENS = 8


@dataclass
class Prefix:
    """The tokens that every pair of one query starts with, and their KV cache (batch of one)."""

    input_ids: list[int]
    cache: DynamicCache
    vision_end: int  # tokens up to the query's last image/video placeholder: a usable prefix covers them
    images: int  # the query's images and videos: their grids and pixels come first in every pair
    videos: int


class Reranker(QwenModel):
    """Qwen3-VL-Reranker: score = P("yes") for a (query, document) pair, from 0 to 1.

    Many pairs run in one forward pass (batches by length); the query's media are
    decoded once and shared by all pairs. The tokens all pairs start with (system prompt,
    instruction, query) run once per call, and the batches only over the rest, on their
    KV cache (`share_prefix=False` runs every pair's whole sequence). With `decoders` (a
    `Decoders`), the query's and documents' media of its kinds are decoded in its worker
    processes, so that a crashing decoder fails only its document (or the query).
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_RERANKER,
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = None,
        max_length: int = 10240,
        min_pixels: int = 4096,
        max_pixels: int = 1843200,
        total_pixels: int = 7864320,
        fps: float = 1.0,
        max_frames: int = 64,
        default_instruction: str = "Given a search query, retrieve relevant candidates that answer the query.",
        max_batch_tokens: int | None = None,
        workers: int | None = None,
        compile: str | None = None,
        packing: bool = False,
        share_prefix: bool = True,
        decoders: Decoders | None = None,
    ):
        from transformers import Qwen3VLForConditionalGeneration

        super().__init__(
            Qwen3VLForConditionalGeneration,
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
        tokenizer = self.processor.tokenizer
        yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
        head = self.model.lm_head.weight
        self.score_weight = (head[yes] - head[no]).detach().clone()  # the yes−no row of the LM head
        self.model = self.model.model  # the LM head itself is not needed
        self.special_ids = set(tokenizer.all_special_ids)
        self.share_prefix = share_prefix
        self.decoders = decoders

    def load(self, parts: list[dict]) -> LoadedMedia:
        """Decode the media of `parts`: in the decoders' worker processes, when given."""
        return self.decoders.load(parts) if self.decoders else load_media(parts)

    def conversation(self, instruction: str, query_parts: list[dict], doc_parts: list[dict]) -> list[dict]:
        content = [{"type": "text", "text": "<Instruct>: " + instruction}, {"type": "text", "text": "<Query>:"}]
        content += query_parts + [{"type": "text", "text": "\n<Document>:"}] + doc_parts
        return [
            {"role": "system", "content": [{"type": "text", "text": JUDGE_PROMPT}]},
            {"role": "user", "content": content},
        ]

    def truncate(self, ids: list[int]) -> list[int]:
        """Drop ordinary tokens past max_length; keep special tokens and the closing tokens."""
        body, closing = ids[:-CLOSING_TOKENS], ids[-CLOSING_TOKENS:]
        if len(body) <= self.max_length:
            return ids
        budget = self.max_length - sum(t in self.special_ids for t in body)
        kept = []
        for t in body:
            if t in self.special_ids:
                kept.append(t)
            elif budget > 0:
                kept.append(t)
                budget -= 1
        return kept + closing

    def rerank(
        self,
        query: Mapping | str,
        documents: Sequence[Mapping | str],
        *,
        instruction: str | None = None,
        batch_size: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
        on_error: Literal["raise", "skip"] = "raise",
    ) -> list[float | None]:
        """Scores for `documents` against `query`, in input order.

        A plain string stands for `{"text": string}`. A broken query always raises; a
        broken document raises its `MediaError` (the default) or, with
        `on_error="skip"`, gets the score None and a logged warning.
        """
        if on_error not in ("raise", "skip"):
            raise InputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        scores, errors = self.scores_and_errors(query, documents, instruction=instruction, batch_size=batch_size,
                                                fps=fps, max_frames=max_frames, stop_at_error=on_error == "raise")
        for error in errors.values():
            if on_error == "raise":
                raise error
            log.warning("skipped document %s", error)
        return scores

    def scores_and_errors(
        self,
        query: Mapping | str,
        documents: Sequence[Mapping | str],
        *,
        instruction: str | None = None,
        batch_size: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
        stop_at_error: bool = False,
    ) -> tuple[list[float | None], dict[int, QvlsearchError]]:
        """Every document's score (None when it failed) and the error of each failed one, by index.

        A broken query, or an `fps`/`max_frames` out of range, raises. With `stop_at_error`, scoring ends at
        the first failed document.
        """
        for name, value in (("fps", fps), ("max_frames", max_frames)):
            if value is not None:
                check_setting(name, value, **LIMITS[name])
        query = check_item({"text": query} if isinstance(query, str) else query, name="query")
        query_parts = content_parts(query, self.options, fps, max_frames)
        try:
            query_media = self.load(query_parts)
        except MediaError as exc:
            raise MediaError(f"query: {exc}") from None
        instruction = instruction or self.default_instruction

        def encode(index: int, doc: Any) -> Encoded | Failed:
            def build() -> Encoded:
                doc_item = check_item({"text": doc} if isinstance(doc, str) else doc, index)
                doc_parts = content_parts(doc_item, self.options, fps, max_frames)
                doc_media = self.load(doc_parts)
                media = LoadedMedia(
                    query_parts + doc_parts,
                    query_media.images + doc_media.images,
                    query_media.videos + doc_media.videos,
                )
                inputs = run_processor(self.processor, self.conversation(instruction, query_parts, doc_parts), media)
                ids = self.truncate(inputs["input_ids"][0].tolist())
                return encoded_from(index, inputs, ids, media, self.processor, self.dtype)

            return encode_or_fail(index, build)

        scores: list[float | None] = [None] * len(documents)
        errors: dict[int, QvlsearchError] = {}
        want_prefix = self.share_prefix and not self.packing and len(documents) > 1  # packed rows hold many pairs
        prefix: Prefix | None = None
        with contextlib.closing(self.batches(encode, documents, batch_size)) as batches:
            for batch in batches:
                if isinstance(batch, Failed):
                    errors[batch.index] = batch.error
                    if stop_at_error:
                        break
                    continue
                if want_prefix:  # once, when the first pairs are ready (the others are encoded meanwhile)
                    prefix, want_prefix = self.shared_prefix(instruction, query_parts, query_media), False
                for e, score in zip(batch.items, self.scores(batch, prefix), strict=True):
                    scores[e.index] = score
        return scores, dict(sorted(errors.items()))

    def scores(self, batch: Batch, prefix: Prefix | None = None) -> list[float]:
        length = self.shared_length(batch, prefix) if prefix else 0
        last = self.forward_suffix_last_hidden(batch, prefix, length) if length else self.forward_last_hidden(batch)
        logits = last @ self.score_weight.to(last.device, last.dtype)
        return torch.sigmoid(logits).float().cpu().tolist()

    @torch.inference_mode()
    def shared_prefix(self, instruction: str, query_parts: list[dict], query_media: LoadedMedia) -> Prefix | None:
        """The KV cache of the prompt up to "<Document>:", from one forward pass (with the query's media).

        These are the ids of the pair with no document, less the closing tokens: each batch then
        uses as many of them as all its pairs start with (BPE may merge the last ":" with a
        document's first characters, truncation may cut the query). None when the model did not
        fill the cache.
        """
        from transformers import DynamicCache

        inputs = run_processor(self.processor, self.conversation(instruction, query_parts, []), query_media)
        ids = self.truncate(inputs["input_ids"][0].tolist())[:-CLOSING_TOKENS]
        e = encoded_from(0, inputs, ids, query_media, self.processor, self.dtype)
        inputs = collate([e], self.pad_id, self.model.get_rope_index, pin=False).inputs
        cache = DynamicCache(config=self.model.config)
        self.run_model({k: v.to(self.device) for k, v in inputs.items()}, cache=cache)
        if cache.get_seq_length() != len(ids):
            return None
        vision_end = max((i + 1 for i, kind in enumerate(e.mm_token_type_ids) if kind), default=0)
        return Prefix(ids, cache, vision_end, len(query_media.images), len(query_media.videos))

    @staticmethod
    def shared_length(batch: Batch, prefix: Prefix) -> int:
        """How many of the prefix's tokens all pairs of `batch` start with, leaving each pair its last
        token; 0 when that is too few, or would leave some of the query's media out of the prefix."""
        ids = batch.inputs["input_ids"]
        width = min(len(prefix.input_ids), ids.shape[1])
        same = (ids[:, :width] == torch.tensor(prefix.input_ids[:width])).cumprod(dim=1).sum(dim=1)
        length = min(int(same.min()), min(len(e) for e in batch.items) - 1)
        return length if length >= max(MIN_SHARED_TOKENS, prefix.vision_end) else 0

    @torch.inference_mode()
    def forward_suffix_last_hidden(self, batch: Batch, prefix: Prefix, length: int) -> torch.Tensor:
        """`forward_last_hidden` that runs only the tokens after the first `length`, on the prefix's cache.

        The query's pixels, in the cache already, are left out; the positions are the whole
        pairs' (computed as the batch formed), from `length` on.
        """
        from transformers import DynamicCache

        suffix = {k: batch.inputs[k][..., length:] for k in ("input_ids", "mm_token_type_ids", "position_ids")}
        suffix |= self.document_vision(batch, prefix)
        kept = [(layer.keys[:, :, :length], layer.values[:, :, :length]) for layer in prefix.cache.layers]
        cache = DynamicCache(kept, config=self.model.config)
        cache.batch_repeat_interleave(len(batch.items))
        suffix = {k: v.to(self.device, non_blocking=True) for k, v in suffix.items()}
        hidden = self.run_model(suffix, cache=cache)
        last = torch.tensor([len(e) - 1 - length for e in batch.items], device=hidden.device)
        return hidden[torch.arange(len(batch.items), device=hidden.device), last]

    @staticmethod
    def document_vision(batch: Batch, prefix: Prefix) -> dict[str, torch.Tensor]:
        """The pixels and grids of the batch's documents; each pair's first ones are the query's."""
        vision = {}
        for pixels, grids, in_query in (("pixel_values", "image_grid_thw", prefix.images),
                                        ("pixel_values_videos", "video_grid_thw", prefix.videos)):
            if grids not in batch.inputs:
                continue
            keep = torch.cat([torch.arange(len(e.vision.get(grids, ()))) >= in_query for e in batch.items])
            if keep.all():
                vision |= {pixels: batch.inputs[pixels], grids: batch.inputs[grids]}
            elif keep.any():
                rows = keep.repeat_interleave(batch.inputs[grids].prod(-1))
                vision |= {pixels: batch.inputs[pixels][rows], grids: batch.inputs[grids][keep]}
        return vision

    def process(self, inputs: Mapping[str, Any]) -> list[float]:
        """Drop-in for the official `Qwen3VLReranker.process`."""
        query, documents = inputs.get("query") or {}, inputs.get("documents") or []
        if not query or not documents:
            return []
        return self.rerank(
            query,
            documents,
            instruction=inputs.get("instruction"),
            fps=inputs.get("fps"),
            max_frames=inputs.get("max_frames"),
        )
