"""Build random-weight Qwen3-VL checkpoints for offline tests and benchmarks.

The checkpoints have the Hugging Face Hub file layout of the real
Qwen3-VL-Embedding and Qwen3-VL-Reranker models (config, safetensors,
tokenizer, chat template, image and video processor configs), so they load
through exactly the same code path. Only the weights and the vocabulary are
made up.

    python -m qvlsearch.tiny OUT_DIR [--preset tiny|wide|small|2b] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Qwen's added tokens, in Qwen's order; the first 14 are special.
QWEN_ADDED_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]
NUM_SPECIAL = 14

# A ChatML template with Qwen3-VL's vision placeholders (same rendering as Qwen's for
# system/user/assistant turns whose content is a string or a list of parts).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Model shapes. "2b" is Qwen3-VL-2B's.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab=1024,
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        head_dim=16,
        mlp=128,
        mrope=[4, 2, 2],
        v_depth=2,
        v_hidden=32,
        v_heads=2,
        v_mlp=64,
        v_pos=256,
        deepstack=[0, 1],
    ),
    "small": dict(
        vocab=4096,
        hidden=512,
        layers=6,
        heads=8,
        kv_heads=4,
        head_dim=64,
        mlp=1536,
        mrope=[12, 10, 10],
        v_depth=6,
        v_hidden=384,
        v_heads=6,
        v_mlp=1536,
        v_pos=2304,
        deepstack=[1, 3, 5],
    ),
    "2b": dict(
        vocab=151936,
        hidden=2048,
        layers=28,
        heads=16,
        kv_heads=8,
        head_dim=128,
        mlp=6144,
        mrope=[24, 20, 20],
        v_depth=24,
        v_hidden=1024,
        v_heads=16,
        v_mlp=4096,
        v_pos=2304,
        deepstack=[5, 11, 17],
    ),
}

# The real 2B model's vector width (2048) on one cheap layer: for store, scale and server benchmarks.
PRESETS["wide"] = {**PRESETS["tiny"], "hidden": 2048, "layers": 1, "v_depth": 1, "deepstack": [0]}

CORPUS = """\
Represent the user's input. Retrieve images or text relevant to the user's query.
Judge whether the Document meets the requirements based on the Query and the Instruct provided.
Note that the answer can only be "yes" or "no". Given a search query, retrieve relevant candidates
that answer the query. <Instruct>: <Query>: <Document>: NULL system user assistant
A woman playing with her dog on a beach at sunset. A black cat sleeping on a chair.
Boats on a lake, a tree in the park, a cake with candles, books on a shelf, a camera lens,
a chessboard with rocks, a bee on a flower, a city street at night, mountains under snow.
The quick brown fox jumps over the lazy dog. seconds 0123456789 . , ; : ! ? ' " ( ) [ ] { } - _ / \\
"""


def build_tokenizer():
    """A byte-level BPE with Qwen's added tokens; `yes`, `no` and `assistant` are single tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator([CORPUS, "yes\nno\nassistant\nsystem\nuser\n" * 50] * 20, trainer=trainer)
    bpe.add_tokens([AddedToken(t, special=i < NUM_SPECIAL, normalized=False) for i, t in enumerate(QWEN_ADDED_TOKENS)])
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=QWEN_ADDED_TOKENS[1:NUM_SPECIAL],
        model_max_length=262144,
    )
    for word in ("yes", "no", "assistant"):
        if len(tokenizer.encode(word)) != 1:
            raise RuntimeError(f"tokenizer must encode {word!r} as a single token")
    return tokenizer


def build_processor():
    """Tokenizer, chat template and Qwen3-VL's image/video processors with the real settings."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 65536, "longest_edge": 16777216},
    )
    video_processor = Qwen3VLVideoProcessor(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 4096, "longest_edge": 25165824},
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def save_processor_like_the_hub(processor, path: Path) -> None:
    """The Hub's Qwen3-VL file layout: one file per component, chat template in chat_template.json."""
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    processor.video_processor.save_pretrained(path)
    (Path(path) / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")


def build_config(preset: str, tokenizer):
    """A Qwen3VLConfig with the preset's shapes and the tokenizer's special token ids."""
    from transformers import Qwen3VLConfig

    p = PRESETS[preset]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_ADDED_TOKENS}
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=max(p["vocab"], len(tokenizer)),
            hidden_size=p["hidden"],
            num_hidden_layers=p["layers"],
            num_attention_heads=p["heads"],
            num_key_value_heads=p["kv_heads"],
            head_dim=p["head_dim"],
            intermediate_size=p["mlp"],
            max_position_embeddings=262144,
            rms_norm_eps=1e-6,
            rope_parameters=dict(
                rope_type="default", rope_theta=5000000.0, mrope_section=p["mrope"], mrope_interleaved=True
            ),
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=p["v_depth"],
            hidden_size=p["v_hidden"],
            num_heads=p["v_heads"],
            intermediate_size=p["v_mlp"],
            out_hidden_size=p["hidden"],
            num_position_embeddings=p["v_pos"],
            deepstack_visual_indexes=p["deepstack"],
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            hidden_act="gelu_pytorch_tanh",
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_model(config, seed: int, std: float, device: str = "cpu", dtype=None):
    """Qwen3VLForConditionalGeneration with N(0, std) weights (norms stay 1).

    The default std of 0.02 makes outputs nearly independent of the input, which
    would make tests blind; 0.5 keeps them input-dependent.
    """
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, std / (param.shape[-1] / 64) ** 0.5, generator=generator)
            elif "norm" not in name:
                param.normal_(0.0, std, generator=generator)
    return model.to(dtype) if dtype is not None else model


def build_checkpoints(out_dir: Path, preset: str = "tiny", seed: int = 0, device: str = "cpu") -> dict[str, Path]:
    """Write OUT_DIR/embedder and OUT_DIR/reranker; returns their paths."""
    import torch

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    processor = build_processor()
    config = build_config(preset, processor.tokenizer)
    dtype = torch.bfloat16 if preset == "2b" else None
    paths = {}
    for offset, name in enumerate(("embedder", "reranker")):
        path = Path(out_dir) / name
        model = build_model(config, seed=seed * 2 + offset, std=0.5, device=device, dtype=dtype)
        model.save_pretrained(path)
        save_processor_like_the_hub(processor, path)
        paths[name] = path
        del model
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qvlsearch.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write embedder/ and reranker/ into")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shapes (default: tiny)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights (default: 0)")
    parser.add_argument("--device", default="cpu", help="where to build the weights (default: cpu)")
    args = parser.parse_args(argv)
    for name, path in build_checkpoints(args.out_dir, args.preset, args.seed, args.device).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
