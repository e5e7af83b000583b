"""Find the files `qvlsearch index` reads, and tell images, videos and text apart.

`walk` streams every candidate file under some roots in a stable order; a file it meets but
cannot use (a broken link, a loop, no permission) comes out with an `error` instead of being
dropped, so that the caller can report it. `sniff_kind` checks a file's first bytes against its name.
"""

from __future__ import annotations

import codecs
import errno
import fnmatch
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .raw import RAW_EXTENSIONS
from .signatures import image_format, video_demuxer

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif",
                  *RAW_EXTENSIONS}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"}
TEXT_SUFFIXES = {".txt", ".md"}
PDF_SUFFIXES = {".pdf"}
SNIFF_BYTES = 64 * 1024
UNKNOWN_CONTENT = "unknown content (not an image, video, PDF, UTF-8 text or text with a byte-order mark)"
# Byte-order marks and the codec that decodes (and drops) them; UTF-32 LE's comes before UTF-16 LE's, its prefix.
TEXT_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
             (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_CONTENT_NAMES = {"image": "an image", "video": "a video", "text": "text", "pdf": "a PDF"}


class KindError(Exception):
    """A file's content is no image, video or text, contradicts its name, or cannot be read; the message is one line."""


@dataclass(frozen=True)
class Found:
    """A candidate file met by the walk."""

    path: str  # absolute, not resolved through symlinks; non-UTF-8 bytes as surrogate escapes
    root: str  # the absolute root it was found under
    size: int  # bytes; 0 when unknown
    mtime_ns: int  # st_mtime_ns; 0 when unknown
    error: str | None = None  # one-line reason when the file cannot be used
    unlisted_folder: bool = False  # a folder that could not be listed: the files in it are unknown, not gone


def suffix_kind(path: str) -> str | None:
    """'image', 'video', 'text' or 'pdf' by the file name's suffix (case-insensitive), else None."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in PDF_SUFFIXES:
        return "pdf"
    return None


def display_path(path: str) -> str:
    """The path as valid UTF-8 text for tables and JSON: undecodable bytes shown as \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def walk(
    roots: Sequence[str | os.PathLike],
    *,
    include_hidden: bool = False,
    follow_symlinks: bool = False,
    exclude: Sequence[str] = (),
    beside: Callable[[str], bool] | None = None,
) -> Iterator[Found]:
    """Every candidate file under the roots, in a stable sorted order, streamed (never a full list in memory).
    With `beside`, also the files whose names it accepts though they are no media (RAWs and sidecars that
    belong to a photo: see companions.py).

    Raises FileNotFoundError at once, before anything is walked, when a root does not exist. Hidden names are
    skipped below each root; `exclude` globs, matched against the path relative to its root and against the bare
    name, apply below each root and to a file root's name. A root that is a file but no candidate comes out with
    an error. A folder already walked is not walked again, also when two roots overlap.
    """
    tops = [os.path.abspath(os.fsdecode(root)) for root in roots]
    for top in tops:
        if not os.path.lexists(top):
            raise FileNotFoundError(f"{display_path(top)}: no such file or folder")
    wanted = (lambda name: bool(suffix_kind(name) or beside(name))) if beside else suffix_kind
    return _walk(tops, include_hidden, follow_symlinks, [pattern.rstrip("/") for pattern in exclude], wanted)


def _walk(tops: list[str], include_hidden: bool, follow_symlinks: bool, exclude: list[str],
          wanted: Callable[[str], Any]) -> Iterator[Found]:
    seen: set[tuple[int, int]] = set()  # (st_dev, st_ino) of every folder entered
    for top in tops:
        try:
            st = os.stat(top)
        except OSError as err:
            yield Found(top, top, 0, 0, _stat_error(err, top))
            continue
        name = os.path.basename(top)
        if stat.S_ISDIR(st.st_mode):
            yield from _walk_folder(top, st, seen, include_hidden, follow_symlinks, exclude, wanted)
        elif _excluded(name, name, exclude):
            continue
        elif wanted(name) and stat.S_ISREG(st.st_mode):
            yield _found_file(top, top, st)
        else:
            yield Found(top, top, 0, 0, "not an image, video, PDF or text file")


def _walk_folder(
    top: str,
    top_stat: os.stat_result,
    seen: set[tuple[int, int]],
    include_hidden: bool,
    follow_symlinks: bool,
    exclude: list[str],
    wanted: Callable[[str], Any],
) -> Iterator[Found]:
    """Depth first, entries in name order, with an explicit stack of the folders on the current path."""
    stack: list[tuple[tuple[int, int], str, Iterator[os.DirEntry[str]]]] = []  # (dev, ino), relative path, entries

    def enter(path: str, rel: str, st: os.stat_result) -> Found | None:
        key = (st.st_dev, st.st_ino)
        seen.add(key)
        try:
            with os.scandir(path) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as err:
            return Found(path, top, 0, 0, f"cannot read folder: {_reason(err)}", unlisted_folder=True)
        stack.append((key, rel, iter(entries)))
        return None

    if (top_stat.st_dev, top_stat.st_ino) in seen:
        return
    if error := enter(top, "", top_stat):
        yield error
    while stack:
        _, prefix, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        if entry.name.startswith(".") and not include_hidden:
            continue
        if exclude and _excluded(os.path.join(prefix, entry.name), entry.name, exclude):
            continue
        kind = wanted(entry.name)
        try:
            if not kind and not entry.is_dir():
                continue
            st = entry.stat()
        except OSError as err:
            if kind:
                yield Found(entry.path, top, 0, 0, _stat_error(err, entry.path))
            continue
        if stat.S_ISDIR(st.st_mode):
            if entry.is_symlink() and not follow_symlinks:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                if any(key == ancestor for ancestor, _, _ in stack):
                    yield Found(entry.path, top, 0, 0, "symbolic link loop")
                continue
            if error := enter(entry.path, os.path.join(prefix, entry.name), st):
                yield error
        elif kind and stat.S_ISREG(st.st_mode):
            yield _found_file(entry.path, top, st)


def ignored(path: str, root: str, *, include_hidden: bool = False, exclude: Sequence[str] = ()) -> bool:
    """Whether `walk` from `root` would skip `path` (a path below it): a hidden name or an excluded one on the way."""
    patterns = [pattern.rstrip("/") for pattern in exclude]
    parts = os.path.relpath(path, root).split(os.sep)
    for depth, name in enumerate(parts, 1):
        if name.startswith(".") and not include_hidden:
            return True
        if patterns and _excluded(os.path.join(*parts[:depth]), name, patterns):
            return True
    return False


def _found_file(path: str, root: str, st: os.stat_result) -> Found:
    error = None if os.access(path, os.R_OK) else "permission denied"
    return Found(path, root, st.st_size, st.st_mtime_ns, error)


def _excluded(rel: str, name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(name, pattern) for pattern in patterns)


def _stat_error(err: OSError, path: str) -> str:
    """Why a path met in a listing cannot be stat'ed."""
    if isinstance(err, FileNotFoundError) and os.path.islink(path):
        return "broken symbolic link"
    return _reason(err)


def _reason(err: OSError) -> str:
    """An OSError as a short lower-case reason."""
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, FileNotFoundError):
        return "no such file"
    if err.errno == errno.ELOOP:
        return "symbolic link loop"
    return (err.strerror or str(err)).lower()


def sniff_kind(path: str) -> str:
    """'image', 'video' or 'text' decided by the file's first bytes; raises KindError(reason) when the content is
    none of them or contradicts the suffix's kind."""
    try:
        with open(path, "rb") as file:
            head = file.read(SNIFF_BYTES)
    except OSError as err:
        raise KindError(_reason(err)) from None
    if not head:
        raise KindError("empty file")
    kind = _content_kind(head)
    if kind is None:
        raise KindError(UNKNOWN_CONTENT)
    named = suffix_kind(path)
    if named and named != kind:
        raise KindError(f"content is {_CONTENT_NAMES[kind]}, but the name says {named}")
    return kind


def _content_kind(head: bytes) -> str | None:
    """The kind that a file's first bytes show, or None."""
    if image_format(head):
        return "image"
    if video_demuxer(head):
        return "video"
    if head.startswith(b"%PDF-"):
        return "pdf"
    if _is_text(head, text_encoding(head)):
        return "text"
    return None


def text_encoding(head: bytes) -> str:
    """The codec of text starting with `head`: the one its byte-order mark names, else UTF-8."""
    return next((encoding for bom, encoding in TEXT_BOMS if head.startswith(bom)), "utf-8")


def _is_text(head: bytes, encoding: str) -> bool:
    """Whether the sample decodes to text without NUL; a character cut at the end of a full sample is fine."""
    try:
        text = codecs.getincrementaldecoder(encoding)().decode(head, final=len(head) < SNIFF_BYTES)
    except UnicodeDecodeError:
        return False
    return "\x00" not in text


TEXT_READ_BYTES = 256 * 1024  # more than max_length tokens of any text


def file_item(path: str, kind: str | None = None) -> dict[str, Any]:
    """The model input for a file on disk: {"image": path}, {"video": path} or {"text": its content}."""
    kind = kind or sniff_kind(path)
    if kind == "text":
        with open(path, "rb") as f:
            data = f.read(TEXT_READ_BYTES)
        decoder = codecs.getincrementaldecoder(text_encoding(data))(errors="replace")  # drops a byte-order mark
        return {"text": decoder.decode(data, final=len(data) < TEXT_READ_BYTES)}
    return {kind: path}
