"""Input items: check their shape, lay them out as Qwen3-VL chat content, and load their media.

An item is the model card's multimodal object: a dict with any of `text`, `image`,
`video`, `instruction`, `fps`, `max_frames`. Images and videos are resized exactly as
the official models expect (qwen-vl-utils' rules); every failure is a `MediaError`
that names the file or URL and says why.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import importlib.util
import io
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pillow_heif
import torch
from PIL import Image
from qwen_vl_utils import vision_process

from .errors import InputError, MediaError, SettingError, check_setting
from .limits import LIMITS, MAX_IMAGE_PIXELS, VisionOptions
from .orientation import orientation_of, upright
from .pages import PdfPage
from .raw import PHOTO_SIZE, PREVIEW_MIN_PIXELS, RAW_EXTENSIONS, RawError, is_raw_name, open_raw
from .signatures import HEAD_BYTES, RAW_FORMATS, describe_content, image_format
from .video import container_of, demuxer_for, frame_size, read_video, resize_frame

# HEIC/HEIF photos (every iPhone's default) through pillow-heif; AVIF through Pillow's own plugin
pillow_heif.register_heif_opener()

ITEM_KEYS = {"text", "image", "video", "instruction", "fps", "max_frames", "video_start", "video_end"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tiff", ".tif", ".svg", ".heic", ".heif", ".avif",
                  *RAW_EXTENSIONS}
IMAGE_PATCH_SIZE = 16
URL_TIMEOUT_S = 30.0
URL_MAX_BYTES = 512 * 1024 * 1024
STRIP_ROWS = 256  # rows of a large frame copied out of Pillow at a time
IMAGE_FORMATS = "JPEG, PNG, GIF, WebP, BMP, TIFF, HEIF/AVIF or camera RAW"
VIDEO_READER_VARIABLE = "FORCE_QWENVL_VIDEO_READER"  # names one of qwen-vl-utils' readers to use instead of PyAV
# Pillow warns from 89 MP on; images are refused above MAX_IMAGE_PIXELS before decoding instead.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass
class LoadedMedia:
    """An item's chat content with its media decoded and resized, ready for the processor."""

    content: list[dict]
    images: list[Image.Image]
    videos: list[tuple[Any, dict]]  # (frames tensor T×C×H×W, metadata) per video
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) before resizing

    def facts(self) -> dict[str, Any]:
        """Size of the first image, or frames/duration/frame size of the first video, for the index."""
        if self.videos:
            frames, meta = self.videos[0]
            fps, total = meta.get("fps") or 0, meta.get("total_num_frames") or 0
            return {"width": int(frames.shape[-1]), "height": int(frames.shape[-2]), "frames": int(frames.shape[0]),
                    "duration_s": float(total / fps) if fps else None}
        if self.image_sizes:
            width, height = self.image_sizes[0]
            return {"width": width, "height": height}
        return {}


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def is_data_uri(source: str) -> bool:
    return source.startswith("data:")


def _looks_like_image(source: Any) -> bool:
    if isinstance(source, Image.Image):
        return True
    if isinstance(source, str) and is_data_uri(source):
        return source.startswith("data:image/")
    if isinstance(source, (str, os.PathLike)):
        name = str(source).split("?")[0] if is_url(str(source)) else str(source)
        return Path(name).suffix.lower() in IMAGE_SUFFIXES
    return False


def _videos_of(video: Any) -> list:
    """One video (a path, a URL or a frame list) or a list of videos, as a list of videos."""
    if isinstance(video, (str, os.PathLike)):
        return [video]
    if isinstance(video, (list, tuple)) and video and _looks_like_image(video[0]):
        return [list(video)]
    return _as_list(video)


def _sample_frame_list(frames: list, max_frames: int | None) -> list:
    """Evenly pick at most `max_frames` frames, first and last kept (the official rule)."""
    if max_frames is None or len(frames) <= max_frames:
        return frames
    return [frames[i] for i in np.linspace(0, len(frames) - 1, max_frames, dtype=int).tolist()]


def check_item(item: Any, index: int | None = None, *, name: str | None = None) -> Mapping:
    """Raise InputError unless `item` is a multimodal object; the message names it `name`, else item `index`."""
    where = name or (f"item {index}" if index is not None else "item")
    if not isinstance(item, Mapping):
        raise InputError(f"{where} must be a dict with text/image/video keys, got {type(item).__name__}")
    unknown = set(item) - ITEM_KEYS
    if unknown:
        raise InputError(f"{where} has unknown key(s) {sorted(unknown)}; allowed: {sorted(ITEM_KEYS)}")
    for text in _as_list(item.get("text")) if item.get("text") is not None else []:
        if not isinstance(text, str):
            raise InputError(f"{where}: text must be a string or a list of strings, got {type(text).__name__}")
    for image in _as_list(item.get("image")) if item.get("image") is not None else []:
        if not isinstance(image, (str, os.PathLike, Image.Image, PdfPage)):
            raise InputError(f"{where}: image must be a path, URL, PIL image or PdfPage, got {type(image).__name__}")
    for key in ("fps", "max_frames"):
        try:
            if item.get(key) is not None:
                check_setting(key, item[key], **LIMITS[key])
        except SettingError as exc:
            raise InputError(f"{where}: {exc}") from None
    for key in ("video_start", "video_end"):
        if item.get(key) is not None and not isinstance(item[key], (int, float)):
            raise InputError(f"{where}: {key} must be a number of seconds, got {type(item[key]).__name__}")
    for video in _videos_of(item["video"]) if item.get("video") is not None else []:
        frames = video if isinstance(video, list) else [video]
        if not frames or not all(isinstance(f, (str, os.PathLike, Image.Image)) for f in frames):
            raise InputError(f"{where}: video must be a path, URL, or a non-empty list of frame paths/PIL images")
    return item


def content_parts(
    item: Mapping, options: VisionOptions, fps: float | None = None, max_frames: int | None = None
) -> list[dict]:
    """The user-turn content the official models build: videos, then images, then texts.

    An item with nothing in it becomes the text "NULL", as in the official code.
    `fps`/`max_frames` default to the item's own keys, then to `options`.
    """
    fps = item.get("fps") or fps or options.fps
    max_frames = item.get("max_frames") or max_frames or options.max_frames
    texts = _as_list(item["text"]) if item.get("text") is not None else []
    images = _as_list(item["image"]) if item.get("image") is not None else []
    videos = _videos_of(item["video"]) if item.get("video") is not None else []
    if not texts and not images and not videos:
        return [{"type": "text", "text": "NULL"}]
    parts: list[dict] = []
    for video in videos:
        if isinstance(video, list):
            parts.append(
                {
                    "type": "video",
                    "video": _sample_frame_list(video, options.max_frames),
                    "total_pixels": options.total_pixels,
                }
            )
        else:
            window = {k: float(item[k]) for k in ("video_start", "video_end") if item.get(k) is not None}
            parts.append(
                {
                    "type": "video",
                    "video": os.fspath(video),
                    "fps": fps,
                    "max_frames": max_frames,
                    "total_pixels": options.total_pixels,
                    **window,
                }
            )
    for image in images:
        source = image if isinstance(image, (Image.Image, PdfPage)) else os.fspath(image)
        parts.append(
            {"type": "image", "image": source, "min_pixels": options.min_pixels, "max_pixels": options.max_pixels}
        )
    parts.extend({"type": "text", "text": text} for text in texts)
    return parts


def describe(source: Any) -> str:
    """A short name for a media source, for error messages."""
    if isinstance(source, Image.Image):
        return f"PIL image {source.size[0]}x{source.size[1]}"
    if isinstance(source, list):
        return f"frame list of {len(source)}"
    if isinstance(source, PdfPage):
        return str(source)
    if isinstance(source, str) and is_data_uri(source):
        return f"data URI {source[:source.find(',') + 1][:40]}... ({len(source)} characters)"
    return repr(os.fspath(source))


def failure(kind: str, source: Any, reason: str) -> MediaError:
    """The error for a media source that cannot be used: names it and says why."""
    return MediaError(f"{kind} {describe(source)}: {reason}", reason=reason)


def media_reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not a readable image (corrupt or unsupported format)"
    if isinstance(exc, (OSError, SyntaxError)) and not isinstance(exc, urllib.error.URLError):
        return f"not a readable image (corrupt or truncated: {exc})"
    if isinstance(exc, Image.DecompressionBombError):
        return f"image has too many pixels (decompression bomb limit; the cap is {MAX_IMAGE_PIXELS // 10**6} MP)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if type(exc).__name__ == "DECORDError":  # "[time] file.cc:151: Check failed: ... ERROR what went wrong"
        if "cannot find video stream" in text:
            return "has no video stream"
        return "cannot read video: " + text.rsplit("ERROR ", 1)[-1].rsplit(": ", 1)[-1]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def local_path(source: str) -> str:
    return source[7:] if source.startswith("file://") else source


def fetch_url(url: str) -> bytes:
    """Download a URL with a timeout and a size cap."""
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            data = response.read(URL_MAX_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise MediaError(f"cannot fetch {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise MediaError(f"cannot fetch {url}: {reason}") from None
    if len(data) > URL_MAX_BYTES:
        raise MediaError(f"cannot fetch {url}: larger than {URL_MAX_BYTES // 2**20} MiB")
    return data


def data_uri_bytes(uri: str) -> bytes:
    """The bytes of a base64 `data:` URI (`data:image/png;base64,...`)."""
    header, _, data = uri.partition(",")
    if not header.endswith(";base64"):
        raise MediaError(f"{describe(uri)}: only base64 data URIs are accepted")
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise MediaError(f"{describe(uri)}: not valid base64 ({exc})") from None


def remote_bytes(source: str) -> bytes:
    """The content of a URL or a data URI."""
    return data_uri_bytes(source) if is_data_uri(source) else fetch_url(source)


def open_image(source: str | Image.Image, needed_pixels: int = PREVIEW_MIN_PIXELS) -> Image.Image:
    """Decode an image from a path, a URL, a data URI or a PIL image (fully loaded, file closed), as shown:
    its EXIF orientation applied (see `orientation`).

    The content must start with the signature of a supported image format, and the size its header
    gives must be within MAX_IMAGE_PIXELS, before anything is decoded. A camera RAW file gives its embedded
    preview when that has `needed_pixels`, else a half-size demosaic (see `raw`).
    """
    if isinstance(source, Image.Image):
        return source
    try:
        remote = is_url(source) or is_data_uri(source)
        with io.BytesIO(remote_bytes(source)) if remote else open(local_path(source), "rb") as file:
            head = file.read(HEAD_BYTES)
            found = image_format(head)
            if found is None:
                reason = f"not a readable image ({describe_content(head)}; {IMAGE_FORMATS} are read)"
                raise failure("image", source, reason)
            file.seek(0)
            # LibRaw reads a file only when both its name (a URL's path) and its first bytes say RAW
            name = source.split("?")[0] if is_url(source) else "" if remote else source
            if (found in RAW_FORMATS or found == "tiff") and is_raw_name(name):
                return open_raw(file, MAX_IMAGE_PIXELS, needed_pixels)
            with Image.open(file) as image:  # the header only
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise failure("image", source, f"image has too many pixels: {width}x{height} is "
                                  f"{width * height / 1e6:.0f} MP, the cap is {MAX_IMAGE_PIXELS // 10**6} MP")
                image.load()
                if image.mode == "P" and "transparency" in image.info:
                    # Pillow's advice (it warns when such an image becomes RGB); transparent parts then turn white.
                    return upright(image.convert("RGBA"), orientation_of(image))
                return upright(image)
    except MediaError:
        raise
    except RawError as exc:
        raise failure("image", source, str(exc)) from None
    except Exception as exc:  # PIL raises many types for bad files
        raise failure("image", source, media_reason(exc)) from None


def _load_image(part: dict) -> tuple[Image.Image, tuple[int, int]]:
    source = part["image"]
    image = source.render(part["max_pixels"]) if isinstance(source, PdfPage) else open_image(source, part["max_pixels"])
    try:
        size = image.info.get(PHOTO_SIZE, image.size)  # a RAW file's full size, not its preview's
        return fitted_rgb(image, part, IMAGE_PATCH_SIZE * vision_process.SPATIAL_MERGE_SIZE), size
    except Exception as exc:
        raise failure("image", part["image"], media_reason(exc)) from None


def _load_video_file(part: dict) -> tuple[Any, dict]:
    """A video file, URL or data URI: its container checked by content, then its sampled frames decoded.

    A URL's or data URI's bytes are checked before they are written to a file that only this user can
    read, in a folder of its own, removed afterwards.
    """
    source = part["video"]
    data = remote_bytes(source) if is_url(source) or is_data_uri(source) else None  # its errors name the source
    try:
        if data is None:
            path = local_path(source)
            if os.path.isdir(path):
                raise IsADirectoryError(path)
            return _read_video_file(path, part)
        demuxer_for(data[:HEAD_BYTES])
        with tempfile.TemporaryDirectory(prefix="qvlsearch-video-") as folder:  # mode 0700
            path = os.path.join(folder, "video")
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
                out.write(data)
            del data
            return _read_video_file(path, part)
    except MediaError as exc:
        raise failure("video", source, exc.reason) from None
    except Exception as exc:  # a file that cannot be opened, or what a decoder raises for bad data
        raise failure("video", source, media_reason(exc)) from None


def _read_video_file(path: str, part: dict) -> tuple[Any, dict]:
    """The frames and metadata of a local video, by PyAV or by the qwen-vl-utils reader that
    FORCE_QWENVL_VIDEO_READER names (never its fallback to torchvision); each checks the container first."""
    reader = os.environ.get(VIDEO_READER_VARIABLE, "").strip() or "pyav"
    if reader == "pyav":
        video, metadata, _ = read_video(path, {**part, "video": path}, IMAGE_PATCH_SIZE)
        return video, metadata
    if reader not in vision_process.VIDEO_READER_BACKENDS:
        readers = ", ".join(["pyav", *vision_process.VIDEO_READER_BACKENDS])
        raise MediaError(f"{VIDEO_READER_VARIABLE}={reader} is not a video reader ({readers})")
    if importlib.util.find_spec(reader) is None:  # decord and torchcodec are optional
        extra = f"pip install 'qvlsearch[{reader}]'" if reader == "decord" else f"pip install {reader}"
        raise MediaError(f"{VIDEO_READER_VARIABLE}={reader}, but {reader} is not installed: {extra}, or unset "
                         f"{VIDEO_READER_VARIABLE} to read videos with PyAV")
    container_of(path)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # decord prints its own errors
            frames, metadata, _ = vision_process.VIDEO_READER_BACKENDS[reader]({**part, "video": path})
        if len(frames) < 2:
            raise MediaError(f"has {len(frames)} frame(s); at least 2 are needed")
        size = frame_size(part, frames.shape[0], frames.shape[2], frames.shape[3], IMAGE_PATCH_SIZE)
        return torch.stack([resize_frame(frame, size) for frame in frames]).float(), metadata
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(media_reason(exc)) from None


def _load_frame_list(part: dict) -> tuple[Any, dict]:
    """A video given as frames: each decoded, then resized as `fetch_video` resizes a frame list, one at a time."""
    info = {key: value for key, value in part.items() if key not in ("type", "video")}
    nframes = vision_process.ceil_by_factor(len(part["video"]), vision_process.FRAME_FACTOR)
    frames: list[torch.Tensor] = []
    size = first = None
    for source in part["video"]:
        image = open_image(source if isinstance(source, Image.Image) else os.fspath(source))
        try:
            frame = torch.from_numpy(_list_frame(image, info).transpose(2, 0, 1))
            del image
            if first is None:
                first = tuple(frame.shape)
                size = frame_size(info, nframes, frame.shape[1], frame.shape[2], IMAGE_PATCH_SIZE)
            elif tuple(frame.shape) != first:
                raise ValueError(f"frames differ in size ({first[2]}x{first[1]} and {frame.shape[2]}x{frame.shape[1]}"
                                 " after resizing)")
            frames.append(resize_frame(frame, size))
        except Exception as exc:
            raise failure("video", part["video"], media_reason(exc)) from None
    frames.extend([frames[-1]] * (nframes - len(frames)))
    sample_fps = info.get("sample_fps", 2.0)
    raw_fps = info.get("raw_fps", sample_fps)
    metadata = {"fps": raw_fps, "frames_indices": list(range(nframes)),
                "total_num_frames": nframes / sample_fps * raw_fps}
    return torch.stack(frames).float(), metadata


def fitted_rgb(image: Image.Image, info: dict, factor: int) -> Image.Image:
    """`image` in RGB at the size qwen-vl-utils' `fetch_image` gives it (sides multiples of `factor`, within the
    part's pixel bounds), with the same pixels, but without fetch_image's full-size RGB copy of an RGB image
    (192 MB for an 8000x8000 photo): an RGB image is resized first, anything else turned to RGB first."""
    image = image if image.mode == "RGB" else vision_process.to_rgb(image)
    if "resized_height" in info and "resized_width" in info:
        height, width = vision_process.smart_resize(info["resized_height"], info["resized_width"], factor=factor)
    else:
        height, width = vision_process.smart_resize(
            image.height, image.width, factor=factor,
            min_pixels=info.get("min_pixels", vision_process.IMAGE_MIN_TOKEN_NUM * factor**2),
            max_pixels=info.get("max_pixels", vision_process.IMAGE_MAX_TOKEN_NUM * factor**2))
    return image if image.size == (width, height) else image.resize((width, height))  # Pillow would copy it


def _list_frame(image: Image.Image, info: dict) -> np.ndarray:
    """A frame of a frame list as `fetch_video` first resizes it (`fetch_image`, to which qwen-vl-utils passes
    the merged patch size as the patch size)."""
    image = fitted_rgb(image, info, IMAGE_PATCH_SIZE * vision_process.SPATIAL_MERGE_SIZE**2)
    width, height = image.size
    pixels = np.empty((height, width, 3), np.uint8)
    for top in range(0, height, STRIP_ROWS):  # np.asarray of the whole image would hold two more copies at once
        pixels[top:top + STRIP_ROWS] = np.asarray(image.crop((0, top, width, min(top + STRIP_ROWS, height))))
    return pixels


def load_media(parts: list[dict]) -> LoadedMedia:
    """Decode and resize every image and video in `parts`; raises MediaError for the first bad one."""
    media = LoadedMedia(content=parts, images=[], videos=[])
    for part in parts:
        if part["type"] == "image":
            image, size = _load_image(part)
            media.images.append(image)
            media.image_sizes.append(size)
        elif part["type"] == "video":
            load = _load_frame_list if isinstance(part["video"], list) else _load_video_file
            media.videos.append(load(part))
    return media
