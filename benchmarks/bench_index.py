"""Benchmark 1: `qvlsearch index` against the decode floor, and against the official class per file.

The floor is the time to only read, decode and resize the same files (as the model needs
them) with the same number of worker threads. Index time includes sniffing, hashing, the
processor, the tiny model, FAISS and Parquet; goal: index ≤ 1.25 × floor.

The second comparison is what a user would otherwise write: the official embedder class
(tests/reference.py follows its algorithm) called on each file in a plain loop. Index and
loop alternate for 3 rounds and the best of each counts; goal: index ≤ 1.0 × loop.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import Figure, best_of, model_alone_s
from corpus import make_corpus
from reference import ReferenceEmbedder

from qvlsearch.fs import file_item, walk
from qvlsearch.media import VisionOptions, content_parts, load_media


def decode_floor(files: list[str], workers: int) -> None:
    """Read every file and decode/resize its media exactly as the Embedder does, nothing more."""
    options = VisionOptions()

    def load(path: str) -> None:
        item = file_item(path)
        if "text" not in item:
            load_media(content_parts(item, options))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(load, files))


def run(workdir: Path, checkpoints: dict[str, Path]) -> list[Figure]:
    from qvlsearch import Embedder
    from qvlsearch.indexer import Indexer, IndexOptions

    root = make_corpus(workdir / "corpus-index")
    files = [f.path for f in walk([root])]
    embedder = Embedder(str(checkpoints["embedder"]))
    workers = embedder.workers

    def index() -> None:
        target = workdir / "index-bench"
        shutil.rmtree(target, ignore_errors=True)
        Indexer(target, IndexOptions(model=str(checkpoints["embedder"])), embedder=embedder).run([root])

    index()  # warm-up: first-use costs (thread pools, allocator, file cache)
    floor = best_of(lambda: decode_floor(files, workers), 2)
    indexed = best_of(index, 2)
    items = [file_item(path) for path in files]
    model = min(model_alone_s(embedder, items) for _ in range(2))  # the tiny model's share of the index time
    official = ReferenceEmbedder(str(checkpoints["embedder"]))
    rounds: dict[str, list[float]] = {"index": [], "loop": []}
    for _ in range(3):  # alternating, so that both see the same load
        for name, run_once in (("index", index), ("loop", lambda: [official.process([item]) for item in items])):
            started = time.perf_counter()
            run_once()
            rounds[name].append(time.perf_counter() - started)
    per_file = {name: min(times) / len(files) for name, times in rounds.items()}
    detail = {"files": len(files), "workers": workers, "floor_s": round(floor, 3), "index_s": round(indexed, 3),
              "model_only_s": round(model, 3),
              "rounds_s": {name: [round(t, 3) for t in times] for name, times in rounds.items()}}
    return [
        Figure("index", "decode floor", floor, "s", detail=detail),
        Figure("index", "model alone, inputs ready (tiny)", model, "s", detail=detail),
        Figure("index", "qvlsearch index (tiny model)", indexed, "s", detail=detail),
        Figure("index", "index time / decode floor", indexed / floor, "x", goal="<= 1.25", detail=detail),
        Figure("index", "index time / (floor + model alone)", indexed / (floor + model), "x", detail=detail),
        Figure("index", "official class on each file in a loop (tiny model)", per_file["loop"] * 1e3, "ms/file",
               detail=detail),
        Figure("index", "qvlsearch index, alternating with that loop", per_file["index"] * 1e3, "ms/file",
               detail=detail),
        Figure("index", "index per file / official loop per file", per_file["index"] / per_file["loop"], "x",
               goal="<= 1.0", detail=detail),
    ]
