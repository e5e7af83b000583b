"""`qvlsearch serve`: how much the worst requests within the 64 MiB body limit grow the server's memory.

Each request goes to a fresh server in its steady state (models loaded, each route used once).
The growth is that of the whole process tree (the server and any worker processes it has or
starts): the sum of each process's peak resident memory (VmHWM in /proc/PID/status, reset
through /proc/PID/clear_refs, sampled every 50 ms so that processes that end are counted)
less the tree's resident memory just before, printed beside the goal of 1 GiB.
The server runs the `wide` checkpoint (the real model's 2048-wide vectors on one cheap layer)
over an index of 2000 rows of the sample files.
Not a test: it takes minutes on a CPU and needs Linux's /proc.

    python benchmarks/bench_server_memory.py [--long-texts N] [--photo-items N] [--only TEXT] [--keep DIR]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench_search import make_index
from common import Figure, report

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
GOAL_MIB = 1024


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def tree(pid: int) -> list[int]:
    """`pid` and its descendants, as they are now (from each process's parent in /proc/N/stat)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):  # it ended meanwhile
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            parents.setdefault(parent, []).append(int(stat.parent.name))
    pids = [pid]
    for each in pids:
        pids += parents.get(each, [])
    return pids


class TreePeak:
    """The peak memory of a process tree from now on: each process's VmHWM, the highest seen, summed."""

    def __init__(self, pid: int):
        self.pid, self.peaks, self.done = pid, {}, threading.Event()
        for each in tree(pid):
            with open(f"/proc/{each}/clear_refs", "w") as f:
                f.write("5")  # the peak (VmHWM) starts again from the resident memory of now
        self.steady_kib = sum(status_kib(each, "VmRSS") for each in tree(pid))
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while True:
            for each in tree(self.pid):
                with contextlib.suppress(OSError, StopIteration):  # it ended (or is a zombie) meanwhile
                    self.peaks[each] = max(self.peaks.get(each, 0), status_kib(each, "VmHWM"))
            if self.done.wait(0.05):
                return

    def growth_mib(self) -> tuple[float, int]:
        """(peak less steady, in MiB; how many processes were seen)."""
        self.done.set()
        self.thread.join()
        return (sum(self.peaks.values()) - self.steady_kib) / 1024, len(self.peaks)


def post(url: str, path: str, body: dict) -> int:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=3600) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code


def data_uri(data: bytes, kind: str) -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def big_png(width: int, height: int) -> bytes:
    """A PNG that compresses to little (a gradient): many pixels in few bytes."""
    import numpy as np
    from PIL import Image

    row = np.linspace(0, 255, width, dtype=np.uint8)
    image = Image.fromarray(np.broadcast_to(row, (height, width)).copy(), "L").convert("RGB")
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=9)
    return out.getvalue()


def clip_720p(folder: Path) -> bytes:
    """A 10 s 1280×720 clip at 30 fps (about the issue's 1.2 MB video)."""
    from make_media import make_video

    return make_video(folder / "clip720.mp4", frames=300, fps=30, size=(1280, 720)).read_bytes()


def worst_requests(model: str, folder: Path, long_texts: int, photo_items: int) -> list[tuple[str, str, dict]]:
    """(name, route, body) of the heaviest requests a client may send, each under 64 MiB."""
    words = "the quick brown fox jumps over a lazy dog while cats sleep on warm chairs "
    long_text = (words * (100_000 // len(words) + 1))[:100_000]
    video = data_uri(clip_720p(folder), "video/mp4")
    png = data_uri(big_png(8000, 8000), "image/png")
    full = data_uri(big_png(1536, 1200), "image/png")  # as large as max_pixels lets an image stay
    return [
        ("256 inputs (the cap) of 1k characters", "/v1/embeddings", {"model": model, "input": [words * 13] * 256}),
        (f"{long_texts} inputs of 100k characters (the cap)", "/v1/embeddings",
         {"model": model, "input": [long_text] * long_texts}),
        ("720p video, fps 30, max_frames 300 (refused)", "/v1/embeddings",
         {"model": model, "input": [{"video": video, "fps": 30, "max_frames": 300}]}),
        ("720p video at the server's fps and max_frames", "/v1/embeddings",
         {"model": model, "input": [{"video": video}]}),
        ("frame list of three 8000x8000 PNGs", "/v1/embeddings", {"model": model, "input": [{"video": [png] * 3}]}),
        ("one item of four 8000x8000 PNGs (refused)", "/v1/embeddings",
         {"model": model, "input": [{"image": [png] * 4}]}),
        ("one item of three 8000x8000 PNGs (the cap)", "/v1/embeddings",
         {"model": model, "input": [{"image": [png] * 3}]}),
        ("one item of three 1536x1200 PNGs", "/v1/embeddings", {"model": model, "input": [{"image": [full] * 3}]}),
        (f"{photo_items} items of three 1536x1200 PNGs", "/v1/embeddings",
         {"model": model, "input": [{"image": [full] * 3}] * photo_items}),
        ("256 items of one 1536x1200 PNG", "/v1/embeddings", {"model": model, "input": [{"image": full}] * 256}),
        ("search k=1e21, rerank_top=1e20 (refused)", "/v1/search",
         {"query": "a cat", "k": 1e21, "rerank": True, "rerank_top": 1e20}),
        ("search k=1000 (the cap), rerank_top=200 (the cap)", "/v1/search",
         {"query": "a cat", "k": 1000, "rerank": True, "rerank_top": 200}),
        ("rerank 1000 documents (the cap) of 1k characters", "/v1/rerank",
         {"query": "a cat", "documents": [words * 13] * 1000}),
        (f"rerank {long_texts} documents of 100k characters", "/v1/rerank",
         {"query": long_text, "documents": [long_text] * long_texts}),
    ]


def started_server(index: Path, checkpoints: dict[str, Path]) -> tuple[subprocess.Popen, str]:
    """A fresh server in its steady state: each model loaded and each route used once."""
    server = subprocess.Popen([sys.executable, "-m", "qvlsearch", "serve", "--index", str(index), "--port", "0",
                               "--reranker", str(checkpoints["reranker"]), "--device", "cpu"], env=ENV)
    while not (index / "server.json").exists():
        if server.poll() is not None:
            raise SystemExit("the server did not start")
        time.sleep(0.2)
    url = json.loads((index / "server.json").read_text())["url"]
    for route, body in (("/v1/embeddings", {"model": str(checkpoints["embedder"]), "input": ["warm up"]}),
                        ("/v1/search", {"query": "a cat", "rerank": True, "rerank_top": 5}),
                        ("/v1/rerank", {"query": "a cat", "documents": ["a dog"]})):
        assert post(url, route, body) == 200, route
    return server, url


def run(folder: Path, long_texts: int, photo_items: int, only: str = "") -> list[Figure]:
    """Each request on a server of its own (memory that one request leaves resident would hide the next's)."""
    from qvlsearch.tiny import build_checkpoints

    checkpoints = build_checkpoints(folder / "wide", preset="wide")
    index = folder / "index"
    make_index(index, checkpoints["embedder"], 2000)
    figures = []
    for name, route, body in worst_requests(str(checkpoints["embedder"]), folder, long_texts, photo_items):
        if only not in name:
            continue
        server, url = started_server(index, checkpoints)
        try:
            peak = TreePeak(server.pid)
            started = time.perf_counter()
            status = post(url, route, body)
            growth, processes = peak.growth_mib()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        size = len(json.dumps(body)) / 2**20
        print(f"{name}: HTTP {status}, {size:.1f} MiB sent, {time.perf_counter() - started:.1f} s, steady "
              f"{peak.steady_kib / 1024:.0f} MiB in {processes} process(es), peak +{growth:.0f} MiB "
              f"(goal <= {GOAL_MIB} MiB)", flush=True)
        figures.append(Figure("server memory", f"{name} (HTTP {status})", growth, "MiB", goal=f"<= {GOAL_MIB}",
                              detail={"status": status, "body_mib": round(size, 2),
                                      "steady_mib": peak.steady_kib // 1024, "processes": processes}))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long-texts", type=int, default=4,
                        help="how many 100k-character texts the long-text requests send (default 4; the cap "
                             "allows 256, at many minutes each on a CPU)")
    parser.add_argument("--photo-items", type=int, default=60,
                        help="how many items of three full-size images one request sends (default 60; about 40 s "
                             "each on 2 CPU cores)")
    parser.add_argument("--only", default="", help="run only the requests whose name contains this text")
    parser.add_argument("--keep", type=Path, help="build the checkpoints and index here instead of a temp folder")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        figures = run(args.keep, args.long_texts, args.photo_items, args.only)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            figures = run(Path(tmp), args.long_texts, args.photo_items, args.only)
    print(report(figures))


if __name__ == "__main__":
    main()
