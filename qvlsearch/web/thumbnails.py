"""Pictures of indexed items for the page: thumbnails made once and kept on disk, and the viewer's pictures.

A thumbnail is kept under a name made from what it shows (the file's path, its modification time,
the page or moment), so a changed file gets a new one; an index folder that cannot be written
(read-only, full) only means thumbnails are made each time. Only files that were indexed without
error are decoded, by the same code that indexed them: videos, PDF pages and RAW files in the
server's decoder processes, as `index` decodes them, so that a file changed since into one that
crashes its decoder costs that picture (a card that says so), not the server. Others get a card
that says their status.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from pathlib import Path

from PIL import Image

from ..contact_sheet import text_card, thumbnail
from ..decoders import DECODED_APART, Decoders, crash_reason, decoding_kind
from ..fs import file_item
from ..parallel import WorkerCrashed
from ..search import SearchResult

log = logging.getLogger("qvlsearch")

THUMB_PIXELS = 256  # the longest side of a thumbnail: sharp in a grid tile of 200 CSS pixels
TEXT_LINES = 40  # lines of a text the viewer shows


class Thumbnails:
    """Thumbnails of items, cached as JPEG files in `folder`."""

    def __init__(self, folder: Path, decoders: Decoders | None = None):
        self.folder, self.decoders = folder, decoders
        self.writable = True

    def jpeg(self, result: SearchResult, status: str) -> bytes:
        """The thumbnail of `result` (JPEG bytes), from the cache or made now and kept there."""
        cached = self.folder / f"{cache_key(result, status)}.jpg"
        try:
            return cached.read_bytes()
        except OSError:
            pass
        data = self.made(result, status, THUMB_PIXELS, quality=82)
        if self.writable:
            try:
                self.keep(cached, data)
            except OSError as exc:
                self.writable = False
                log.warning("cannot keep thumbnails in %s (%s): making them each time", self.folder,
                            exc.strerror or exc)
        return data

    def viewer(self, result: SearchResult, status: str, size: int) -> bytes:
        """A photo, a PDF page or a video's frame for the viewer, as JPEG."""
        return self.made(result, status, size, quality=88)

    def made(self, result: SearchResult, status: str, size: int, quality: int) -> bytes:
        """The item's picture as JPEG, decoded where `index` decodes its kind."""
        kind = decoding_kind(result.fs_path or result.path, result.kind)
        if self.decoders is None or status != "ok" or kind not in DECODED_APART:
            return picture_jpeg(result, status, size, quality)
        try:
            return self.decoders.run(kind, picture_jpeg, result, status, size, quality)
        except WorkerCrashed as exc:
            log.warning("showing %s: %s", result.path, crash_reason(exc.how))
            return encoded(card(result, f"cannot show it: {crash_reason(exc.how)}", size), quality)

    def keep(self, path: Path, data: bytes) -> None:
        """Write `path` whole or not at all (another request may be writing the same one)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as part:
            part.write(data)
        os.replace(part.name, path)


def cache_key(result: SearchResult, status: str) -> str:
    """A name for what the thumbnail shows: the file as it is now, and the page or moment of it."""
    shown = (os.fsencode(result.fs_path or result.path), result.modified_at, result.page, result.start_s,
             result.end_s, status, THUMB_PIXELS)
    return hashlib.sha256(repr(shown).encode()).hexdigest()[:32]


def picture_jpeg(result: SearchResult, status: str, size: int, quality: int) -> bytes:
    """The item's picture at most `size` pixels a side, as JPEG; a card naming the status for a file not indexed."""
    if status != "ok":
        return encoded(card(result, f"not indexed: {status}", size), quality)
    return encoded(thumbnail(result, size), quality)


def card(result: SearchResult, why: str, size: int) -> Image.Image:
    """A card with the file's name and why its picture is not shown, at most `size` pixels a side."""
    picture = text_card(f"{os.path.basename(result.path)}\n\n{why}")
    picture.thumbnail((size, size))
    return picture


def text_lines(result: SearchResult) -> str:
    """The first lines of a text item."""
    try:
        text = file_item(result.fs_path or result.path, "text")["text"]
    except Exception as exc:  # gone or unreadable since it was indexed
        return f"cannot show {result.path}: {exc}"
    return "\n".join(text.splitlines()[:TEXT_LINES])


def encoded(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()
