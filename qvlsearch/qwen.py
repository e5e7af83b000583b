"""What the Embedder and the Reranker share: loading a Qwen3-VL checkpoint, turning one
item into model inputs, and feeding the model batches (see batching.py) from other threads,
so that media decoding overlaps the forward pass; optionally through compiled layers."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from . import check_compile_mode
from .batching import (
    PACKED_ATTENTION,
    VISION_KEYS,
    Batch,
    Encoded,
    Failed,
    collate,
    no_mask,
    pack,
    packed_attention,
    token_batches,
)
from .errors import InputError, MediaError, ModelLoadError
from .estimate import bf16_warning
from .jpeg import decode_pending
from .media import LoadedMedia, VisionOptions
from .parallel import WorkerProcesses, in_background, prefetch

log = logging.getLogger("qvlsearch")


def pick_device(device: str | torch.device | None) -> torch.device:
    """`None`/"auto" means the first CUDA GPU when there is one, else Apple Silicon's GPU (MPS), else the CPU.
    On MPS, operators it lacks run on the CPU (see PYTORCH_ENABLE_MPS_FALLBACK in qvlsearch/__init__.py)."""
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {str(device)!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device mps asked for, but this machine has no Apple Silicon GPU that PyTorch can "
                             "use (MPS); use --device cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device} asked for, but no CUDA GPU is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device} asked for, but this machine has {torch.cuda.device_count()} "
                             f"CUDA GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None) -> torch.dtype:
    """bfloat16 on CUDA GPUs, float16 on MPS (whose bfloat16 needs macOS 14 and is slower), float32 on CPUs,
    unless asked otherwise."""
    if dtype is None or dtype == "auto":
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        return getattr(torch, dtype)
    return dtype


def pick_attention(device: torch.device, attn_implementation: str | None) -> str:
    """flash-attention 2 on GPUs where it is installed, else SDPA."""
    if attn_implementation:
        return attn_implementation
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_checkpoint(
    model_class: type, name_or_path: str, *, dtype: torch.dtype, attn: str, device: torch.device
) -> tuple[Any, Any]:
    """Load (model, processor) from a Hub id (through the HF cache) or a local folder."""
    from transformers import AutoProcessor

    from .hub import require_model

    require_model(name_or_path)
    # the command line shows this one on a terminal: a large model takes a while to load, with nothing else to see
    logging.getLogger("qvlsearch.load").info("loading the model %s on %s", name_or_path, device)
    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
        model, info = model_class.from_pretrained(
            name_or_path, dtype=dtype, attn_implementation=attn, output_loading_info=True
        )
    except (OSError, ValueError) as exc:
        hint = (
            "it is not a folder here, and not in the Hugging Face cache; download it with "
            f"`hf download {name_or_path}` or pass a local checkpoint folder"
        )
        if os.path.isdir(name_or_path):
            hint = "the folder is not a complete Qwen3-VL checkpoint"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {hint} ({first_line})") from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("lm_head.weight")]
    if missing:
        raise ModelLoadError(
            f"cannot load model {name_or_path!r}: the checkpoint lacks {len(missing)} weights "
            f"(e.g. {sorted(missing)[0]}); is it a Qwen3-VL checkpoint?"
        )
    try:
        return model.to(device).eval(), processor
    except RuntimeError as exc:  # a bad device ordinal, or out of memory
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot put model {name_or_path!r} on {device}: {first_line}") from None



def encode_or_fail(index: int, build: Callable[[], Encoded]) -> Encoded | Failed:
    """Run `build`; any error becomes this item's `Failed`, never the whole run's."""
    try:
        return build()
    except InputError as exc:
        return Failed(index, exc)
    except MediaError as exc:
        exc.index = index
        return Failed(index, exc)
    except Exception as exc:  # the processor rejects some inputs with assorted errors
        return Failed(index, MediaError(f"cannot prepare input: {type(exc).__name__}: {exc}", index=index))


def run_processor(processor: Any, conversation: list[dict], media: LoadedMedia) -> dict[str, Any]:
    """Chat template + image/video processors for one conversation; no padding, no truncation."""
    text = processor.apply_chat_template([conversation], add_generation_prompt=True, tokenize=False)
    if not media.images and not media.videos:
        # The tokenizer alone gives the same ids without the processor's Python overhead (0.93
        # instead of 1.36 ms for a 100-word text), time that holds the lock the GPU thread needs.
        return processor.tokenizer(text, padding=False, truncation=False, return_tensors="pt")
    video_options = {}
    if media.videos:
        # Frames are already sampled and resized by qwen-vl-utils' rules (do_resize=False).
        video_options = dict(
            videos=[frames for frames, _ in media.videos],
            video_metadata=[meta for _, meta in media.videos],
            cap_pixels_per_frame=True,
        )
    return processor(
        text=text,
        images=media.images or None,
        do_resize=False,
        do_sample_frames=False,
        padding=False,
        truncation=False,
        return_tensors="pt",
        **video_options,
    )


def encoded_from(
    index: int, inputs: dict[str, Any], input_ids: list[int], media: LoadedMedia, processor: Any, dtype: torch.dtype
) -> Encoded:
    """Pack processor output (with possibly truncated ids) into an Encoded item.

    Pixels are cast to the model's dtype here, in the worker, as the model would cast them
    (on a GPU this halves what is copied to it).
    """
    image, video = processor.image_token_id, processor.video_token_id
    return Encoded(
        index=index,
        input_ids=input_ids,
        mm_token_type_ids=[1 if t == image else 2 if t == video else 0 for t in input_ids],
        vision={k: inputs[k].to(dtype) if inputs[k].is_floating_point() else inputs[k]
                for k in VISION_KEYS if inputs.get(k) is not None},
        facts={"tokens": len(input_ids), **media.facts()},
    )


class QwenModel:
    """Common set-up of the Embedder and the Reranker: device, dtype, checkpoint, options."""

    def __init__(
        self,
        model_class: type,
        model_name_or_path: str,
        *,
        device: str | None,
        dtype: Any,
        attn_implementation: str | None,
        max_length: int,
        options: VisionOptions,
        default_instruction: str,
        max_batch_tokens: int | None,
        workers: int | None,
        compile: str | None = None,
        packing: bool = False,
    ):
        self.model_name_or_path = str(model_name_or_path)
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        if self.device.type == "cpu" and self.dtype == torch.bfloat16 and (warning := bf16_warning()):
            log.warning(warning)
        self.attn_implementation = pick_attention(self.device, attn_implementation)
        self.max_length = max_length
        self.options = options
        self.default_instruction = default_instruction
        self.max_batch_tokens = max_batch_tokens or (32768 if self.device.type == "cuda" else 4096)
        self.workers = workers if workers is not None else min(16, os.cpu_count() or 1)
        # Padding is computed like real tokens. On a CPU, where one item already keeps the cores
        # busy, it is pure loss (16 mixed texts: 2.24 s in padded batches, 1.84 s one by one,
        # 1.81 s with at most 10% padding). On the H200 the mixed embedding set ran at 38 items/s
        # without this cap and 33 with it: a GPU does better with fewer, fuller batches.
        self.max_padding = 0.1 if self.device.type == "cpu" else float("inf")
        self.packing = packing
        self.model, self.processor = load_checkpoint(
            model_class,
            self.model_name_or_path,
            dtype=self.dtype,
            attn=self.attn_implementation,
            device=self.device,
        )
        if packing and self.attn_implementation != "flash_attention_2":  # which finds the items by itself
            from transformers import AttentionInterface, AttentionMaskInterface

            AttentionInterface.register(PACKED_ATTENTION, packed_attention)
            AttentionMaskInterface.register(PACKED_ATTENTION, no_mask)
            base = getattr(self.model, "model", self.model)  # the Reranker's generation model holds the base model
            base.language_model.config._attn_implementation = PACKED_ATTENTION  # the vision tower keeps its own
        tokenizer = self.processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.compile_mode = check_compile_mode(compile)
        self.compiled_layers: list[torch.nn.Module] = []
        self.first_compiled_batch_s: float | None = None  # the compile warm-up, for reports

    def batches(self, encode: Callable[[int, Any], Encoded | Failed], items: Iterable[Any], batch_size: int | None,
                processes: WorkerProcesses | None = None) -> Iterator[Batch | Failed]:
        """Token-budget batches of `encode(i, item)`, and failures as they come.

        Worker threads (or `processes` running `encode`) encode the items and a background
        thread forms and pads the batches, so both go on while the model runs.
        """
        encoded = prefetch(encode, items, workers=self.workers, ahead=2 * self.workers + 2, processes=processes)
        batches = (b for group in self.token_batches(encoded, batch_size) for b in self.formed(group))
        return in_background(batches, depth=2)

    def formed(self, group: list[Encoded] | Failed) -> Iterator[Batch | Failed]:
        """A failure as it is; a group as its batch, once its pending JPEGs are decoded on the model's
        device (a JPEG that cannot be decoded at all becomes its item's failure)."""
        if isinstance(group, Failed):
            yield group
            return
        if any(e.jpeg is not None for e in group):
            group, errors = decode_pending(group, self.processor.image_processor, self.device, self.dtype)
            yield from (Failed(error.index, error) for error in errors)
        if group:
            yield self.collate(group)

    def collate(self, items: list[Encoded]) -> Batch:
        pin = self.device.type == "cuda"
        if self.packing:
            return pack(items, self.model.get_rope_index, pin)
        return collate(items, self.pad_id, self.model.get_rope_index, pin)

    def token_batches(self, encoded: Iterable[Encoded | Failed], batch_size: int | None = None
                      ) -> Iterator[list[Encoded] | Failed]:
        """`token_batches` with this model's token budget and padding cap."""
        return token_batches(encoded, self.max_batch_tokens, batch_size or 64, max_padding=self.max_padding,
                             packed=self.packing)

    def repeated_layers(self) -> list[torch.nn.Module]:
        """The vision blocks and decoder layers: where the time goes, and one compiled graph serves each kind."""
        return [*self.model.visual.blocks, *self.model.language_model.layers]

    def compile_layers(self) -> None:
        """Regional compilation: each repeated layer under `torch.compile` (dynamic shapes), so that
        the elementwise work between matrix products is fused. Compiling happens at the first
        batch, and again for a few new kinds of shapes (dynamo's recompile limit bounds it)."""
        self.compiled_layers = self.repeated_layers()
        for layer in self.compiled_layers:
            layer.compile(dynamic=True, mode=None if self.compile_mode == "default" else self.compile_mode)

    def run_eagerly(self, reason: BaseException) -> None:
        """Undo `compile_layers` after compilation failed, saying why in one line."""
        first_line = str(reason).strip().splitlines()[0] if str(reason).strip() else ""
        log.warning("torch.compile failed (%s%s); running the model without it",
                    type(reason).__name__, f": {first_line[:200]}" if first_line else "")
        for layer in self.compiled_layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set; None is the eager call
        self.compiled_layers = []
        self.compile_mode = None

    def run_model(self, inputs: dict[str, torch.Tensor], **options: Any) -> torch.Tensor:
        """The model's last hidden states for `inputs` (on the device), through the compiled layers
        when `compile` asked for them: compiled at the first call, and eager from a failure on."""
        if self.compile_mode and not self.compiled_layers:  # at the first call: the Reranker swaps its model
            self.compile_layers()
            started = time.perf_counter()
            hidden = self.run_model(inputs, **options)
            self.first_compiled_batch_s = time.perf_counter() - started
            log.info("first batch with compiled layers: %.1f s, compiling included", self.first_compiled_batch_s)
            return hidden
        if not self.compiled_layers:
            return self.model(**inputs, **options).last_hidden_state
        cache = options.get("cache")
        cached = cache.get_seq_length() if cache is not None else 0
        try:
            return self.model(**inputs, **options).last_hidden_state
        except Exception as exc:  # the compiler's many error types; the same batch then runs eagerly
            self.run_eagerly(exc)
            for layer in cache.layers if cache is not None else []:  # what the failed call added goes
                if layer.is_initialized:
                    layer.keys, layer.values = layer.keys[..., :cached, :], layer.values[..., :cached, :]
            return self.model(**inputs, **options).last_hidden_state

    @torch.inference_mode()
    def forward_last_hidden(self, batch: Batch) -> torch.Tensor:
        """Final hidden state of the last token of each item (the pooled token)."""
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.inputs.items()}
        hidden = self.run_model(inputs, use_cache=False)  # no KV cache: nothing reads it
        if hidden.shape[0] == 1:  # one item, or packed items one after another
            ends = torch.tensor([len(e) for e in batch.items], device=hidden.device).cumsum(0) - 1
            return hidden[0, ends]
        last = torch.tensor([len(e) - 1 for e in batch.items], device=hidden.device)
        return hidden[torch.arange(len(batch.items), device=hidden.device), last]
