"""Moments of videos: the time windows that get a vector of their own, besides the whole file's.

A window of `seconds` (default 10) is embedded as a short video of at most MOMENT_FRAMES frames
sampled within it. A tail shorter than half a window joins the window before it, and a video that
would have one window (one shorter than one and a half windows) has no moments: its whole-file
vector is the moment. At most `max_moments` windows a video keep the cost of a long video bounded: past
that, the windows widen (a 10-hour video gets 120 s windows by default).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import av

from .video import OPEN_OPTIONS, container_of

MOMENT_SECONDS = 10.0
MOMENT_FRAMES = 8
MAX_MOMENTS = 300  # an hour of 12 s windows, or 10 hours of 120 s ones


def video_duration(path: str) -> float:
    """The video's duration in seconds as decord and the reader count it (packets / average frame rate), read
    without decoding frames, through the reader's container fence."""
    with av.open(path, format=container_of(path), options=OPEN_OPTIONS) as container:
        if not container.streams.video:
            return 0.0
        stream = container.streams.best("video")
        fps = float(stream.average_rate or 0)
        frames = sum(1 for packet in container.demux(stream) if packet.size)
    return frames / fps if fps else 0.0


def windows(duration: float, seconds: float = MOMENT_SECONDS, max_moments: int = MAX_MOMENTS
            ) -> list[tuple[float, float]]:
    """The moments of a video of `duration` seconds: [(start_s, end_s), ...], end exclusive, covering it all;
    none when one window would cover it all (that moment is the whole file)."""
    if seconds <= 0 or duration <= seconds:
        return []
    count = min(math.ceil(duration / seconds), max_moments)
    width = duration / count if count == max_moments else seconds
    if duration - (count - 1) * width < width / 2:  # a short tail joins the window before it
        count -= 1
    if count < 2:
        return []
    return [(round(k * width, 3), round(duration if k == count - 1 else (k + 1) * width, 3)) for k in range(count)]


def clock(seconds: float) -> str:
    """1:02 for 62 s; 1:02:03 past an hour."""
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def place(row: Mapping[str, Any]) -> str:
    """Where in its file a row or hit is: 'p. 3' for a PDF page, '1:02–1:12' for a video moment, '' for the file."""
    if row.get("page") is not None:
        return f"p. {row['page']}"
    if row.get("start_s") is not None:
        return f"{clock(row['start_s'])}–{clock(row['end_s'])}"
    return ""
