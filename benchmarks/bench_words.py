"""Benchmark: words as well as meaning (SQLite FTS5 per segment) at 100k and 1M rows of synthetic text.

(a) A words query (`SearchIndex.search(mode="words")`, end to end: every segment's BM25 top, the filters,
    the hits' rows and the words they matched) over indexes of 100k and 1M rows in 9 segments (the most
    the merge policy leaves in one tier), median of the queries: a rare token (an invoice number, one
    row), a word of middling frequency, two words (AND) and a quoted phrase. Goal: ≤ 20 ms at 1M rows.
    Also the words database's bytes per row. Each row's text: 30 words drawn from a Zipf vocabulary
    of 50,000 made-up words, an invoice number unique to the row, and its file name.
(b) Hybrid against semantic at 100k × 2048 (flat): `search(mode=...)` with the query vector given
    (the model's time is the same in both and left out), median over the queries, taken in turns.
    Goal: hybrid no slower than semantic plus the words query.
(c) A commit of +1,000 rows with their words into 10k, 100k and 1M rows (fresh writer process, best of
    3, as bench_store.py measures it): at width 2048 for 10k and 100k, and at width 16 for 10k to 1M (a
    1M × 2048 index takes 8 GB and most of an hour to build here, more than this run's 15 minutes;
    bench_store.py measures the vectors' side at 1M × 2048). Goal: 1M ÷ 10k ≤ 1.5.
    Each index is built once (10k in one segment, 100k and 1M in 9): its queries first, then the commits.

    python benchmarks/bench_words.py                                # 10-15 minutes on 2 cores
    python benchmarks/bench_words.py --sizes 10000,100000 --queries 20   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from common import Figure, run_standalone

from qvlsearch.search import SearchIndex
from qvlsearch.store import ITEM_SCHEMA, Store, now
from qvlsearch.store.files import write_manifest
from qvlsearch.store.segments import save_npy
from qvlsearch.store.writer import segment_words
from qvlsearch.words import write_words

SIZES = (10_000, 100_000, 1_000_000)
SEGMENTS = 9
WORDS_PER_ROW, VOCABULARY = 30, 50_000
NEW_ROWS, REPEATS = 1_000, 3
WIDE, NARROW = 2048, 16
QUERIES = 40
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
MiB = 1 << 20

COMMIT = textwrap.dedent("""
    # One writer process: open the index, put N fresh rows with their words, commit; print the commit's seconds.
    import json, sys, time
    import faiss, numpy as np, pyarrow as pa
    from qvlsearch.store import ITEM_SCHEMA, Store, now
    from qvlsearch.words import write_words
    pa.Table.from_pylist([{"id": 0, "indexed_at": now()}], schema=ITEM_SCHEMA)  # pyarrow imports pandas for this
    path, count, seed, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, width), dtype=np.float32).astype(np.float16)
    store = Store.open(path)
    stamp = now()
    for vector in vectors:
        item_id = store.new_id()
        store.put({"id": item_id, "path": f"/docs/new/scan_{item_id}.pdf", "path_bytes": b"/docs/new/%d" % item_id,
                   "root": "/docs", "kind": "text", "status": "ok", "indexed_at": stamp,
                   "words": f"Invoice {item_id} " + " ".join(f"w{w}" for w in rng.zipf(1.3, 30) % 50000)}, vector)
    started = time.perf_counter()
    store.commit()
    print(json.dumps({"commit_s": time.perf_counter() - started, "segments": len(store.manifest["segments"])}))
""")


WORDS = [f"w{i}" for i in range(VOCABULARY)]


def texts(first_id: int, count: int, rng: np.random.Generator) -> dict[int, str]:
    """Each row's synthetic text: Zipf-distributed made-up words and an invoice number of its own."""
    draws = (rng.zipf(1.3, size=(count, WORDS_PER_ROW)) % VOCABULARY).tolist()
    return {first_id + i: f"Invoice {first_id + i} " + " ".join(map(WORDS.__getitem__, row))
            for i, row in enumerate(draws)}


def item_table(first_id: int, count: int) -> pa.Table:
    ids = np.arange(first_id, first_id + count, dtype=np.int64)
    paths = pa.array(np.char.add(np.char.add("/docs/scan_", ids.astype(str)), ".txt"))
    stamp = np.full(count, np.datetime64(now().replace(tzinfo=None), "us"))
    columns = {"id": pa.array(ids), "path": paths, "path_bytes": paths.cast(pa.binary()),
               "root": pa.repeat("/docs", count), "kind": pa.repeat("text", count), "status": pa.repeat("ok", count),
               "mtime_ns": pa.array(ids), "indexed_at": pa.array(stamp).cast(pa.timestamp("us", tz="UTC"))}
    return pa.table([columns.get(f.name, pa.nulls(count, f.type)) for f in ITEM_SCHEMA], schema=ITEM_SCHEMA)


def build_index(path: Path, rows: int, width: int, segments: int) -> float:
    """An index of `rows` rows with words in `segments` equal segments, written by the store's own segment writer
    (vectors random: the words are measured here). Returns the seconds it took."""
    started = time.perf_counter()
    settings = {"model": "synthetic", "model_revision": None, "dim": width, "quantize": "none", "index_type": "flat",
                "instruction": "", "min_pixels": 0, "max_pixels": 0, "total_pixels": 0, "fps": 1.0, "max_frames": 1}
    store = Store.create(path, settings, width)
    manifest = {**store.manifest, "generation": 1, "segments": [], "deletes": []}
    (path / "segments").mkdir(parents=True)
    rng = np.random.default_rng(rows)
    bounds = np.linspace(0, rows, segments + 1).astype(int).tolist()
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        name = store.next_segment_name(manifest)
        table = item_table(start + 1, stop - start)
        npy = path / "segments" / f"{name}.npy"
        save_npy(npy, rng.standard_normal((stop - start, width), dtype=np.float32).astype(np.float16))
        words = texts(start + 1, stop - start, rng)
        entry = store.write_new_segment(manifest, table, np.load(npy, mmap_mode="r"), vectors_written=True, name=name,
                                        words=lambda tmp, table=table, words=words: write_words(
                                            tmp, segment_words(table, words)))
        manifest["segments"].append(entry)
    manifest.update(next_id=rows + 1, counts={"items": rows, "ok": rows, "error": 0, "by_kind": {"text": rows}},
                    updated=now().isoformat())
    write_manifest(path, manifest)
    Store.open(path).tidy()
    return time.perf_counter() - started


def word_queries(rows: int, count: int, rng: np.random.Generator) -> dict[str, list[str]]:
    numbers = rng.integers(1, rows + 1, size=count)
    middling = rng.integers(200, 400, size=count)  # ranks 200-400 of the Zipf vocabulary: some 0.1% of rows each
    return {"rare token": [str(n) for n in numbers],
            "middling word": [f"w{m}" for m in middling],
            "two words": [f"invoice {n}" for n in numbers],
            "phrase": [f'"invoice {n}"' for n in numbers]}


def median_ms(run, queries: list) -> tuple[float, float]:
    """The median wall and CPU milliseconds of `run(query)` (the CPU time of this process: on a machine shared
    with other jobs, what one query costs whatever the wait for a core)."""
    wall, cpu = [], []
    for query in queries:
        started, started_cpu = time.perf_counter(), time.process_time()
        run(query)
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu)


def query_figures(path: Path, rows: int, largest: bool, count: int) -> list[Figure]:
    """Words query latency by kind of query, and the words databases' bytes per row."""
    figures = []
    words_bytes = sum(p.stat().st_size for p in (path / "segments").glob("*.words"))
    index = SearchIndex(path)
    for kind, queries in word_queries(rows, count, np.random.default_rng(7)).items():
        index.search(queries[0], mode="words")  # untimed: the first query reads the databases' roots
        found = [len(index.search(q, mode="words")) for q in queries[:5]]
        wall, cpu = median_ms(lambda q, index=index: index.search(q, k=10, mode="words"), queries)
        detail = {"queries": len(queries), "segments": SEGMENTS, "hits_of_first_5": found}
        figures += [Figure("words", f"words query {rows:,} rows: {kind}", wall, "ms", detail=detail),
                    Figure("words", f"words query {rows:,} rows: {kind}, CPU", cpu, "ms",
                           goal="<= 20" if largest else "", detail=detail)]
    figures.append(Figure("words", f"words {rows:,} rows: bytes per row", words_bytes / rows, "B",
                          detail={"words_mib": round(words_bytes / MiB, 1), "words_per_row": WORDS_PER_ROW + 3}))
    return figures


class GivenVector:
    """Stands in for the embedder: the query's vector is given (the model's time is the same in every mode)."""

    def __init__(self, vectors: np.ndarray):
        self.vectors, self.next = vectors, 0

    def embed(self, items, dim: int) -> np.ndarray:
        vector = self.vectors[self.next % len(self.vectors)][None, :dim]
        self.next += 1
        return vector / np.linalg.norm(vector)


def hybrid_figures(path: Path, rows: int, count: int) -> list[Figure]:
    """Semantic, words and hybrid search latency over the index at `path`, the modes taken in turns."""
    rng = np.random.default_rng(11)
    index = SearchIndex(path, embedder=GivenVector(rng.standard_normal((count, WIDE)).astype(np.float32)))
    queries = [f"invoice {n}" for n in rng.integers(1, rows + 1, size=count)]
    for mode in ("semantic", "hybrid", "words"):
        index.search(queries[0], mode=mode)  # untimed: FAISS's threads, the databases' roots
    times = {"semantic": [], "hybrid": [], "words": []}
    for query in queries:  # in turns: the machine's load falls on all three alike
        for mode, spent in times.items():
            started = time.perf_counter()
            index.search(query, k=10, mode=mode)
            spent.append(time.perf_counter() - started)
    ms = {mode: 1000 * statistics.median(spent) for mode, spent in times.items()}
    label = f"{rows:,} × {WIDE}"
    return [Figure("words", f"search {label}: semantic", ms["semantic"], "ms"),
            Figure("words", f"search {label}: words", ms["words"], "ms"),
            Figure("words", f"search {label}: hybrid", ms["hybrid"], "ms"),
            Figure("words", f"search {label}: hybrid - (semantic + words)", ms["hybrid"] - ms["semantic"] - ms["words"],
                   "ms", goal="<= 0", detail={"queries": count})]


def measured_commit(path: Path, width: int, seed: int) -> dict:
    done = subprocess.run([sys.executable, "-c", COMMIT, str(path), str(NEW_ROWS), str(seed), str(width)], env=ENV,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the commit process failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def run(workdir: Path, checkpoints: dict[str, Path] | None = None, sizes: tuple[int, ...] = SIZES,
        queries: int = QUERIES, only_queries: bool = False) -> list[Figure]:
    """Each index is built once: its queries are measured first, then the commits into it."""
    figures = []
    if only_queries:
        for rows in sizes:
            build_index(workdir / f"words-{rows}", rows, NARROW, SEGMENTS)
            figures += query_figures(workdir / f"words-{rows}", rows, rows == max(sizes), queries)
            shutil.rmtree(workdir / f"words-{rows}")
        return figures
    for width, sized in ((NARROW, list(sizes)), (WIDE, [n for n in sizes if n <= 100_000])):
        commit_s = {}
        for rows in sized:
            path = workdir / f"words-{width}-{rows}"
            segments = SEGMENTS if rows >= 100_000 else 1
            build_s = build_index(path, rows, width, segments)
            print(f"[width {width}, {rows:,} rows: build {build_s:.0f} s]", file=sys.stderr, flush=True)
            if width == NARROW and rows >= 100_000:
                figures += query_figures(path, rows, rows == max(sizes), queries)
            if width == WIDE and rows == max(sized):
                figures += hybrid_figures(path, rows, queries)
            commits = [measured_commit(path, width, seed) for seed in range(REPEATS)]
            shutil.rmtree(path)
            commit_s[rows] = min(c["commit_s"] for c in commits)
            figures.append(Figure("words", f"width {width}: +{NEW_ROWS:,} with words into {rows:,}: commit",
                                  commit_s[rows], "s", detail={"commit_s": [round(c["commit_s"], 3) for c in commits],
                                                               "segments_before": segments,
                                                               "build_s": round(build_s, 1)}))
            print(f"[width {width}, {rows:,} rows: commit {commit_s[rows]:.3f} s]", file=sys.stderr, flush=True)
        if len(sized) > 1:
            small, big = min(sized), max(sized)
            figures.append(Figure("words", f"width {width}: commit into {big:,} ÷ into {small:,}",
                                  commit_s[big] / commit_s[small], "x", goal="<= 1.5"))
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--queries", type=int, default=QUERIES)
    parser.add_argument("--only-queries", action="store_true", help="only (a): the words queries")
    args = parser.parse_args()
    sizes = tuple(int(n) for n in args.sizes.split(","))
    run_standalone(lambda work, tiny: run(work, tiny, sizes, args.queries, args.only_queries),
                   "words-queries" if args.only_queries else "words", budget_s=900)
