"""Benchmark: what moments cost. A 2-minute video (the three-part clip of tests/make_media.py, four times)
is embedded whole and as its 10-second moments, with the `tiny` and `small` checkpoints; the figure is the
moments' cost relative to the whole-file vector, per video-hour.

The whole-file vector of any video is capped at `max_frames` (64) frames, so it costs about the same for a
2-minute and a 1-hour video; an hour has 360 moments of 10 s (at most MAX_MOMENTS = 300 windows, which then
widen to 12 s), each at most MOMENT_FRAMES (8) frames. So per video-hour, moments cost
30 × (moments of 2 minutes) / (the whole-file vector).
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import Figure, best_of, run_standalone

from qvlsearch.moments import MAX_MOMENTS, MOMENT_FRAMES, windows


def long_video(path: Path) -> Path:
    import av
    from make_media import make_three_part_video

    part = make_three_part_video(path.with_name("part.mp4"))
    with av.open(str(part)) as src:
        frames = [frame.to_ndarray(format="rgb24") for frame in src.decode(video=0)]
    with av.open(str(path), "w") as dst:
        stream = dst.add_stream("libx264", rate=2)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for _ in range(4):
            for frame in frames:
                dst.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        dst.mux(stream.encode())
    return path


def figures_for(preset: str, checkpoint: Path, video: Path) -> list[Figure]:
    from qvlsearch import Embedder

    embedder = Embedder(str(checkpoint), device="cpu")
    moments = [{"video": str(video), "video_start": start, "video_end": end, "max_frames": MOMENT_FRAMES}
               for start, end in windows(120.0)]
    whole_s = best_of(lambda: embedder.embed([{"video": str(video)}]), 2)
    moments_s = best_of(lambda: embedder.embed(moments), 2)
    per_hour = min(360, MAX_MOMENTS) / len(moments) * moments_s / whole_s
    detail = {"video_s": 120, "moments": len(moments), "whole_s": round(whole_s, 3), "moments_s": round(moments_s, 3)}
    return [Figure("moments", f"{preset}: moments of a 2-minute video / its whole-file vector", moments_s / whole_s,
                   "x", detail=detail),
            Figure("moments", f"{preset}: moments per video-hour / the whole-file vector", per_hour, "x",
                   detail=detail)]


def run(workdir: Path, checkpoints: dict[str, Path]) -> list[Figure]:
    from qvlsearch.tiny import build_checkpoints

    video = long_video(workdir / "two-minutes.mp4")
    small = build_checkpoints(workdir / "small", preset="small")
    return figures_for("tiny", checkpoints["embedder"], video) + figures_for("small", small["embedder"], video)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    run_standalone(run, "moments", budget_s=300)
