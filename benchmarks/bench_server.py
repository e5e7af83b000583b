"""`qvlsearch serve`: `search` start to output with a server against without one, and
/v1/embeddings requests per second and latency (p50/p99) at 1, 8 and 32 concurrent clients.

    python benchmarks/bench_server.py [--items N] [--requests N] [--preset tiny|small]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from bench_search import make_index, timed
from common import Figure, report, save

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
CLIENTS = (1, 8, 32)


def start_server(index: Path, reranker: Path) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "qvlsearch", "serve", "--index", str(index), "--port", "0",
                               "--reranker", str(reranker)], env=ENV, stderr=subprocess.DEVNULL)
    while not (index / "server.json").exists():
        if server.poll() is not None:
            raise SystemExit("the server did not start")
        time.sleep(0.2)
    return server


def embeddings_load(url: str, model: str, clients: int, requests: int) -> tuple[float, list[float]]:
    """(requests per second, latencies in s) of `requests` one-text requests from `clients` threads at once."""

    def one(n: int) -> float:
        body = json.dumps({"model": model, "input": f"request {n}: a black cat asleep on a wooden chair"}).encode()
        request = urllib.request.Request(url + "/v1/embeddings", data=body,
                                         headers={"Content-Type": "application/json"})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(requests)))
    return requests / (time.perf_counter() - started), latencies


def run(workdir: Path, checkpoints: dict[str, Path], items: int = 10_000, requests: int = 96,
        preset: str = "tiny") -> list[Figure]:
    index = workdir / "server-index"
    make_index(index, checkpoints["embedder"], items)
    cli = [sys.executable, "-m", "qvlsearch", "search", "a cat", "--index", str(index), "-k", "10"]
    server = start_server(index, checkpoints["reranker"])
    figures = []
    try:
        url = json.loads((index / "server.json").read_text())["url"]
        embeddings_load(url, str(checkpoints["embedder"]), 4, 8)  # warm-up
        version = [sys.executable, "-m", "qvlsearch", "--version"]  # Python and Typer starting: the floor
        runs = timed({"with_server": cli, "without_server": [*cli, "--no-server"], "version": version}, repeats=3)
        best = {name: min(times) for name, times in runs.items()}
        detail = {"items": items, "runs_s": {name: [round(t, 3) for t in times] for name, times in runs.items()}}
        figures += [
            Figure("server", f"search start to output, with a server ({items} items)", best["with_server"], "s",
                   goal="<= 0.5", detail=detail),
            Figure("server", f"search start to output, without ({items} items)", best["without_server"], "s",
                   detail=detail),
            Figure("server", "qvlsearch --version (the CLI's own start), same run", best["version"], "s",
                   detail=detail),
        ]
        rates = {}
        for clients in CLIENTS:
            rate, latencies = embeddings_load(url, str(checkpoints["embedder"]), clients, requests)
            rates[clients] = rate
            p50, p99 = np.percentile(latencies, [50, 99])
            detail = {"preset": preset, "clients": clients, "requests": requests}
            figures += [Figure("server", f"/v1/embeddings req/s, {clients} clients ({preset})", rate, "req/s",
                               detail=detail),
                        Figure("server", f"/v1/embeddings p50 / p99, {clients} clients ({preset})", p50 * 1000, "ms",
                               detail={**detail, "p99_ms": round(p99 * 1000, 1)})]
        figures.append(Figure("server", f"req/s at 8 clients / at 1 ({preset})", rates[8] / rates[1], "x",
                              detail={"note": "above 1: concurrent requests share forward passes"}))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10_000, help="items in the searched index")
    parser.add_argument("--requests", type=int, default=96, help="/v1/embeddings requests per client count")
    parser.add_argument("--preset", default="tiny", choices=("tiny", "small"), help="checkpoint shapes")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        from qvlsearch.tiny import build_checkpoints

        checkpoints = build_checkpoints(Path(tmp) / args.preset, preset=args.preset)
        figures = run(Path(tmp), checkpoints, args.items, args.requests, args.preset)
    print(report(figures))
    print(f"results: {save(figures, suite=f'server-{args.preset}')}  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
