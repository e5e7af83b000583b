"""The offline checkpoints: Hub file layout, Qwen's vocabulary conventions, real shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qvlsearch.tiny import PRESETS, QWEN_ADDED_TOKENS, build_config, build_tokenizer, main


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_added_tokens_are_qwens_in_qwens_order(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in QWEN_ADDED_TOKENS]
    assert ids == list(range(ids[0], ids[0] + 26))
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert {"<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|im_start|>"} <= set(tokenizer.all_special_tokens)
    assert "<think>" not in tokenizer.all_special_tokens


def test_yes_no_and_the_closing_prompt_tokenize_like_qwen(tokenizer):
    assert len(tokenizer.encode("yes")) == 1 and len(tokenizer.encode("no")) == 1
    assert len(tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n")) == 5


def test_checkpoint_has_the_hub_file_layout(checkpoints):
    for name in ("embedder", "reranker"):
        files = {p.name for p in checkpoints[name].iterdir()}
        assert {
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.json",
            "preprocessor_config.json",
            "video_preprocessor_config.json",
        } <= files
    config = json.loads((checkpoints["embedder"] / "config.json").read_text())
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    image = json.loads((checkpoints["embedder"] / "preprocessor_config.json").read_text())
    assert (image["patch_size"], image["merge_size"], image["temporal_patch_size"]) == (16, 2, 2)
    assert image["image_mean"] == [0.5, 0.5, 0.5] and image["image_std"] == [0.5, 0.5, 0.5]


def test_2b_preset_has_qwen3_vl_2b_shapes(tokenizer):
    config = build_config("2b", tokenizer)
    text, vision = config.text_config, config.vision_config
    assert (
        text.hidden_size,
        text.num_hidden_layers,
        text.num_attention_heads,
        text.head_dim,
        text.num_key_value_heads,
        text.intermediate_size,
        text.vocab_size,
    ) == (2048, 28, 16, 128, 8, 6144, 151936)
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size, vision.out_hidden_size) == (
        24,
        1024,
        16,
        4096,
        2048,
    )
    assert list(vision.deepstack_visual_indexes) == [5, 11, 17]
    assert set(PRESETS) == {"tiny", "wide", "small", "2b"}


def test_random_weights_keep_outputs_input_dependent(embedder):
    vectors = embedder.embed([{"text": t} for t in ("a cat", "a boat", "the tax code of 1987", "")])
    sims = vectors @ vectors.T
    assert sims[~np.eye(4, dtype=bool)].max() < 0.98


def test_command_line_writes_both_checkpoints(tmp_path, capsys):
    assert main([str(tmp_path), "--seed", "3"]) == 0
    assert (tmp_path / "embedder" / "model.safetensors").exists()
    assert (tmp_path / "reranker" / "model.safetensors").exists()
    assert "embedder:" in capsys.readouterr().out
