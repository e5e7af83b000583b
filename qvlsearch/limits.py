"""How images and videos become model inputs (`VisionOptions`), and the ranges the settings must lie in.

The ranges are qwen-vl-utils' own limits, restated here so that a setting is checked without importing
it (and torch): an image of at least 4 tokens and at most its cap of 16384, a video budget of at least
one pair of frames at its smallest frame size (128 tokens), and 2 frames or more (frames go in pairs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import check_setting

PIXELS_PER_TOKEN = 32 * 32  # a 16-pixel patch (media.IMAGE_PATCH_SIZE), merged 2×2 (SPATIAL_MERGE_SIZE)
# The most pixels an image (or a frame of a frame list) may have, checked from its header before it is decoded:
# a 50 MP camera photo and the 102 MP of medium-format cameras pass; decoding one at the cap takes about
# 0.4 GB (RGB) and its RGB copy as much again, which keeps a request's peak memory under 1 GiB.
MAX_IMAGE_PIXELS = 120_000_000
IMAGE_MIN_TOKENS, IMAGE_MAX_TOKENS, VIDEO_MIN_TOKENS, FRAME_FACTOR = 4, 16384, 128, 2  # qwen-vl-utils'

LIMITS: dict[str, dict[str, Any]] = {  # check_setting's arguments for each setting
    "max_pixels": dict(low=IMAGE_MIN_TOKENS * PIXELS_PER_TOKEN, high=IMAGE_MAX_TOKENS * PIXELS_PER_TOKEN),
    "total_pixels": dict(low=VIDEO_MIN_TOKENS * PIXELS_PER_TOKEN),
    "fps": dict(low=0, integer=False, above=True),
    "max_frames": dict(low=FRAME_FACTOR),
}


@dataclass(frozen=True)
class VisionOptions:
    """Resizing and sampling limits, as in the official constructors; out of range, a SettingError."""

    min_pixels: int = 4096
    max_pixels: int = 1843200
    total_pixels: int = 7864320
    fps: float = 1.0
    max_frames: int = 64

    def __post_init__(self) -> None:
        for name, limits in LIMITS.items():
            check_setting(name, getattr(self, name), **limits)
        check_setting("min_pixels", self.min_pixels, 1, self.max_pixels,
                      rule=f"an integer from 1 to the largest image size ({self.max_pixels})")
