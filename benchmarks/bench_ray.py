"""Benchmark: `qvlsearch index --ray` against the local pipeline, and the driver's ingest rate alone.

1. The same corpus indexed by `qvlsearch index` and by `qvlsearch index --ray --ray-workers 2` (a local Ray
   instance with 2 CPU replicas), each a fresh process and a fresh index: overhead ratio, goal <= 1.3x.
2. What the driver can take in: synthetic 2048-wide float16 results (the 2B model's width) through the
   commit path (`Store.put`, a commit every 256 items, as `qvlsearch index` commits): goal >= 5,000 vectors/s,
   so that 100 GPUs at 50 items/s each are not starved.

    python benchmarks/bench_ray.py [--files N] [--vectors N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import Figure, report, save
from corpus import make_corpus

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
WIDTH = 2048


def index_once(root: Path, index: Path, embedder: Path, *extra: str) -> tuple[float, dict]:
    """Wall seconds of one `qvlsearch index` process, and its --json summary."""
    args = [sys.executable, "-m", "qvlsearch", "index", str(root), "--index", str(index), "--model", str(embedder),
            "--json", *extra]
    started = time.perf_counter()
    done = subprocess.run(args, check=True, capture_output=True, text=True, env=ENV)
    return time.perf_counter() - started, json.loads(done.stdout)


def overhead_figures(workdir: Path, embedder: Path, files: int) -> list[Figure]:
    root = make_corpus(workdir / "corpus-ray", images=files // 2, videos=1, texts=files - files // 2 - 1)
    local_s, local = index_once(root, workdir / "index-local", embedder)
    ray_s, on_ray = index_once(root, workdir / "index-ray", embedder, "--ray", "--ray-workers", "2")
    if on_ray["added"] != local["added"]:
        raise RuntimeError(f"--ray indexed {on_ray['added']} files, the local run {local['added']}")
    detail = {"files": local["total"], "local_s": round(local_s, 1), "ray_s": round(ray_s, 1),
              "local_indexer_s": local["seconds"], "ray_indexer_s": on_ray["seconds"],
              "note": "whole processes: Ray's start, its actors' start (importing torch, loading the model) and "
                      "the model work; 2 CPU replicas on the same cores as the local run's one model"}
    return [Figure("ray", "local index (tiny), whole process", local_s, "s", detail=detail),
            Figure("ray", "--ray, 2 CPU replicas, whole process", ray_s, "s", detail=detail),
            Figure("ray", "--ray / local", ray_s / local_s, "x", goal="<= 1.3", detail=detail)]


def ingest_rate(workdir: Path, vectors: int, commit_every: int) -> tuple[float, dict]:
    """The driver's side alone: rows and float16 vectors into the store, committed every `commit_every`,
    as results arrive. A first commit (untimed) pays the store's one-time imports."""
    from qvlsearch.indexer import IndexOptions, settings_of
    from qvlsearch.store import Store, now

    store = Store.create(workdir / f"index-ingest-{commit_every}",
                         settings_of(IndexOptions(model="synthetic"), WIDTH, "none", "flat"), WIDTH)
    rng = np.random.default_rng(0)
    block = rng.standard_normal((1024, WIDTH)).astype(np.float32)
    block = (block / np.linalg.norm(block, axis=1, keepdims=True)).astype(np.float16)
    stamp = now()

    def put(i: int) -> None:
        path = f"/data/photos/{i // 1000:05d}/photo{i:08d}.jpg"
        store.put({"id": store.new_id(), "path": path, "path_bytes": path.encode(), "root": "/data", "kind": "image",
                   "size": 100_000 + i, "mtime_ns": 1_700_000_000_000_000_000 + i, "content_hash": f"{i:032x}",
                   "width": 640, "height": 480, "duration_s": None, "frames": None, "tokens": 300, "status": "ok",
                   "error": None, "indexed_at": stamp}, block[i % len(block)])

    put(-1)
    store.commit()
    started = time.perf_counter()
    for i in range(vectors):
        put(i)
        if (i + 1) % commit_every == 0:
            store.commit()
    store.commit()
    seconds = time.perf_counter() - started
    return vectors / seconds, {"vectors": vectors, "width": WIDTH, "commit_every": commit_every,
                               "seconds": round(seconds, 2), "segments": len(store.manifest.get("segments", []))}


def ingest_figures(workdir: Path, vectors: int) -> list[Figure]:
    rate, detail = ingest_rate(workdir, vectors, 256)
    rate_4096, detail_4096 = ingest_rate(workdir, vectors, 4096)
    return [Figure("ray", f"driver ingest, {WIDTH}-wide float16, commit every 256", rate, "vectors/s",
                   goal=">= 5000", detail=detail),
            Figure("ray", "GPUs at 50 items/s one driver keeps fed", rate / 50, "GPUs", detail=detail),
            Figure("ray", "driver ingest, commit every 4096 (--commit-every 4096)", rate_4096, "vectors/s",
                   detail=detail_4096)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=48, help="corpus size for the overhead ratio")
    parser.add_argument("--vectors", type=int, default=20_000, help="synthetic results for the ingest rate")
    args = parser.parse_args()
    import tempfile

    from qvlsearch.tiny import build_checkpoints

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        figures = ingest_figures(work, args.vectors)
        figures += overhead_figures(work, build_checkpoints(work / "tiny")["embedder"], args.files)
    print(report(figures))
    print(f"results: {save(figures, suite='ray')}  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
