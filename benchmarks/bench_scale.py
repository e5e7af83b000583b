"""Benchmark: `qvlsearch index` at scale.

(a) Peak memory while indexing 20,000 small files (14k PNG/JPEG images, 6k text files) with the tiny
    model: the RSS of the `qvlsearch index` process, sampled every 0.2 s, should stay under 2 GB and
    not grow with the number of files done (RSS at 25% of the files against RSS at the end).
(b) With the `wide` checkpoint (2048-wide vectors, the real 2B model's width), over 100,000 files whose
    index rows are written directly, as the indexer would have written them:
    - a no-change re-run should finish within 10 s: walk, stat, compare, one commit;
    - a run that adds 10 files, start to exit, should take at most 2 s more than loading the model,
      which is timed alone (a process that only loads it) in the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import Figure, best_of, run_standalone

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
IMAGES, TEXTS, PER_FOLDER = 14_000, 6_000, 500
UNCHANGED_FOLDERS, UNCHANGED_PER_FOLDER = 1000, 100
WORDS = ("cat", "dog", "boat", "lake", "tree", "cake", "camera", "lens", "chess", "board", "bee", "flower", "sunset",
         "beach", "city", "night", "snow", "mountain", "river", "bridge", "garden", "kitchen", "window", "street")


def cli() -> list[str]:
    script = Path(sys.executable).with_name("qvlsearch")
    return [str(script)] if script.exists() else [sys.executable, "-m", "qvlsearch"]


def write_file(root: Path, i: int) -> None:
    """File number `i`: an image of 48–96 px with random colours and noise, or a short text; all distinct."""
    from PIL import Image

    rng = np.random.default_rng(i)
    folder = root / f"f{i // PER_FOLDER:03d}"
    if i < IMAGES:
        w, h = rng.integers(48, 97, 2)
        pixels = rng.integers(0, 256, 3) + rng.normal(0, 30, (h, w, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image.save(folder / f"img{i:05d}.{'png' if i % 2 else 'jpg'}")
    else:
        words = " ".join(rng.choice(WORDS, 12))
        (folder / f"note{i:05d}.txt").write_text(f"note {i}: {words}\n")


def make_corpus(root: Path) -> int:
    files = IMAGES + TEXTS
    for k in range(0, files, PER_FOLDER):
        (root / f"f{k // PER_FOLDER:03d}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: write_file(root, i), range(files)))
    return files


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB; (0, 0) once it is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except (OSError, ValueError):
        return 0.0, 0.0
    return tuple(int(fields.get(k, "0 kB").split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


def committed(index: Path) -> int:
    try:
        return json.loads((index / "manifest.json").read_text())["counts"].get("items", 0)
    except (OSError, ValueError, KeyError):
        return 0


def memory_figures(workdir: Path, embedder: Path) -> list[Figure]:
    root, index = workdir / "scale-corpus-20k", workdir / "scale-index-20k"
    started = time.perf_counter()
    files = make_corpus(root)
    made_s = time.perf_counter() - started
    args = [*cli(), "index", str(root), "--index", str(index), "--model", str(embedder), "--quiet", "--json"]
    samples: list[tuple[float, float, int]] = []  # (seconds, RSS MiB, files committed)
    peak = 0.0
    started = time.perf_counter()
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, text=True) as proc:
        while proc.poll() is None:
            rss, hwm = rss_mb(proc.pid)
            peak = max(peak, rss, hwm)
            if rss:
                samples.append((time.perf_counter() - started, rss, committed(index)))
            time.sleep(0.2)
        out, err = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"qvlsearch index failed ({proc.returncode}): {err[-2000:]}")
    summary = json.loads(out)

    def rss_at(fraction: float) -> float:
        """RSS in the first sample after the manifest counts at least `fraction` of the files."""
        return next((rss for _, rss, done in samples if done >= files * fraction), 0.0)

    quarter, final = rss_at(0.25), rss_at(1.0)
    detail = {"files": files, "corpus_write_s": round(made_s, 1), "wall_s": round(wall, 1),
              "index_s": summary["seconds"], "added": summary["added"], "failed": summary["failed"],
              "samples": len(samples), "rss_mib_at_pct": {pct: round(rss_at(pct / 100)) for pct in range(10, 101, 10)},
              "rss_mib_last_sample": round(samples[-1][1]),
              "note": "RSS at N% is the first sample after a commit counts >= N% of the files; the peak includes "
                      "a ~100 MiB rise during process exit, after all files are committed"}
    name = f"index {files // 1000}k files:"
    return [
        Figure("scale", f"{name} peak RSS", peak, "MiB", goal="<= 2048", detail=detail),
        Figure("scale", f"{name} RSS at 25% of files", quarter, "MiB", detail=detail),
        Figure("scale", f"{name} RSS at 100% of files", final, "MiB", detail=detail),
        Figure("scale", f"{name} RSS growth 25% -> 100%", final / quarter, "x", detail=detail),
        Figure("scale", f"{name} RSS growth per 1k files", (final - quarter) / (0.75 * files / 1000), "MiB",
               detail=detail),
        Figure("scale", f"{name} throughput", files / summary["seconds"], "files/s", detail=detail),
    ]


def make_unchanged(root: Path, index: Path, embedder: Path) -> int:
    """100k tiny text files and an index directory holding exactly the rows the indexer would write for them
    (one vector as wide as the model's, e.g. 2048 for the wide checkpoint)."""
    from qvlsearch.fs import display_path
    from qvlsearch.indexer import IndexOptions, model_hidden_size, model_revision, settings_of
    from qvlsearch.store import Store, now

    def write_folder(k: int) -> None:
        folder = root / f"d{k:04d}"
        folder.mkdir(parents=True)
        for j in range(UNCHANGED_PER_FOLDER):
            (folder / f"t{j:03d}.txt").write_text(f"{k} {j}\n")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write_folder, range(UNCHANGED_FOLDERS)))
    dim = model_hidden_size(str(embedder))  # as `qvlsearch index` does for a new index (2048 for wide)
    settings = settings_of(IndexOptions(model=str(embedder)), dim, "none", "flat")
    settings["model_revision"] = model_revision(str(embedder))
    store = Store.create(index, settings, dim)
    top = os.path.abspath(root)
    stamp = now()
    rng = np.random.default_rng(0)
    for i, entry in enumerate(e for k in range(UNCHANGED_FOLDERS) for e in os.scandir(os.path.join(top, f"d{k:04d}"))):
        if i % UNCHANGED_PER_FOLDER == 0:  # a folder's vectors at a time, not 100k float64 rows at once
            vectors = rng.standard_normal((UNCHANGED_PER_FOLDER, dim), dtype=np.float32)
            vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
        st = entry.stat()
        row = {"id": store.new_id(), "path": display_path(entry.path), "path_bytes": os.fsencode(entry.path),
               "root": display_path(top), "kind": "text", "size": st.st_size, "mtime_ns": st.st_mtime_ns,
               "content_hash": f"bench-{i:08d}", "width": None, "height": None, "duration_s": None, "frames": None,
               "tokens": None, "status": "ok", "error": None, "indexed_at": stamp}
        store.put(row, vectors[i % UNCHANGED_PER_FOLDER])
    store.commit()
    return len(store.rows)


def rerun_figures(workdir: Path, embedder: Path) -> list[Figure]:
    from qvlsearch.indexer import model_hidden_size

    root, index = workdir / "scale-corpus-100k", workdir / "scale-index-100k"
    started = time.perf_counter()
    files = make_unchanged(root, index, embedder)
    made_s = time.perf_counter() - started
    args = [*cli(), "index", str(root), "--index", str(index), "--model", str(embedder), "--json"]
    summaries = []

    def rerun() -> None:
        done = subprocess.run(args, check=True, capture_output=True, text=True, env=ENV)
        summaries.append(json.loads(done.stdout))

    seconds = best_of(rerun, 3)
    for s in summaries:  # rows that do not match what the indexer expects would show up here
        changed = {k: s[k] for k in ("added", "updated", "moved", "removed", "failed") if s[k]}
        if s["unchanged"] != files or changed:
            raise RuntimeError(f"re-run was not a no-change run: unchanged {s['unchanged']} of {files}, {changed}")
    detail = {"files": files, "width": model_hidden_size(str(embedder)), "setup_s": round(made_s, 1),
              "runs": len(summaries), "indexer_seconds": [s["seconds"] for s in summaries],
              "unchanged": summaries[0]["unchanged"], "load_average_1_5_15": os.getloadavg()}
    name = f"{files // 1000}k files, width {detail['width']}"
    return [Figure("scale", f"no-change re-run over {name}", seconds, "s", goal="<= 10", detail=detail),
            *add_figures(root, index, embedder, files, name)]


def add_figures(root: Path, index: Path, embedder: Path, files: int, name: str) -> list[Figure]:
    """`qvlsearch index` after 10 new files (three times, 10 more each time) against loading the model alone."""
    args = [*cli(), "index", str(root), "--index", str(index), "--model", str(embedder), "--json"]
    walls, summaries = [], []
    for attempt in range(3):
        folder = root / f"new{attempt}"
        folder.mkdir()
        for j in range(10):
            (folder / f"n{j}.txt").write_text(f"a new note {attempt} {j} about a cat on a boat\n")
        started = time.perf_counter()
        done = subprocess.run(args, check=True, capture_output=True, text=True, env=ENV)
        walls.append(time.perf_counter() - started)
        summaries.append(json.loads(done.stdout))
        if summaries[-1]["added"] != 10 or summaries[-1]["unchanged"] != files + 10 * attempt:
            raise RuntimeError(f"the run did not add exactly 10 files: {summaries[-1]}")
    loads = []
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", LOAD_MODEL, str(embedder)], check=True, capture_output=True,
                              text=True, env=ENV)
        loads.append(float(done.stdout))
    wall, load = min(walls), min(loads)
    detail = {"wall_s": [round(w, 2) for w in walls], "model_load_s": [round(s, 2) for s in loads],
              "indexer_seconds": [s["seconds"] for s in summaries], "load_average_1_5_15": os.getloadavg(),
              "note": "model load: a process that imports qvlsearch.embedder and builds Embedder(model), timed "
                      "inside it; best of 3 each"}
    return [Figure("scale", f"add 10 files to {name}: start to exit", wall, "s", detail=detail),
            Figure("scale", "  of it, loading the model (timed alone)", load, "s", detail=detail),
            Figure("scale", f"add 10 files to {name}: minus the model load", wall - load, "s", goal="<= 2",
                   detail=detail)]


LOAD_MODEL = ("import sys, time; started = time.perf_counter(); from qvlsearch.embedder import Embedder; "
              "Embedder(sys.argv[1]); print(time.perf_counter() - started)")


def run(workdir: Path, checkpoints: dict[str, Path], parts: tuple[str, ...] = ("memory", "rerun")) -> list[Figure]:
    """(a) "memory" with `checkpoints` (tiny); (b) "rerun" with a wide checkpoint built here."""
    figures = memory_figures(workdir, checkpoints["embedder"]) if "memory" in parts else []
    if "rerun" in parts:
        from qvlsearch.tiny import build_checkpoints

        figures += rerun_figures(workdir, build_checkpoints(workdir / "wide", preset="wide")["embedder"])
    return figures


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("memory", "rerun"), action="append",
                        help="(a) memory, or (b) the 100k re-run and add-10 runs, wide checkpoint (default: both)")
    parts = tuple(parser.parse_args().part or ("memory", "rerun"))
    run_standalone(lambda workdir, checkpoints: run(workdir, checkpoints, parts), "scale", budget_s=420)
