"""Media decoded in worker processes, so that a decoder that crashes on a corrupt or hostile file
(a segfault or abort in FFmpeg, pdfium, LibRaw or an image library) costs that one item, not the process.

`Decoders` runs `load_media` (and other module-level functions that open media files) in
spawned worker processes for the kinds it is given, and in the calling thread for the rest
(texts never need it). When a worker dies, the items it had in flight are tried again one at
a time, each alone in a process (see `WorkerProcesses`); the item that still kills its process
fails with a `MediaError` that names it and says that the decoder crashed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from PIL import Image

from .errors import MediaError
from .media import LoadedMedia, describe, load_media
from .pages import PdfPage
from .parallel import WorkerCrashed, WorkerProcesses, apply
from .raw import is_raw_name

T = TypeVar("T")

MEDIA_KINDS = frozenset({"image", "raw", "video", "pdf"})  # "raw": camera RAW images, which LibRaw decodes
# The kinds of files `index` (and the web page's pictures) decode in worker processes by default: FFmpeg, pdfium
# and LibRaw parse containers, documents and RAW files full of offsets, and a crash on one file must not end every
# run. Other images stay in threads: worker processes take seconds to start, which a run that adds a few photos
# would pay each time.
DECODED_APART = frozenset({"video", "pdf", "raw"})


def crash_reason(how: str) -> str:
    """What an error row says about a file whose decoder's process died (`how`: "SIGSEGV", "exit code 1", "")."""
    if how == "SIGKILL":  # what the kernel's out-of-memory killer sends
        return "the decoder was killed (SIGKILL), out of memory or by someone; the file may be too large"
    return f"the decoder crashed{f' ({how})' if how else ''}; the file may be corrupt or hostile"


def decoding_kind(path: str, kind: str) -> str:
    """The kind of decoder a file of `kind` (as `fs` tells) needs: 'raw' for an image with a RAW name."""
    return "raw" if kind == "image" and is_raw_name(path) else kind


def part_kind(part: dict) -> str | None:
    """The kind of file a content part makes a decoder open: 'image', 'raw', 'video' or 'pdf'; None for text
    and for images already decoded (PIL images, and frame lists of them)."""
    source = part.get(part["type"]) if part["type"] in ("image", "video") else None
    if isinstance(source, PdfPage):
        return "pdf"
    if isinstance(source, list):  # a video as a list of frames
        return "image" if any(not isinstance(frame, Image.Image) for frame in source) else None
    if isinstance(source, (str, os.PathLike)):
        return decoding_kind(os.fspath(source), part["type"])
    return None


class Decoders:
    """Worker processes (started on first use, at most `workers`) that decode the media of `kinds`."""

    def __init__(self, workers: int | None = None, kinds: Iterable[str] = MEDIA_KINDS):
        self.kinds = frozenset(kinds)
        unknown = self.kinds - MEDIA_KINDS
        if unknown:
            raise ValueError(f"unknown media kind(s) {sorted(unknown)}; use {sorted(MEDIA_KINDS)}")
        self.processes = WorkerProcesses(apply, workers or min(16, os.cpu_count() or 1))

    def load(self, parts: list[dict]) -> LoadedMedia:
        """`load_media(parts)`, in a worker process when some part is of one of the kinds."""
        isolated = [part for part in parts if part_kind(part) in self.kinds]
        if not isolated:
            return load_media(parts)
        try:
            return self.processes.call(0, (load_media, (parts,)))
        except WorkerCrashed as exc:
            first = isolated[0]
            kind = "" if isinstance(first.get("image"), PdfPage) else first["type"] + " "
            others = f" (or one of its {len(isolated) - 1} other media)" if len(isolated) > 1 else ""
            reason = crash_reason(exc.how)
            raise MediaError(f"{kind}{describe(first[first['type']])}{others}: {reason}", reason=reason) from None

    def run(self, kind: str, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` (module-level), in a worker process when `kind` is one of the kinds.

        WorkerCrashed when the process died of it."""
        if kind not in self.kinds:
            return function(*args)
        return self.processes.call(0, (function, args))

    def shutdown(self) -> None:
        self.processes.shutdown()
