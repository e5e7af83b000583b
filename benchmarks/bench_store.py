"""Benchmark: the segmented index store at the real 2B model's width (2048), with synthetic vectors.

(a) A commit of +1,000 items into indexes of 10k, 100k and 1M items, flat and int8 (hnsw at 10k and
    100k only): seconds of `Store.commit()`, bytes of the files it wrote, and the writer's peak RSS,
    each commit in a fresh process (`Store.open`, 1,000 `put`s, `commit`; the fastest of 5). The
    imports a first commit pays once per process (faiss, and pandas, which pyarrow loads to convert
    timezone-aware datetimes: about 1 s) are made before the clock starts and reported apart.
    Goals: the 1M figure ≤ 1.5× the 10k figure; peak RSS while adding to the 1M index ≤ 3 GiB.
(b) Search over 1M × 2048 int8: recall@10 against exact search over the stored float16 vectors, and
    latency per query (`SearchIndex.raw_search`, one query at a time) with 30 unmerged segments
    against one segment after `Store.optimize()` (of a copy: both are on disk, and the queries take
    them in turns). Goals: recall ≥ 0.99; 30 segments ≤ 1.5× one.

The starting indexes are written through the writer's own segment code (`Store.write_new_segment`
over a table built from numpy columns and vectors streamed into a memory-mapped .npy), in the state
the merge policy leaves them: no tier of 10 segments (the largest size as 9 segments, the others as
one). The vectors are clustered, as in bench_search.py: 2000 Gaussian clusters in the full
dimension, varying within a shared 64-dimensional subspace, plus isotropic noise.

    python benchmarks/bench_store.py              # full size: 20-40 minutes on 2 cores, 19 GB of $TMPDIR
    python benchmarks/bench_store.py --sizes 2000,20000,100000 --search-rows 30000 --queries 20   # a quick check

(With scaled-down sizes, keep the largest size's segments (size ÷ 9) in another tier than the new rows'
(1,000: tier 3), or the measured commit also merges that tier.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from common import Figure, run_standalone

from qvlsearch.store import ITEM_SCHEMA, Snapshot, Store, now, writer
from qvlsearch.store.files import write_manifest
from qvlsearch.store.segments import read_vectors

WIDTH = 2048
SIZES = (10_000, 100_000, 1_000_000)
NEW_ROWS = 1_000
LARGEST_SEGMENTS = 9  # the largest index: 9 segments of one tier, the most the merge policy leaves unmerged
SEARCH_ROWS, SEARCH_SEGMENTS, QUERIES = 1_000_000, 30, 64
CHUNK = 8192  # rows generated (and brute-forced) at a time
K = 10
CLUSTERS, RANK = 2000, 64
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
MiB = 1 << 20

COMMIT = textwrap.dedent("""
    # One writer process: open the index, put N fresh rows with unit vectors, commit; print what it cost.
    import json, sys, time
    started = time.perf_counter()
    import faiss, numpy as np, pyarrow as pa
    from qvlsearch.store import ITEM_SCHEMA, Store, now
    pa.Table.from_pylist([{"id": 0, "indexed_at": now()}], schema=ITEM_SCHEMA)  # pyarrow imports pandas for this
    imported = time.perf_counter() - started  # once per process, not per commit: not in the commit's time
    path, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    vectors = np.random.default_rng(seed).standard_normal((count, 2048), dtype=np.float32)
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
    started = time.perf_counter()
    store = Store.open(path)
    opened = time.perf_counter()
    stamp = now()
    for vector in vectors:
        item_id = store.new_id()
        store.put({"id": item_id, "path": f"/photos/new/{item_id}.jpg", "path_bytes": b"/photos/new/%d.jpg" % item_id,
                   "root": "/photos", "kind": "image", "size": 100_000, "mtime_ns": item_id,
                   "content_hash": f"n{item_id}", "width": 1024, "height": 768, "duration_s": None, "frames": None,
                   "tokens": None, "status": "ok", "error": None, "indexed_at": stamp}, vector)
    put = time.perf_counter()
    store.commit()
    done = time.perf_counter()
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    print(json.dumps({"imports_s": imported, "open_s": opened - started, "put_s": put - opened, "commit_s": done - put,
                      "peak_rss_mib": int(status["VmHWM"].split()[0]) / 1024,
                      "segments": len(store.manifest["segments"])}))
""")


class Clusters:
    """Clustered unit vectors (as bench_search.py's dataset), made chunk by chunk: never all in memory."""

    def __init__(self, seed: int):
        import torch

        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        self.centers = torch.nn.functional.normalize(torch.randn(CLUSTERS, WIDTH, generator=g), dim=1)
        self.weights = 1.0 / torch.arange(1, CLUSTERS + 1) ** 0.5  # uneven cluster sizes
        self.spread = torch.empty(CLUSTERS).uniform_(0.5, 1.0, generator=g)
        self.basis = torch.randn(RANK, WIDTH, generator=g) / (RANK * WIDTH) ** 0.5  # z @ basis has norm ≈ 1

    def sample(self, rows: int, stream: int):
        """`rows` unit vectors (float32 torch tensor) from generator stream number `stream`."""
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + stream)
        labels = torch.multinomial(self.weights, rows, replacement=True, generator=g)
        x = self.centers[labels] + self.spread[labels, None] * (torch.randn(rows, RANK, generator=g) @ self.basis)
        x += 0.3 * torch.randn(rows, WIDTH, generator=g) / WIDTH**0.5
        return torch.nn.functional.normalize(x, dim=1)

    def queries(self, count: int) -> np.ndarray:
        """Held-out points, perturbed: queries near the data."""
        import torch

        x = self.sample(count, stream=999_999_999)
        x += 0.3 * torch.randn(count, WIDTH, generator=torch.Generator().manual_seed(self.seed)) / WIDTH**0.5
        return torch.nn.functional.normalize(x, dim=1).numpy()


def settings(quantize: str, index_type: str) -> dict:
    return {"model": "synthetic-2048", "model_revision": None, "dim": WIDTH, "quantize": quantize,
            "index_type": index_type, "instruction": "", "min_pixels": 0, "max_pixels": 0, "total_pixels": 0,
            "fps": 1.0, "max_frames": 1}


def item_table(first_id: int, count: int) -> pa.Table:
    """`count` ok image rows with ids from `first_id`, as Arrow columns built from numpy (no Python dicts)."""
    ids = np.arange(first_id, first_id + count, dtype=np.int64)
    paths = pa.array(np.char.add(np.char.add("/photos/", ids.astype(str)), ".jpg"))
    stamp = np.full(count, np.datetime64(now().replace(tzinfo=None), "us"))
    columns = {"id": pa.array(ids), "path": paths, "path_bytes": paths.cast(pa.binary()),
               "root": pa.repeat("/photos", count), "kind": pa.repeat("image", count),
               "size": pa.array(np.full(count, 100_000, dtype=np.int64)), "mtime_ns": pa.array(ids),
               "content_hash": pa.array(np.char.add("h", ids.astype(str))),
               "width": pa.array(np.full(count, 1024, dtype=np.int32)),
               "height": pa.array(np.full(count, 768, dtype=np.int32)),
               "status": pa.repeat("ok", count), "indexed_at": pa.array(stamp).cast(pa.timestamp("us", tz="UTC"))}
    return pa.table([columns.get(f.name, pa.nulls(count, f.type)) for f in ITEM_SCHEMA], schema=ITEM_SCHEMA)


def build_index(path: Path, quantize: str, index_type: str, rows: int, segments: int, data: Clusters) -> float:
    """An index of `rows` items in `segments` equal segments, written by the store's own segment writer.

    Each segment's vectors stream into its memory-mapped .npy, then `write_new_segment` writes its rows and
    builds its FAISS index from that map; one manifest switches them in. Returns the seconds it took.
    """
    started = time.perf_counter()
    store = Store.create(path, settings(quantize, index_type), WIDTH)
    manifest = {**store.manifest, "generation": 1, "segments": [], "deletes": []}
    (path / "segments").mkdir(parents=True)
    bounds = np.linspace(0, rows, segments + 1).astype(int).tolist()
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        name = store.next_segment_name(manifest)
        npy = path / "segments" / f"{name}.npy"
        out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16, shape=(stop - start, WIDTH))
        for lo in range(0, stop - start, CHUNK):
            hi = min(stop - start, lo + CHUNK)
            out[lo:hi] = data.sample(hi - lo, stream=start + lo).numpy()
        out.flush()
        del out
        entry = store.write_new_segment(manifest, item_table(start + 1, stop - start), read_vectors(npy),
                                        vectors_written=True, name=name)
        manifest["segments"].append(entry)
    stamp = now().isoformat()
    manifest.update(next_id=rows + 1, counts={"items": rows, "ok": rows, "error": 0, "by_kind": {"image": rows}},
                    updated=stamp)
    write_manifest(path, manifest)
    Store.open(path).tidy()  # the outside view (items/), as a commit leaves it
    return time.perf_counter() - started


def folder_state(path: Path) -> dict[Path, tuple[int, int]]:
    """(inode, bytes) of every file, less the outside view's hard links (items/, deleted/: no bytes of their own)."""
    return {p: (p.stat().st_ino, p.stat().st_size) for p in path.rglob("*")
            if p.is_file() and p.parent.name not in ("items", "deleted")}


def measured_commit(path: Path, rows: int, seed: int) -> dict:
    """One commit of `rows` new items in a fresh writer process: its timings, peak RSS and bytes written."""
    before = folder_state(path)
    done = subprocess.run([sys.executable, "-c", COMMIT, str(path), str(rows), str(seed)], env=ENV,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the commit process failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout)
    after = folder_state(path)
    new = {p: size for p, (ino, size) in after.items() if before.get(p, (None, None))[0] != ino}
    result.update(written_bytes=sum(new.values()), folder_bytes=sum(size for _, size in after.values()),
                  files_written=sorted(str(p.relative_to(path)) for p in new))
    return result


def commit_figures(workdir: Path, data: Clusters, sizes: tuple[int, ...], new_rows: int, repeats: int
                   ) -> list[Figure]:
    figures = []
    largest = max(sizes)
    for name, quantize, index_type in (("flat", "none", "flat"), ("int8", "int8", "flat"), ("hnsw", "none", "hnsw")):
        sized = [n for n in sizes if n != largest] if index_type == "hnsw" else list(sizes)
        by_size = {}
        for n in sized:
            path = workdir / f"store-{name}-{n}"
            segments = LARGEST_SEGMENTS if n == largest else 1
            build_s = build_index(path, quantize, index_type, n, segments, data)
            commits = [measured_commit(path, new_rows, seed) for seed in range(repeats)]
            shutil.rmtree(path)
            best = min(commits, key=lambda c: c["commit_s"])
            by_size[n] = best
            detail = {"segments_before": segments, "build_s": round(build_s, 1), "new_rows": new_rows,
                      "commit_s": [round(c["commit_s"], 3) for c in commits],
                      "first_use_imports_s": [round(c["imports_s"], 3) for c in commits],
                      "open_s": [round(c["open_s"], 3) for c in commits],
                      "put_s": [round(c["put_s"], 3) for c in commits],
                      "written_mib": [round(c["written_bytes"] / MiB, 2) for c in commits],
                      "peak_rss_mib": [round(c["peak_rss_mib"]) for c in commits],
                      "folder_mib": round(commits[0]["folder_bytes"] / MiB),
                      "files_written": commits[0]["files_written"]}
            label = f"{name}: +{new_rows:,} into {n:,}"
            figures += [
                Figure("store", f"{label}: commit", best["commit_s"], "s", detail=detail),
                Figure("store", f"{label}: written", commits[0]["written_bytes"] / MiB, "MiB", detail=detail),
                Figure("store", f"{label}: writer peak RSS", max(c["peak_rss_mib"] for c in commits), "MiB",
                       goal=f"<= {3 * 1024}" if n == largest else "", detail=detail),
            ]
            print(f"[store {label}: build {build_s:.0f} s, commit {best['commit_s']:.3f} s]", file=sys.stderr,
                  flush=True)
        if len(sized) < 2:
            continue
        small, big = min(sized), max(sized)
        ratio = f"{name}: +{new_rows:,} into {big:,} ÷ into {small:,}"
        figures += [
            Figure("store", f"{ratio}: commit time", by_size[big]["commit_s"] / by_size[small]["commit_s"], "x",
                   goal="<= 1.5"),
            Figure("store", f"{ratio}: bytes written", by_size[big]["written_bytes"] / by_size[small]["written_bytes"],
                   "x", goal="<= 1.5"),
        ]
    return figures


def exact_top(path: Path, queries: np.ndarray) -> np.ndarray:
    """The true top K ids per query: brute force over the stored float16 vectors, in float32 chunks."""
    snapshot = Snapshot(path, ["id"], with_index=False)
    best_scores = np.full((len(queries), K), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), K), dtype=np.int64)
    for segment in snapshot.segments:
        for start in range(0, len(segment.ok_ids), CHUNK):
            x = np.asarray(segment.vectors[start:start + CHUNK], dtype=np.float32)
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            scores = np.concatenate([best_scores, queries @ x.T], axis=1)
            ids = np.broadcast_to(segment.ok_ids[start:start + CHUNK], (len(queries), len(x)))
            ids = np.concatenate([best_ids, ids], axis=1)
            top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
            best_scores, best_ids = np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
    return best_ids


def alternated(indexes: dict[str, object], queries: np.ndarray, truth: np.ndarray) -> dict[str, dict]:
    """recall@K and milliseconds per query of `SearchIndex.raw_search` for each index, one query at a time,
    taking the indexes in turns (the order flips each query), so that a change in the machine's load
    falls on all of them alike."""
    names = list(indexes)
    for q in queries[:2]:  # warm-up: the codes come into the page cache
        for name in names:
            indexes[name].raw_search(q[None], K)
    ms: dict[str, list[float]] = {name: [] for name in names}
    hits = dict.fromkeys(names, 0)
    for n, (q, true) in enumerate(zip(queries, truth, strict=True)):
        for name in names if n % 2 else names[::-1]:
            started = time.perf_counter()
            _, ids = indexes[name].raw_search(q[None], K)
            ms[name].append((time.perf_counter() - started) * 1000)
            hits[name] += len(set(ids.tolist()) & set(true.tolist()))
    return {name: {"recall": hits[name] / (K * len(queries)), "median_ms": float(np.median(ms[name])),
                   "mean_ms": float(np.mean(ms[name])), "segments": len(indexes[name].snapshot.segments)}
            for name in names}


def search_figures(workdir: Path, data: Clusters, rows: int, segments: int, count: int) -> list[Figure]:
    """Both states on disk at once (twice the index's bytes), searched in turns."""
    from qvlsearch.search import SearchIndex

    path, optimized = workdir / f"store-search-int8-{rows}", workdir / f"store-search-int8-{rows}-optimized"
    build_s = build_index(path, "int8", "flat", rows, segments, data)
    shutil.copytree(path, optimized)
    writer.GRACE_SECONDS = 0.0  # no reader to wait for: the 30 segments' files go at once
    started = time.perf_counter()
    Store.open(optimized).optimize()
    optimize_s = time.perf_counter() - started
    queries = data.queries(count)
    started = time.perf_counter()
    truth = exact_top(path, queries)
    exact_s = time.perf_counter() - started
    found = alternated({"unmerged": SearchIndex(path), "optimized": SearchIndex(optimized)}, queries, truth)
    unmerged, merged = found["unmerged"], found["optimized"]
    shutil.rmtree(path)
    shutil.rmtree(optimized)
    detail = {"rows": rows, "queries": count, "build_s": round(build_s, 1), "exact_s": round(exact_s, 1),
              "optimize_s": round(optimize_s, 1), "unmerged": unmerged, "optimized": merged,
              "load_average_1_5_15": os.getloadavg()}
    size = f"{rows / 1e6:g}M × {WIDTH} int8" if rows >= 1e6 else f"{rows // 1000}k × {WIDTH} int8"
    return [
        Figure("store", f"search {size}, {segments} segments: recall@{K}", unmerged["recall"], "", goal=">= 0.99",
               detail=detail),
        Figure("store", f"search {size}, after optimize: recall@{K}", merged["recall"], "", goal=">= 0.99",
               detail=detail),
        Figure("store", f"search {size}, {segments} segments: latency", unmerged["median_ms"], "ms", detail=detail),
        Figure("store", f"search {size}, after optimize: latency", merged["median_ms"], "ms", detail=detail),
        Figure("store", f"search {size}: latency {segments} segments ÷ optimized",
               unmerged["median_ms"] / merged["median_ms"], "x", goal="<= 1.5", detail=detail),
        Figure("store", f"optimize {size}: {segments} segments into 1", optimize_s, "s", detail=detail),
    ]


def run(workdir: Path, checkpoints: dict[str, Path] | None = None, sizes: tuple[int, ...] = SIZES,
        new_rows: int = NEW_ROWS, search_rows: int = SEARCH_ROWS, search_segments: int = SEARCH_SEGMENTS,
        queries: int = QUERIES, repeats: int = 5, parts: tuple[str, ...] = ("commit", "search")) -> list[Figure]:
    """The figures above of `parts` (`checkpoints` unused: the vectors are synthetic)."""
    data = Clusters(seed=0)
    return ((commit_figures(workdir, data, tuple(sorted(sizes)), new_rows, repeats) if "commit" in parts else [])
            + (search_figures(workdir, data, search_rows, search_segments, queries) if "search" in parts else []))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="index sizes for the commit figures")
    parser.add_argument("--new-rows", type=int, default=NEW_ROWS, help="rows added by each measured commit")
    parser.add_argument("--search-rows", type=int, default=SEARCH_ROWS, help="rows of the searched int8 index")
    parser.add_argument("--search-segments", type=int, default=SEARCH_SEGMENTS, help="its unmerged segments")
    parser.add_argument("--queries", type=int, default=QUERIES, help="queries for recall and latency")
    parser.add_argument("--repeats", type=int, default=5, help="measured commits per index (the fastest counts)")
    parser.add_argument("--part", choices=("commit", "search"), action="append",
                        help="(a) commit or (b) search (default: both)")
    args = parser.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    parts = tuple(args.part or ("commit", "search"))
    run_standalone(lambda work, tiny: run(work, tiny, sizes, args.new_rows, args.search_rows, args.search_segments,
                                          args.queries, args.repeats, parts), "-".join(("store", *(args.part or ()))),
                   budget_s=1800)
