"""Benchmark: the PyAV video reader (`qvlsearch.video`) against qwen-vl-utils' decord reader.

Speed: each video read as an item reads it (sampled, resized to the model's size) by both readers in the
same run, best of 3; figures are sampled frames per second and the ratio of the times. Memory: the peak
resident memory (VmHWM) growth of one process that reads one video item, each in a fresh process, for
the PyAV reader and for qwen-vl-utils' `fetch_video` with decord (what qvlsearch ran before).
Videos: the sample videos, and generated H.264 clips: 720p at 30 fps for 60 s, 1080p at 30 fps for 120 s.

    python benchmarks/bench_video.py [--long-seconds 120]
"""

from __future__ import annotations

import argparse
import glob
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import av
import numpy as np
from common import Figure, best_of, report, save

ROOT = Path(__file__).resolve().parent.parent
PART = {"type": "video", "fps": 1.0, "max_frames": 64, "total_pixels": 7864320}

PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    reader, path, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

    def peak_mib():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024

    from qwen_vl_utils import vision_process
    from qvlsearch.video import read_video
    part = {"type": "video", "video": path, "fps": 1.0, "max_frames": 64, "total_pixels": 7864320, **extra}
    before = peak_mib()
    if reader == "pyav":
        frames, _, _ = read_video(path, part, 16)
    else:
        vision_process.FORCE_QWENVL_VIDEO_READER = "decord"
        (frames, _), _ = vision_process.fetch_video(part, image_patch_size=16, return_video_sample_fps=True,
                                                    return_video_metadata=True)
    print(json.dumps({"growth_mib": peak_mib() - before, "shape": list(frames.shape)}))
""")


def make_clip(path: Path, seconds: int, size: tuple[int, int], fps: int = 30) -> Path:
    """An H.264 clip of a gradient that scrolls and a square that moves (x264 defaults, 'veryfast')."""
    width, height = size
    ramp = np.linspace(0, 255, width, dtype=np.float32).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * fps):
            rgb = np.empty((height, width, 3), np.uint8)
            rgb[..., 0] = np.roll(ramp, 7 * i)[None, :]
            rgb[..., 1] = 80
            rgb[..., 2] = 255 - rgb[..., 0]
            left = (13 * i) % (width - height // 4)
            rgb[height // 3: height // 3 + height // 4, left: left + height // 4] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return path


def read_pyav(path: str, extra: dict) -> int:
    from qvlsearch.video import read_video

    frames, _, _ = read_video(path, {**PART, "video": path, **extra}, 16)
    return frames.shape[0]


def read_decord(path: str, extra: dict) -> int:
    from qwen_vl_utils import vision_process

    vision_process.FORCE_QWENVL_VIDEO_READER = "decord"
    (frames, _), _ = vision_process.fetch_video({**PART, "video": path, **extra}, image_patch_size=16,
                                                return_video_sample_fps=True, return_video_metadata=True)
    return frames.shape[0]


def peak_growth(reader: str, path: str, extra: dict) -> float:
    import json

    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, reader, path, json.dumps(extra)], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"]


def run(long_seconds: int) -> list[Figure]:
    figures = []
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        clip720 = str(make_clip(Path(folder) / "720p.mp4", 60, (1280, 720)))
        clip1080 = str(make_clip(Path(folder) / "1080p.mp4", long_seconds, (1920, 1080)))
        print(f"clips made in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        videos = [(Path(p).name, p, {}) for p in sorted(glob.glob(str(ROOT / "sample_data" / "videos" / "*.mp4")))]
        videos += [("720p 60 s", clip720, {}), (f"1080p {long_seconds} s", clip1080, {}),
                   (f"1080p {long_seconds} s, moment 30-40 s", clip1080, {"video_start": 30.0, "video_end": 40.0})]
        for name, path, extra in videos:
            count = read_pyav(path, extra)
            assert count == read_decord(path, extra)
            pyav_s = best_of(lambda p=path, e=extra: read_pyav(p, e))
            decord_s = best_of(lambda p=path, e=extra: read_decord(p, e))
            detail = {"frames": count, "pyav_s": round(pyav_s, 4), "decord_s": round(decord_s, 4),
                      "decord_frames_per_s": round(count / decord_s, 1)}
            figures.append(Figure("video", f"{name}: PyAV sampled frames per second", round(count / pyav_s, 1),
                                  "frames/s", detail=detail))
            figures.append(Figure("video", f"{name}: PyAV time / decord time", round(pyav_s / decord_s, 3), "x",
                                  "<= 1.0"))
        for name, path, extra in [("720p 60 s, fps 1, max_frames 64", clip720, {}),
                                  ("720p 60 s, fps 30, max_frames 300", clip720, {"fps": 30.0, "max_frames": 300}),
                                  (f"1080p {long_seconds} s, fps 1, max_frames 64", clip1080, {})]:
            pyav, decord = peak_growth("pyav", path, extra), peak_growth("decord", path, extra)
            figures.append(Figure("video", f"{name}: peak RSS growth, PyAV reader", round(pyav), "MiB", "<= 1024",
                                  detail={"decord_fetch_video_mib": round(decord)}))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long-seconds", type=int, default=120, help="length of the 1080p clip")
    args = parser.parse_args()
    figures = run(args.long_seconds)
    print(report(figures))
    print(f"saved to {save(figures, 'video')}")


if __name__ == "__main__":
    main()
