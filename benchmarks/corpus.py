"""Generate a benchmark corpus: JPEG/PNG photos of mixed sizes (256×256 to 4000×3000),
short H.264 videos and text files. Generated on demand, never committed."""

from __future__ import annotations

import random
from pathlib import Path

import common  # noqa: F401  (puts tests/ on sys.path, for make_media)
import numpy as np
from make_media import make_video
from PIL import Image, ImageDraw

SIZES = [(256, 256), (640, 480), (800, 600), (1024, 768), (1280, 960), (1920, 1080), (2592, 1944), (4000, 3000)]
WORDS = (
    "cat", "dog", "boat", "lake", "tree", "cake", "camera", "lens", "chess", "board", "bee", "flower",
    "sunset", "beach", "city", "night", "snow", "mountain", "river", "bridge", "garden", "kitchen", "window",
    "street", "market", "train", "station", "forest", "road", "house", "roof",
)


def photo(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A photo-like picture: a smooth gradient, shapes and sensor noise (so JPEG has real work to do)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * rng.uniform(80, 255), y / h * rng.uniform(80, 255),
                     np.full_like(x, rng.uniform(0, 255))], axis=-1)
    base += rng.normal(0, 12, base.shape).astype(np.float32)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        r = int(rng.integers(min(w, h) // 20, min(w, h) // 4))
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return image


def make_corpus(root: Path, *, images: int = 32, videos: int = 3, texts: int = 24, seed: int = 0,
                sizes: list[tuple[int, int]] = SIZES) -> Path:
    """Write the corpus under `root` (photos/, videos/, notes/) and return `root`."""
    rng = np.random.default_rng(seed)
    words = random.Random(seed)
    for folder in ("photos", "videos", "notes"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(images):
        size = sizes[i % len(sizes)]
        suffix = ".png" if i % 4 == 3 else ".jpg"
        photo(size, rng).save(root / "photos" / f"photo{i:04d}{suffix}", quality=90)
    for i in range(videos):
        make_video(root / "videos" / f"clip{i}.mp4", frames=24 + 12 * i, fps=8, size=(320, 240))
    for i in range(texts):
        n = words.randint(10, 300)
        (root / "notes" / f"note{i:04d}.txt").write_text(" ".join(words.choice(WORDS) for _ in range(n)) + "\n")
    return root
