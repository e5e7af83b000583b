"""Is a model there to load? Answered in well under a second, before torch is imported.

Without this check, a missing model is found out by transformers after torch has loaded,
and, with no network, only after huggingface_hub's five retries (27 s).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from .errors import ModelLoadError

PROBE_TIMEOUT_S = 3.0


def model_setting(model: str | os.PathLike) -> str:
    """How an index names its model: a local folder by its resolved path (loadable from any folder), else the Hub id."""
    model = os.fspath(model)
    return str(Path(model).resolve()) if os.path.isdir(model) else model


def require_model(name: str) -> None:
    """Raise ModelLoadError, with the command that fixes it, unless `name` can be loaded now.

    A local folder, or a Hub id in the Hugging Face cache, can; any other Hub id only when
    the Hub can be reached (transformers then downloads it).
    """
    if os.path.isdir(name):
        return
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repo id either
        raise ModelLoadError(f"cannot load model {name!r}: it is neither a folder here nor a Hugging Face "
                             "model id; pass a local checkpoint folder or an id such as Qwen/Qwen3-VL-Embedding-2B"
                             ) from None
    if isinstance(cached, str):
        return
    missing = f"cannot load model {name!r}: it is not in the Hugging Face cache"
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"{missing}, and HF_HUB_OFFLINE is set; download it with `hf download {name}` "
                             "(with HF_HUB_OFFLINE unset, on a machine with network access), or pass a local "
                             "checkpoint folder")
    url = f"{constants.ENDPOINT}/api/models/{name}"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # the Hub answers: transformers downloads it, or says why it cannot (gated, no such model)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ModelLoadError(f"{missing}, and {constants.ENDPOINT} cannot be reached ({reason}); download it "
                             f"with `hf download {name}` on a machine with network access, or pass a local "
                             "checkpoint folder") from None
