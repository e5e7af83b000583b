"""Model inputs for many items at once: one item's inputs (`Encoded`), grouped by token budget,
then padded into rows or packed into one row, with the attention function packed rows need."""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import QvlsearchError
from .jpeg import PendingJpeg


@dataclass
class Encoded:
    """One item (or reranker pair) as model inputs, before batching."""

    index: int
    input_ids: list[int]
    mm_token_type_ids: list[int]  # 0 text, 1 image and 2 video placeholder tokens (what M-RoPE needs)
    vision: dict[str, torch.Tensor]  # pixel_values / image_grid_thw / pixel_values_videos / video_grid_thw
    facts: dict[str, Any] = field(default_factory=dict)  # tokens, width, height, frames, duration_s
    jpeg: PendingJpeg | None = None  # decoded on the model's device when the batch is formed (no pixel_values yet)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getstate__(self) -> dict[str, Any]:
        """Tensors travel from worker processes as numpy arrays: plain bytes through the pipe."""
        bfloat16 = [k for k, v in self.vision.items() if v.dtype == torch.bfloat16]  # numpy has no bfloat16
        wire = {k: (v.view(torch.int16) if k in bfloat16 else v).numpy() for k, v in self.vision.items()}
        return {**self.__dict__, "vision": wire, "bfloat16": bfloat16}

    def __setstate__(self, state: dict[str, Any]) -> None:
        bfloat16 = state.pop("bfloat16")
        state["vision"] = {k: torch.from_numpy(v).view(torch.bfloat16) if k in bfloat16 else torch.from_numpy(v)
                           for k, v in state["vision"].items()}
        self.__dict__.update(state)


@dataclass
class Failed:
    """An item that could not be turned into model inputs."""

    index: int
    error: QvlsearchError


VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
GRID_KEYS = ("image_grid_thw", "video_grid_thw")


@dataclass
class Batch:
    """Items for one forward pass, and their padded model inputs (in pinned memory on GPUs)."""

    items: list[Encoded]
    inputs: dict[str, torch.Tensor]


RopeIndex = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # the model's get_rope_index


def collate(items: list[Encoded], pad_id: int, rope_index: RopeIndex, pin: bool) -> Batch:
    """Right-pad the items and concatenate their pixels in item order.

    There is no attention mask: attention is causal and the padding comes after every real
    token, so no real token sees it, and attention can take the fast unmasked kernels.
    """
    width = max(len(e) for e in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mm_token_type_ids = torch.zeros((len(items), width), dtype=torch.int)
    for row, e in enumerate(items):
        input_ids[row, : len(e)] = torch.tensor(e.input_ids)
        mm_token_type_ids[row, : len(e)] = torch.tensor(e.mm_token_type_ids, dtype=torch.int)
    inputs = with_vision({"input_ids": input_ids, "mm_token_type_ids": mm_token_type_ids}, items)
    inputs["position_ids"] = positions(rope_index, inputs)
    return Batch(items, pinned(inputs) if pin else inputs)


def pack(items: list[Encoded], rope_index: RopeIndex, pin: bool) -> Batch:
    """All items in one row, without padding.

    The position ids restart at each item, which is how `packed_attention` (and FlashAttention's
    own variable-length path) keeps each item's attention to itself.
    """
    rows = [{"input_ids": torch.tensor([e.input_ids]),
             "mm_token_type_ids": torch.tensor([e.mm_token_type_ids], dtype=torch.int),
             **{k: e.vision[k] for k in GRID_KEYS if k in e.vision}} for e in items]  # grids only: no pixel copies
    inputs = with_vision({
        "input_ids": torch.cat([row["input_ids"] for row in rows], dim=1),
        "mm_token_type_ids": torch.cat([row["mm_token_type_ids"] for row in rows], dim=1),
        "position_ids": torch.cat([positions(rope_index, row) for row in rows], dim=2),
    }, items)
    return Batch(items, pinned(inputs) if pin else inputs)


def with_vision(inputs: dict[str, torch.Tensor], items: list[Encoded]) -> dict[str, torch.Tensor]:
    """`inputs` and the items' pixels and grids, concatenated in item order."""
    for key in VISION_KEYS:
        parts = [e.vision[key] for e in items if key in e.vision]
        if parts:
            inputs[key] = torch.cat(parts)
    return inputs


def pinned(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors in pinned memory, for asynchronous copies to the GPU (pixels decoded there stay)."""
    return {k: v.pin_memory() if v.device.type == "cpu" else v for k, v in inputs.items()}


def positions(rope_index: RopeIndex, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Position ids as the model would compute them, (4, rows, tokens): text positions, then M-RoPE's three.

    Computing them here, while batches form, spares the model's forward pass the
    device-to-host copies its own M-RoPE code makes on GPUs.
    """
    input_ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]
    text = torch.arange(input_ids.shape[1]).expand(1, *input_ids.shape)
    if not types.any():
        return text.expand(4, -1, -1)
    rope, _ = rope_index(input_ids, mm_token_type_ids=types, image_grid_thw=inputs.get("image_grid_thw"),
                         video_grid_thw=inputs.get("video_grid_thw"))
    return torch.cat([text, rope])


PACKED_ATTENTION = "qvlsearch_packed"


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     position_ids: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention within each item of a packed row (transformers' attention-function interface).

    An item starts where the text positions restart at 0. On CUDA in 16-bit floats this is one
    call of torch's variable-length (FlashAttention) kernel; elsewhere, one SDPA call an item. Either way no
    padded or cross-item pair is computed, unlike SDPA with a block-diagonal mask.
    """
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [query.shape[2]]
    spans = list(itertools.pairwise(starts))
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head dim)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and varlen_options() is not None:
        from torch.nn.attention.varlen import varlen_attn

        if "enable_gqa" not in varlen_options() and k.shape[1] != q.shape[1]:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        q, k, v = (t.contiguous() for t in (q, k, v))  # FlashAttention's kernels want dense rows
        bounds = torch.tensor(starts, dtype=torch.int32, device=q.device)
        longest = max(b - a for a, b in spans)
        out = varlen_attn(q, k, v, bounds, bounds, longest, longest, scale=scaling, **varlen_options())
    else:
        out = torch.cat([
            torch.nn.functional.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True,
                scale=scaling, enable_gqa=True).transpose(0, 1)
            for a, b in spans
        ])
    return out[None], None


@functools.cache
def varlen_options() -> dict[str, Any] | None:
    """How this torch's `varlen_attn` is told "causal" (and to share key/value heads), or None
    without it (or with arguments this code does not know): they changed across torch versions."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    gqa = {"enable_gqa": True} if "enable_gqa" in parameters else {}
    if "window_size" in parameters:
        return {"window_size": (-1, 0), **gqa}
    if "is_causal" in parameters:
        return {"is_causal": True, **gqa}
    return None


def no_mask(*args: Any, **kwargs: Any) -> None:
    """`packed_attention` needs no mask: it finds the items from the position ids."""
    return None


def token_batches(
    encoded: Iterable[Encoded | Failed], max_tokens: int, max_items: int, window_items: int = 256,
    max_padding: float = float("inf"), packed: bool = False,
) -> Iterator[list[Encoded] | Failed]:
    """Group items into batches whose padded size stays within `max_tokens`; pass failures on at once.

    Items are sorted by length inside a window (at most `window_items` items or 2 batches'
    worth of tokens), so that memory stays bounded and the model starts early. A batch
    also ends before padding would exceed `max_padding` of its tokens. `packed` batches
    (see `pack`) have no padding: their size is the sum of the items' lengths.
    """

    def flush(pending: list[Encoded]) -> Iterator[list[Encoded]]:
        batch: list[Encoded] = []
        real = 0
        for e in sorted(pending, key=len):
            real_after = real + len(e)
            padded = real_after if packed else len(e) * (len(batch) + 1)
            if batch and (len(batch) >= max_items or padded > max_tokens or padded > (1 + max_padding) * real_after):
                yield batch
                batch, real = [], 0
            batch.append(e)
            real += len(e)
        if batch:
            yield batch

    pending: list[Encoded] = []
    tokens = 0
    for e in encoded:
        if isinstance(e, Failed):
            yield e
            continue
        pending.append(e)
        tokens += len(e)
        if len(pending) >= window_items or tokens >= 2 * max_tokens:
            yield from flush(pending)
            pending, tokens = [], 0
    yield from flush(pending)
