"""Files that belong to another file: a Live Photo's motion part, the RAW of a RAW+JPEG pair, and sidecars.

A phone writes a Live Photo as a still (JPEG or HEIC) and a short video (MOV or MP4) with the same stem in
the same folder, and puts the same Apple content identifier in both (the still's MakerNote or XMP, the
video's `com.apple.quicktime.content.identifier` tag). A camera set to RAW+JPEG writes both files with the
same stem. Either pair is one item: the still is indexed and names its companion (`live_video`,
`raw_file`); the companion is no item of its own, so a Live Photo's video is never a separate hit and has no
moments. When the still and the video both carry a content identifier and they differ, they are two items.

`arrange` takes what the walk found and gives the items to index, each with what lies beside it
(`Beside`: its companions and sidecars). Sidecars (.json, .xmp) are never items: see sidecars.py.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .fs import Found, display_path, suffix_kind
from .raw import RAW_EXTENSIONS
from .sidecars import TAKEOUT_NAME_LIMIT, SidecarError, SidecarFolder, is_sidecar_name, parse_xmp, sidecar_names

STILL_SUFFIXES = frozenset({".jpg", ".jpeg", ".heic", ".heif"})
MOTION_SUFFIXES = frozenset({".mov", ".mp4"})
BESIDE_FIELDS = ("live_video", "raw_file", "sidecar_stamp")  # the item columns this module fills
CONTENT_ID_TAG = "com.apple.quicktime.content.identifier"  # the QuickTime metadata key of a Live Photo's video
APPLE_MAKERNOTE = b"Apple iOS\x00"  # then a version (2 bytes), the byte order (2) and an IFD
APPLE_CONTENT_ID = 0x0011  # the MakerNote tag of the content identifier (ASCII)
EXIF_MAKERNOTE = 0x927C
NUMBERED = re.compile(r"\(\d+\)$")  # IMG_1234(1): a copy's number
CUT_FAMILY = TAKEOUT_NAME_LIMIT - len(".json") - len(".jpeg")  # a stem this long may be a Takeout name cut short

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Beside:
    """What lies beside an item: its Live Photo video, its RAW and its sidecars (XMP first)."""

    live_video: Found | None = None
    raw_file: Found | None = None
    sidecars: tuple[Found, ...] = ()

    def fields(self) -> dict[str, Any]:
        """The item columns: the companions' paths, and a stamp of the sidecars (name, size, mtime) that tells
        when one was added, edited or removed."""
        stamp = ";".join(f"{os.path.basename(s.path)}:{s.size}:{s.mtime_ns}" for s in self.sidecars)
        return {"live_video": display_path(self.live_video.path) if self.live_video else None,
                "raw_file": display_path(self.raw_file.path) if self.raw_file else None,
                "sidecar_stamp": stamp or None}


NOTHING_BESIDE = Beside()
NOTHING_FIELDS = (None,) * len(BESIDE_FIELDS)


@dataclass
class Arranged:
    """The walk's files sorted out: the items to index (in walk order) and what lies beside each, by path."""

    items: list[Found]
    beside: dict[str, Beside] = field(default_factory=dict)

    def of(self, path: str) -> Beside:
        return self.beside.get(path, NOTHING_BESIDE)

    def fields_of(self, path: str) -> tuple:
        """The `BESIDE_FIELDS` values of an item, as its stored row should hold them."""
        beside = self.beside.get(path)
        return tuple(beside.fields().values()) if beside else NOTHING_FIELDS


def is_beside_name(name: str) -> bool:
    """Whether a file of this name may belong to another (a RAW, a sidecar): the walk brings these along."""
    return os.path.splitext(name)[1].lower() in RAW_EXTENSIONS or is_sidecar_name(name)


def suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def arrange(found: Iterable[Found], is_pair: Callable[[Found, Found], bool] | None = None) -> Arranged:
    """Pair stills with their Live Photo videos and RAWs, and find every item's sidecars. `is_pair(still,
    video)` decides a Live Photo whose names match (default: `same_capture`, which reads both files)."""
    is_pair = is_pair or same_capture
    found = list(found)
    families: dict[tuple[str, str], list[Found]] = {}  # (folder, stem) -> the files
    sidecars: dict[str, dict[str, Found]] = {}  # folder -> name -> sidecar
    places = [os.path.split(f.path) for f in found]  # (folder, name)
    is_sidecar = [is_sidecar_name(name) and not f.unlisted_folder for f, (_, name) in zip(found, places, strict=True)]
    for f, (folder, name), sidecar in zip(found, places, is_sidecar, strict=True):
        if sidecar:  # one that cannot be read: a warning when its photo's metadata is read
            sidecars.setdefault(folder, {})[name] = f
        elif f.error is None:
            families.setdefault((folder, os.path.splitext(name)[0].casefold()), []).append(f)
    live: dict[str, Found] = {}
    raw: dict[str, Found] = {}
    for family in families.values():
        if len(family) < 2:
            continue
        stills = [f for f in family if suffix(f.path) in STILL_SUFFIXES]
        videos = [f for f in family if suffix(f.path) in MOTION_SUFFIXES]
        raws = [f for f in family if suffix(f.path) in RAW_EXTENSIONS]
        for still in stills:
            video = next((v for v in videos if is_pair(still, v)), None)
            if video is not None:
                videos.remove(video)
                live[still.path] = video
        for still, raw_file in zip(stills, raws, strict=False):  # the JPEG is embedded, the RAW named beside it
            raw[still.path] = raw_file
    companions = {f.path for f in (*live.values(), *raw.values())}
    folders = {folder: SidecarFolder.of(names) for folder, names in sidecars.items()}
    arranged = Arranged([])
    for f, (folder, name), sidecar in zip(found, places, is_sidecar, strict=True):
        if sidecar or f.path in companions:
            continue
        arranged.items.append(f)
        if f.error is not None:
            continue
        own, raw_file, live_video = sidecars.get(folder), raw.get(f.path), live.get(f.path)
        names = sidecar_names(name, folders[folder], [os.path.basename(raw_file.path)] if raw_file else []) if own and (
            suffix_kind(name) in ("image", "video") or suffix(name) in RAW_EXTENSIONS) else []
        if names or raw_file or live_video:
            arranged.beside[f.path] = Beside(live_video, raw_file, tuple(own[n] for n in names))
    return arranged


def related_paths(paths: Sequence[str]) -> list[str]:
    """`paths` and the files beside each path that is not a folder (same stem, in the same folder: its Live
    Photo parts, RAW, sidecars), so that a change to one part is seen with the others."""
    related = list(paths)
    for path in paths:
        if os.path.isdir(path):
            continue
        folder, name = os.path.split(path)
        family = stem_family(name)
        try:
            with os.scandir(folder) as listing:
                names = [entry.name for entry in listing if not entry.is_dir()]  # a folder "IMG_1" is no part
        except OSError:
            continue
        related += [os.path.join(folder, n) for n in sorted(names) if n != name and same_family(stem_family(n), family)]
    return list(dict.fromkeys(related))


def stem_family(name: str) -> str:
    """A name's part before its first dot, without an "-edited" or "(1)": what its parts and sidecars share."""
    return NUMBERED.sub("", name.split(".")[0].casefold()).removesuffix("-edited")


def same_family(a: str, b: str) -> bool:
    """Two stem families alike, or one a name that Takeout cut short of the other."""
    short, long = sorted((a, b), key=len)
    return a == b or (len(short) >= CUT_FAMILY and long.startswith(short))


def same_capture(still: Found, video: Found) -> bool:
    """Whether a still and a video with the same stem are one Live Photo: unless both carry an Apple content
    identifier and they differ."""
    still_id = still_identifier(still.path)
    video_id = video_identifier(video.path) if still_id else None
    return not (still_id and video_id and still_id != video_id)


def still_identifier(path: str) -> str | None:
    """The Apple content identifier in a still's MakerNote, else in its XMP; None when it has none."""
    from PIL import ExifTags, Image

    try:
        with Image.open(path) as image:
            makernote = image.getexif().get_ifd(ExifTags.IFD.Exif).get(EXIF_MAKERNOTE)
            xmp = image.info.get("xmp")
    except Exception as exc:  # noqa: BLE001 - an unreadable still pairs by name; indexing it reports why
        log.info("%s: content identifier not read (%s: %s)", path, type(exc).__name__, exc)
        return None
    return makernote_identifier(makernote) or xmp_identifier(xmp, os.path.basename(path))


def makernote_identifier(makernote: Any) -> str | None:
    """The content identifier (tag 0x11) of an Apple MakerNote: 'Apple iOS\\0', version, 'MM' or 'II', then an
    IFD whose offsets count from the MakerNote's start."""
    if not isinstance(makernote, bytes) or not makernote.startswith(APPLE_MAKERNOTE) or len(makernote) < 16:
        return None
    order = {b"MM": ">", b"II": "<"}.get(makernote[12:14])
    if order is None:
        return None
    try:
        (count,) = struct.unpack_from(order + "H", makernote, 14)
        for entry in range(count):
            tag, kind, length, value = struct.unpack_from(order + "HHI4s", makernote, 16 + 12 * entry)
            if tag == APPLE_CONTENT_ID and kind == 2:  # ASCII
                (offset,) = struct.unpack(order + "I", value)
                text = value[:length] if length <= 4 else makernote[offset:offset + length]
                return text.split(b"\x00")[0].decode("ascii", "replace").strip() or None
    except struct.error:  # an IFD cut short
        return None
    return None


def xmp_identifier(xmp: Any, name: str) -> str | None:
    """A ContentIdentifier property of an XMP packet (whatever its namespace)."""
    if isinstance(xmp, str):
        xmp = xmp.encode()
    if not isinstance(xmp, bytes):
        return None
    try:
        values = parse_xmp(xmp, name)
    except SidecarError as exc:
        log.info("%s: content identifier not read (%s)", name, exc)
        return None
    found = next((v for k, v in values.items() if k.endswith("}ContentIdentifier")), None)
    return found.strip() or None if isinstance(found, str) else None


def video_identifier(path: str) -> str | None:
    """The Apple content identifier in a video's QuickTime metadata; None when it has none."""
    import av

    try:
        with av.open(path) as container:
            value = container.metadata.get(CONTENT_ID_TAG)
    except Exception as exc:  # noqa: BLE001 - an unreadable video pairs by name; it is not decoded anyway
        log.info("%s: content identifier not read (%s: %s)", path, type(exc).__name__, exc)
        return None
    return value.strip() or None if isinstance(value, str) else None
