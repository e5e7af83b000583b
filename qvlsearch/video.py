"""Read the frames a video item needs with PyAV, fenced to one local file in a supported container.

The container is told by its first bytes and read with its one FFmpeg demuxer through the handle
whose bytes were checked, with no protocol but `file` and no external references, so that a playlist,
a concat script or a reference to another file or URL is never followed. The frames sampled are
exactly those qwen-vl-utils' decord reader takes (the same frame count, average frame rate, window
and indices), rotated as decord rotates them, and each is resized as it is decoded to the size
`fetch_video` computes, so that the tensor equals `fetch_video`'s while only one full-size frame is
held at a time.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator
from typing import Any, BinaryIO

import av
import numpy as np
import torch
from PIL import Image
from qwen_vl_utils import vision_process
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf

from .errors import MediaError
from .signatures import HEAD_BYTES, MPEGTS, VIDEO_CONTAINERS, describe_content, video_demuxer

# Should a demuxer try to open anything besides the file it is given (none of the four does): the file protocol
# only, and no mov/mp4 data references to other files (FFmpeg's default, made explicit).
OPEN_OPTIONS = {"protocol_whitelist": "file", "enable_drefs": "0"}
# Decoders that honour a change of skip_frame between packets (others, as libdav1d, read it once when opened)
SKIPPING_DECODERS = {"h264", "hevc"}
BACKEND = "pyav"  # the name transformers gives this reader in video metadata


def container_of(path: str) -> str:
    """The FFmpeg demuxer for the file's container; MediaError(reason) when it is not a supported one."""
    with open(path, "rb") as file:
        return demuxer_for(file.read(HEAD_BYTES))


def demuxer_for(head: bytes) -> str:
    """The FFmpeg demuxer for content starting with `head`; MediaError(reason) when it is no supported container."""
    demuxer = video_demuxer(head)
    if demuxer is None:
        reason = f"not a supported video container ({describe_content(head)}; {VIDEO_CONTAINERS} are read)"
        raise MediaError(reason, reason=reason)
    return demuxer


def frame_size(ele: dict[str, Any], nframes: int, height: int, width: int, image_patch_size: int) -> tuple[int, int]:
    """(height, width) that qwen-vl-utils' `fetch_video` resizes `nframes` frames of height×width to."""
    factor = image_patch_size * vision_process.SPATIAL_MERGE_SIZE
    min_pixels = ele.get("min_pixels", vision_process.VIDEO_MIN_TOKEN_NUM * factor * factor)
    total_pixels = ele.get("total_pixels", vision_process.MODEL_SEQ_LEN * factor * factor * 0.9)
    max_pixels = max(min(vision_process.VIDEO_MAX_TOKEN_NUM * factor * factor,
                         total_pixels / nframes * vision_process.FRAME_FACTOR), int(min_pixels * 1.05))
    max_pixels = min(ele.get("max_pixels", max_pixels), max_pixels)
    if "resized_height" in ele and "resized_width" in ele:
        return vision_process.smart_resize(ele["resized_height"], ele["resized_width"], factor=factor)
    return vision_process.smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def resize_frame(frame: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One uint8 C×H×W frame resized as `fetch_video` resizes a video (bicubic, antialiased, rounded to uint8).

    Channel by channel: the same numbers as the whole batch at once, with a float copy of one plane only.
    """
    return torch.cat([tvf.resize(plane, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)
                      for plane in frame.split(1)])


def read_video(path: str, ele: dict[str, Any], image_patch_size: int) -> tuple[torch.Tensor, dict, float]:
    """(frames T×C×H×W float, metadata, sample fps) as qwen-vl-utils' decord reader and `fetch_video` give them.

    `ele` is the video part: fps, max_frames, video_start/video_end, total_pixels, ... Raises MediaError
    with a one-line reason for an unsupported container, no video stream, fewer than 2 frames, a window
    outside the video, or frames that cannot be decoded.
    """
    with open(path, "rb") as file:  # one handle: the content checked is the content decoded
        return _read(file, demuxer_for(file.read(HEAD_BYTES)), ele, image_patch_size)


def _read(file: BinaryIO, demuxer: str, ele: dict[str, Any], image_patch_size: int
          ) -> tuple[torch.Tensor, dict, float]:
    with _open(file, demuxer) as container:
        if not container.streams.video:
            raise _error("has no video stream")
        stream = container.streams.best("video")
        stream_index, fps = stream.index, float(stream.average_rate or 0)
        try:
            total, pts, keys = _index(container, stream)
        except av.FFmpegError as exc:
            raise _error(f"cannot read video: {_ffmpeg_reason(exc)}") from None
    if total < 2:
        raise _error(f"has {total} frame(s); at least 2 are needed")
    if not fps > 0:
        raise _error("cannot read video: no frame rate")
    try:
        start, end, count = vision_process.calculate_video_frame_range(ele, total, fps)
        nframes = vision_process.smart_nframes(ele, total_frames=count, video_fps=fps)
    except ValueError as exc:
        raise _error(f"cannot sample frames: {exc}") from None
    indices = torch.linspace(start, end, nframes).round().long().tolist()
    wanted = sorted(set(indices))
    targets = wanted if pts is None else [pts[i] for i in wanted]
    seek_to = keys if demuxer != MPEGTS else []  # MPEG-TS has no index: seeking there lands near, not on, a frame
    try:
        try:
            frames = _decode(file, demuxer, stream_index, targets, seek_to, by_position=pts is None)
            resized = _resized(wanted, frames, ele, nframes, image_patch_size)
        except _SeekMissed:  # decode from the start instead
            frames = _decode(file, demuxer, stream_index, targets, [], by_position=pts is None)
            resized = _resized(wanted, frames, ele, nframes, image_patch_size)
    except av.FFmpegError as exc:
        raise _error(f"cannot decode frames ({_ffmpeg_reason(exc)})") from None
    except ValueError as exc:  # a frame missing, or a size smart_resize refuses
        raise _error(f"cannot decode frames ({exc})") from None
    video = torch.stack([resized[i] for i in indices]).float()
    metadata = {"fps": fps, "frames_indices": indices, "total_num_frames": count, "video_backend": BACKEND}
    return video, metadata, nframes / max(count, 1e-6) * fps


def frame_count_and_rate(path: str) -> tuple[int, float]:
    """(frames as decord counts them, average frame rate) of a video file, read without decoding frames."""
    with open(path, "rb") as file, _open(file, demuxer_for(file.read(HEAD_BYTES))) as container:
        if not container.streams.video:
            raise _error("has no video stream")
        stream = container.streams.best("video")
        try:
            total, _, _ = _index(container, stream)
        except av.FFmpegError as exc:
            raise _error(f"cannot read video: {_ffmpeg_reason(exc)}") from None
        return total, float(stream.average_rate or 0)


def frame_image(path: str, index: int) -> Image.Image:
    """Frame `index` of a video file (counted as decord counts, clamped to the video), turned upright."""
    with open(path, "rb") as file:
        demuxer = demuxer_for(file.read(HEAD_BYTES))
        with _open(file, demuxer) as container:
            if not container.streams.video:
                raise _error("has no video stream")
            stream = container.streams.best("video")
            stream_index = stream.index
            total, pts, keys = _index(container, stream)
        if total == 0:
            raise _error("has no frames")
        index = min(max(index, 0), total - 1)
        target = [index] if pts is None else [pts[index]]
        try:
            frame = next(_decode(file, demuxer, stream_index, target, keys if demuxer != MPEGTS else [],
                                 by_position=pts is None))
        except _SeekMissed:
            frame = next(_decode(file, demuxer, stream_index, target, [], by_position=pts is None))
    return Image.fromarray(np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), _quarter_turns(frame))))


def _resized(wanted: list[int], frames: Iterator[av.VideoFrame], ele: dict[str, Any], nframes: int,
             image_patch_size: int) -> dict[int, torch.Tensor]:
    """Each wanted frame, rotated as its display matrix says and resized as it comes: {index: C×H×W uint8}."""
    resized: dict[int, torch.Tensor] = {}
    size = None
    for index, frame in zip(wanted, frames, strict=True):
        rgb = np.rot90(frame.to_ndarray(format="rgb24"), _quarter_turns(frame))
        tensor = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
        size = size or frame_size(ele, nframes, tensor.shape[1], tensor.shape[2], image_patch_size)
        resized[index] = resize_frame(tensor, size)
    return resized


class _SeekMissed(Exception):
    """A seek landed on another frame than the keyframe asked for."""


def _open(file: BinaryIO, demuxer: str) -> av.container.InputContainer:
    """The file, from its start, as a container of the one format `demuxer` reads."""
    file.seek(0)
    try:
        return av.open(file, format=demuxer, options=OPEN_OPTIONS)
    except av.FFmpegError as exc:
        raise _error(f"cannot read video: {_ffmpeg_reason(exc)}") from None


def _error(reason: str) -> MediaError:
    return MediaError(reason, reason=reason)


def _ffmpeg_reason(exc: av.FFmpegError) -> str:
    """FFmpeg's words for an error, without the file name PyAV appends."""
    return (exc.strerror or str(exc)).strip().splitlines()[0].lower()


def _index(container: av.container.InputContainer, stream: av.VideoStream
           ) -> tuple[int, list[int] | None, list[int]]:
    """The stream's frames as decord counts them, read from the container without decoding: their number (its
    packets), their timestamps in presentation order (None when a packet has none), and the keyframes'."""
    pts: list[int | None] = []
    keys: list[int] = []
    for packet in container.demux(stream):
        if packet.size == 0:  # the flush packet at the end
            continue
        pts.append(packet.pts)
        if packet.is_keyframe and packet.pts is not None:
            keys.append(packet.pts)
    if any(p is None for p in pts):  # frames are then found by their order of decoding
        return len(pts), None, []
    return len(pts), sorted(pts), sorted(keys)  # type: ignore[arg-type]


def _decode(file: BinaryIO, demuxer: str, stream_index: int, targets: list[int], keys: list[int], by_position: bool
            ) -> Iterator[av.VideoFrame]:
    """The frames at the timestamps `targets` (ascending), in a fresh container: decoding forward, and seeking to
    the keyframe before a target when one of `keys` lies between the last decoded frame and it. Targets are
    positions in presentation order instead when the stream's packets have no timestamps."""
    with _open(file, demuxer) as container:
        stream = container.streams[stream_index]
        # One thread: files are decoded side by side (a decoder worker each), and the frames are resized
        # as they come; FFmpeg's own frame threads only contend with both (measured: up to 1.3x slower)
        stream.codec_context.thread_count = 1
        # MPEG-TS is left whole: an interlaced camcorder stream (AVCHD) may carry a frame's two fields in two packets
        wanted = None if by_position or demuxer == MPEGTS else set(targets)
        frames = _frames(container, stream, wanted)
        position = -math.inf  # timestamp (or position) of the last decoded frame
        count = -1
        for target in targets:
            key = keys[bisect.bisect_right(keys, target) - 1] if keys and keys[0] <= target else None
            if key is not None and key > position and key > keys[0]:
                container.seek(key, stream=stream, backward=True)
                frames = _frames(container, stream, wanted)
                first = next(frames, None)
                if first is None or first.pts != key:
                    raise _SeekMissed
                frames = itertools.chain([first], frames)
            for frame in frames:
                count += 1
                position = count if by_position else frame.pts
                if position is None:
                    raise ValueError("a decoded frame has no timestamp")
                if position >= target:
                    break
            else:
                raise ValueError("the video ends before its last sampled frame")
            if position != target:
                raise ValueError(f"no frame at timestamp {target} (the next one is at {position})")
            yield frame


def _frames(container: av.container.InputContainer, stream: av.VideoStream, wanted: set[int] | None
            ) -> Iterator[av.VideoFrame]:
    """The stream's frames from where the container stands, in presentation order. The H.264 and HEVC decoders are
    told to drop each non-reference frame (one that no other frame is predicted from: most B-frames) whose
    timestamp is not `wanted`, so that it is never decoded; the frames that remain decode to the same pixels."""
    codec = stream.codec_context
    skips = wanted is not None and codec.name in SKIPPING_DECODERS
    for packet in container.demux(stream):
        if skips:
            codec.skip_frame = "DEFAULT" if packet.pts is None or packet.pts in wanted else "NONREF"
        yield from packet.decode()


def _quarter_turns(frame: av.VideoFrame) -> int:
    """Counter-clockwise quarter turns that the display matrix asks for (its flips are ignored, as decord does)."""
    return round(frame.rotation / 90) % 4
