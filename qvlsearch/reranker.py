"""Reranker: relevance scores for (query, document) pairs with Qwen3-VL-Reranker."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from . import DEFAULT_RERANKER
from .errors import InputError, MediaError, QvlsearchError
from .media import LoadedMedia, VisionOptions, check_item, content_parts, load_media
from .qwen import Batch, Encoded, Failed, QwenModel, encode_or_fail, encoded_from, run_processor

log = logging.getLogger("qvlsearch")

JUDGE_PROMPT = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
# `<|im_end|>\n<|im_start|>assistant\n` closes every prompt: 5 tokens, never truncated.
CLOSING_TOKENS = 5


class Reranker(QwenModel):
    """Qwen3-VL-Reranker: score = P("yes") for a (query, document) pair, from 0 to 1.

    Many pairs run in one forward pass (batches by length); the query's media are
    decoded once and shared by all pairs.
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

        A broken query raises. With `stop_at_error`, scoring ends at the first failed document.
        """
        query = check_item({"text": query} if isinstance(query, str) else query)
        query_parts = content_parts(query, self.options, fps, max_frames)
        try:
            query_media = load_media(query_parts)
        except MediaError as exc:
            raise MediaError(f"query: {exc}") from None
        instruction = instruction or self.default_instruction

        def encode(index: int, doc: Any) -> Encoded | Failed:
            def build() -> Encoded:
                doc_item = check_item({"text": doc} if isinstance(doc, str) else doc, index)
                doc_parts = content_parts(doc_item, self.options, fps, max_frames)
                doc_media = load_media(doc_parts)
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
        with contextlib.closing(self.batches(encode, documents, batch_size)) as batches:
            for batch in batches:
                if isinstance(batch, Failed):
                    errors[batch.index] = batch.error
                    if stop_at_error:
                        break
                    continue
                for e, score in zip(batch.items, self.scores(batch), strict=True):
                    scores[e.index] = score
        return scores, dict(sorted(errors.items()))

    def scores(self, batch: Batch) -> list[float]:
        last = self.forward_last_hidden(batch)
        logits = last @ self.score_weight.to(last.device, last.dtype)
        return torch.sigmoid(logits).float().cpu().tolist()

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
