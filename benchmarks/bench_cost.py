"""What it costs: seconds per item with the `2b` preset (the real architecture, random weights) on this machine.

    python benchmarks/bench_cost.py CHECKPOINTS [PART...]   # CHECKPOINTS: what `python -m qvlsearch.tiny DIR
                                                            # --preset 2b` wrote; PART: see PARTS (default: all)

One model load, then each cell timed through the Embedder as `index` runs it (decoding included), the media
settings changed with `Embedder.with_options` (same weights): a text query; a 1024×768 photo at max_pixels
1843200 (the default), 401408 and 200704; a 12 MP photo and a letter-size PDF page at the default; a minute of
320×240 video at fps 0.25 without and with its 6 moments; bfloat16 against float32 on a text query; and the
threads figure: `index` throughput on 2 photos against the model alone on 2 such photos, decoded beforehand
(goal >= 0.9). The cheap cells are the best of 2; the dear ones (12 MP, PDF, video) are one run each, to keep
the whole run near 20 minutes of a 2-core machine. The load average before and after is recorded.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import Figure, model_alone_s, report, save
from corpus import photo

from qvlsearch.limits import VisionOptions
from qvlsearch.moments import MOMENT_FRAMES, windows
from qvlsearch.pages import PdfPage

BENCH = "cost"
QUERY = {"text": "a dog running on a beach at sunset", "instruction": "Retrieve images or text relevant to the "
         "user's query."}


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def timed(embedder, items: list[dict], repeats: int) -> float:
    """The best of `repeats` runs of embedding `items` (all must succeed), in seconds per run."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        embedder.embed(items)
        best = min(best, time.perf_counter() - started)
    return best


PARTS = ("text", "photo-200704", "threads", "photo-401408", "photo-default", "photo-12mp", "pdf", "video", "bf16")


def main(checkpoints: Path, parts: list[str]) -> None:
    """Measure `parts` (default: all, in the order of PARTS); a subset saves as its own results file."""
    from make_media import make_pdf, make_video

    from qvlsearch import Embedder
    from qvlsearch.indexer import Indexer, IndexOptions

    unknown = set(parts) - set(PARTS)
    if unknown:
        sys.exit(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    suite = "cost" if not parts or set(parts) == set(PARTS) else "cost-" + "-".join(parts)
    parts = parts or list(PARTS)
    work = Path(tempfile.mkdtemp(prefix="bench-cost-"))
    rng = np.random.default_rng(0)
    photos = []
    for i in range(4):
        photos.append(work / "photos" / f"p{i}.jpg")
        photos[-1].parent.mkdir(parents=True, exist_ok=True)
        photo((1024, 768), rng).save(photos[-1], quality=90)
    big = work / "12mp.jpg"
    photo((4000, 3000), rng).save(big, quality=90)
    pdf = make_pdf(work / "page.pdf", [photo((612, 792), rng)])  # a letter-size page, drawn at 144 dpi
    video = make_video(work / "minute.mp4", frames=240, fps=4, size=(320, 240))
    model = str(checkpoints / "embedder")
    figures: list[Figure] = []
    loads = {"before": load()}
    print(f"load average before: {loads['before']}", file=sys.stderr)

    embedder = Embedder(model, device="cpu")
    default = embedder.options
    float32 = [embedder]  # let go before the bfloat16 model loads (2B parameters in float32: 9 GB)

    def cell(name: str, seconds: float, repeats: int, **detail) -> None:
        """A measured cell, saved at once: a run cut short keeps what it measured."""
        figures.append(Figure(BENCH, name, seconds, "s", detail={"best_of": repeats, "load": load(), **detail}))
        print(f"{name}: {seconds:.2f} s (best of {repeats}; load {load()})", file=sys.stderr, flush=True)
        save(figures, suite)

    def at(max_pixels: int = 0, fps: float = 0.0):
        """The embedder with another max_pixels or fps (the same weights)."""
        pixels = max_pixels or default.max_pixels
        return float32[0].with_options(VisionOptions(min(default.min_pixels, pixels), pixels, default.total_pixels,
                                                     fps or default.fps, default.max_frames))

    float32_query = None
    if "text" in parts:
        float32_query = timed(embedder, [QUERY], 2)
        cell("text query", float32_query, 2)
    for part, pixels in (("photo-200704", 200704), ("photo-401408", 401408), ("photo-default", default.max_pixels)):
        if part in parts:
            cell(f"photo 1024x768, max_pixels {pixels}", timed(at(pixels), [{"image": str(photos[0])}], 2), 2,
                 max_pixels=pixels)
    if "threads" in parts:  # index throughput against the model alone, on the same photos at max_pixels 200704
        alone = model_alone_s(at(200704), [{"image": str(p)} for p in photos[:2]]) / 2
        summary = Indexer(work / "index", IndexOptions(model=model, max_pixels=200704), embedder=at(200704)).run(
            [photos[2], photos[3]])
        indexed = summary.cost["seconds_per_item"]["image"]
        figures.append(Figure(BENCH, "index throughput / model alone (2 photos, max_pixels 200704)",
                              alone / indexed, "x", ">= 0.9",
                              detail={"model_alone_s_per_photo": round(alone, 2),
                                      "index_s_per_photo": round(indexed, 2), "load": load()}))
        print(f"threads: model alone {alone:.2f} s a photo, index {indexed:.2f} s: {alone / indexed:.2f}x",
              file=sys.stderr, flush=True)
        save(figures, suite)
    if "photo-12mp" in parts:
        cell("photo 12 MP (4000x3000), max_pixels 1843200", timed(embedder, [{"image": str(big)}], 1), 1)
    if "pdf" in parts:
        cell("PDF page (letter, 144 dpi), max_pixels 1843200",
             timed(embedder, [{"image": PdfPage(str(pdf), 1)}], 1), 1)
    if "video" in parts:
        whole = timed(at(fps=0.25), [{"video": str(video)}], 1)
        cell("video minute 320x240 at fps 0.25, no moments", whole, 1, fps=0.25)
        moments = [{"video": str(video), "video_start": s, "video_end": e, "max_frames": MOMENT_FRAMES}
                   for s, e in windows(60.0)]
        cell(f"video minute 320x240 at fps 0.25, with its {len(moments)} moments",
             whole + timed(at(fps=0.25), moments, 1), 1, fps=0.25, moments=len(moments))
    if "bf16" in parts:
        float32.clear()
        del embedder
        gc.collect()
        bf16 = Embedder(model, device="cpu", dtype="bfloat16")
        bf16_query = timed(bf16, [QUERY], 2)
        cell("text query, bfloat16", bf16_query, 2, dtype="bfloat16")
        if float32_query:
            figures.append(Figure(BENCH, "bfloat16 / float32, text query", bf16_query / float32_query, "x"))
    loads["after"] = load()
    print(f"load average after: {loads['after']}", file=sys.stderr)
    for figure in figures:
        figure.detail.update(load_before=loads["before"], load_after=loads["after"])
    print(report(figures))
    print(f"saved {save(figures, suite)}", file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    main(Path(sys.argv[1]), sys.argv[2:])
