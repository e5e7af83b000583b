"""Shared fixtures: real tiny checkpoints, real media files, a local HTTP server."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

import pytest

# Tests never download: set before huggingface_hub is imported (it reads these once).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "sample_data"
PHOTOS = SAMPLE_DATA / "photos"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The project's `tiny` embedder and reranker."""
    from qvlsearch.tiny import build_checkpoints

    return build_checkpoints(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def foreign_checkpoints(tmp_path_factory, checkpoints) -> dict[str, Path]:
    """Qwen3-VL checkpoints that qvlsearch did not build: other shapes and init, made with transformers
    directly; the embedder in the headless layout, the reranker with an untied LM head.
    Only the tokenizer and processors are borrowed from the tiny checkpoint."""
    import torch
    from transformers import AutoProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLModel

    processor = AutoProcessor.from_pretrained(checkpoints["embedder"])
    tok = processor.tokenizer
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=96,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=3,
            head_dim=16,
            intermediate_size=160,
            rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3], mrope_interleaved=True),
        ),
        vision_config=dict(
            depth=3,
            hidden_size=48,
            num_heads=3,
            intermediate_size=96,
            out_hidden_size=96,
            num_position_embeddings=144,
            deepstack_visual_indexes=[0, 2],
        ),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    out = tmp_path_factory.mktemp("foreign")
    paths = {}
    for name, cls in (("embedder", Qwen3VLModel), ("reranker", Qwen3VLForConditionalGeneration)):
        torch.manual_seed(123 if name == "embedder" else 321)
        model = cls(config)
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim >= 2:
                    param.normal_(0.0, 0.3)
        model.save_pretrained(out / name)
        processor.save_pretrained(out / name)
        paths[name] = out / name
    return paths


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, Path]:
    """Generated media files: two short videos, frames, and broken files of several kinds."""
    from make_media import make_image, make_video

    root = tmp_path_factory.mktemp("media")
    files = {
        "video": make_video(root / "clip.mp4"),
        "video2": make_video(root / "clip2.mp4", frames=8, fps=4, size=(96, 128)),
        "frames": [make_image(root / f"frame{i}.png", color=(40 * i, 90, 200 - 30 * i)) for i in range(5)],
    }
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 50)
    (root / "empty.png").write_bytes(b"")
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    (root / "text.jpg").write_text("this is text, not a jpeg\n")
    make_video(root / "one-frame.mp4", frames=1)
    for name in ("corrupt.jpg", "empty.png", "corrupt.mp4", "text.jpg", "one-frame.mp4"):
        files[name] = root / name
    files["missing"] = root / "does-not-exist.jpg"
    return files


@pytest.fixture(scope="session")
def http_base() -> str:
    """Base URL of a local HTTP server over sample_data/ (bound to 127.0.0.1)."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(QuietHandler, directory=str(SAMPLE_DATA))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="session")
def embedder(checkpoints):
    from qvlsearch import Embedder

    return Embedder(str(checkpoints["embedder"]), device="cpu")  # float32: the parity tests need it


@pytest.fixture(scope="session")
def reranker(checkpoints):
    from qvlsearch import Reranker

    return Reranker(str(checkpoints["reranker"]), device="cpu")
