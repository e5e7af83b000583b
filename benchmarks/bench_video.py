"""Benchmark: the PyAV video reader (the default) against qwen-vl-utils' decord reader (FORCE_QWENVL_VIDEO_READER=
decord, the `decord` extra). Agreement: the cosine of the `tiny` embedder's vectors read each way, for the sample
videos whole and as their moments (goal >= 0.9999, the worst reported). Speed: sampled frames read, rotated and
resized per second, on the sample videos and on a 60 s 640x360 30 fps H.264 video (goal: PyAV no slower, ratio
PyAV/decord >= 1), best of 7 of each, alternated.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

from common import Figure, run_standalone

from qvlsearch.moments import MOMENT_FRAMES, video_duration, windows

SAMPLES = Path(__file__).resolve().parent.parent / "sample_data" / "videos"
ROUNDS = 7  # best of 7, the readers alternated: a sample video takes tens of milliseconds, and one run is noise


@contextmanager
def reader(name: str | None):
    """Videos read by qwen-vl-utils' reader `name`, or by PyAV when None."""
    before = os.environ.pop("FORCE_QWENVL_VIDEO_READER", None)
    if name:
        os.environ["FORCE_QWENVL_VIDEO_READER"] = name
    try:
        yield
    finally:
        os.environ.pop("FORCE_QWENVL_VIDEO_READER", None)
        if before is not None:
            os.environ["FORCE_QWENVL_VIDEO_READER"] = before


def minute_video(path: Path) -> Path:
    """60 s of 640x360 at 30 fps, H.264 with a keyframe every 2 s: a moving gradient with noise."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    x = np.arange(640)[None, :]
    y = np.arange(360)[:, None]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30, options={"g": "60", "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        for n in range(1800):
            base = ((x + 4 * n) % 256 + (y + 2 * n) % 256) // 2
            rgb = np.stack([base, 255 - base, (base * 3 + n) % 256], -1).astype(np.uint8)
            rgb = np.clip(rgb.astype(np.int16) + rng.integers(-8, 8, rgb.shape), 0, 255).astype(np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    return path


def read_s(path: Path, item: dict) -> tuple[float, int]:
    """Seconds to read and resize one video item's frames, and how many frames."""
    from qvlsearch.media import VisionOptions, content_parts, load_media

    started = time.perf_counter()
    media = load_media(content_parts({"video": str(path), **item}, VisionOptions()))
    return time.perf_counter() - started, int(media.videos[0][0].shape[0])


def run(workdir: Path, checkpoints: dict[str, Path]) -> list[Figure]:
    import numpy as np
    import torch

    from qvlsearch import Embedder

    videos = sorted(SAMPLES.glob("*.mp4"))
    embedder = Embedder(str(checkpoints["embedder"]), device="cpu")
    items = [{"video": str(v)} for v in videos]
    moments = [{"video": str(v), "video_start": s, "video_end": e, "max_frames": MOMENT_FRAMES}
               for v in videos for s, e in windows(video_duration(str(v)), 2.0)]
    figures = []
    for name, batch in (("whole videos", items), ("moments (2 s windows)", moments)):
        with reader(None):
            pyav = torch.from_numpy(np.asarray(embedder.embed(batch)))
        with reader("decord"):
            decord = torch.from_numpy(np.asarray(embedder.embed(batch)))
        cosines = torch.nn.functional.cosine_similarity(pyav, decord)
        figures.append(Figure("video", f"cosine PyAV vs decord, {name}, worst of {len(batch)}", float(cosines.min()),
                              "", goal=">= 0.9999", detail={"mean": float(cosines.mean())}))
    long = minute_video(workdir / "minute.mp4")
    for name, path, item in [("sample videos (1 fps, <= 64 frames)", None, {}),
                             ("60 s 30 fps video, 1 fps", long, {}),
                             ("60 s 30 fps video, 4 fps", long, {"fps": 4.0, "max_frames": 240}),
                             ("60 s 30 fps video, a 10 s moment", long,
                              {"video_start": 25.0, "video_end": 35.0, "max_frames": MOMENT_FRAMES})]:
        paths = videos if path is None else [path]
        best = {}
        for _ in range(ROUNDS):
            for label in ("pyav", "decord"):
                with reader(None if label == "pyav" else "decord"):
                    runs = [read_s(p, item) for p in paths]
                seconds, frames = sum(r[0] for r in runs), sum(r[1] for r in runs)
                best[label] = max(best.get(label, 0.0), frames / seconds)
        detail = {"pyav_frames_per_s": round(best["pyav"], 1), "decord_frames_per_s": round(best["decord"], 1)}
        figures.append(Figure("video", f"frames/s PyAV / decord, {name}", best["pyav"] / best["decord"], "x",
                              goal=">= 1", detail=detail))
    return figures


if __name__ == "__main__":
    run_standalone(run, "video", budget_s=1200)
