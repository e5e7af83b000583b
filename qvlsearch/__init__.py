"""qvlsearch: search your own photos, videos and documents by meaning.

`Embedder` and `Reranker` are imported lazily, so that `qvlsearch --help` and
`import qvlsearch` stay fast (torch is loaded only when a model is used).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from .errors import InputError, MediaError, ModelLoadError, QvlsearchError

if sys.platform == "darwin":  # operators MPS lacks run on the CPU; torch reads this once, when it is imported
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")

__version__ = "0.1.0"
DEFAULT_EMBEDDER = "Qwen/Qwen3-VL-Embedding-2B"
DEFAULT_RERANKER = "Qwen/Qwen3-VL-Reranker-2B"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's; see QwenModel
__all__ = ["Embedder", "Reranker", "open_index", "QvlsearchError", "InputError", "MediaError", "ModelLoadError"]


def check_compile_mode(mode: str | None) -> str | None:
    """None (eager), or one of torch.compile's modes ("reduce-overhead" adds CUDA graphs)."""
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}: must be one of {', '.join(COMPILE_MODES)}")
    return mode


if TYPE_CHECKING:
    from .embedder import Embedder
    from .reranker import Reranker
    from .search import open_index


def __getattr__(name: str):
    if name == "Embedder":
        from .embedder import Embedder

        return Embedder
    if name == "Reranker":
        from .reranker import Reranker

        return Reranker
    if name == "open_index":
        from .search import open_index

        return open_index
    raise AttributeError(f"module 'qvlsearch' has no attribute {name!r}")
