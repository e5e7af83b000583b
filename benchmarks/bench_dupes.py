"""Benchmark: `find_duplicates` (what `qvlsearch dupes` runs) on 100k × 2048 stored vectors.

The vectors are bench_search's clustered synthetic unit vectors, written through the store
(Store.create / put / commit, float16 as the indexer stores them), with planted duplicates:
1% exact copies (same content hash and vector), 1% near copies (the vector plus noise, cosine
about 0.97 with its original) and 1% look-alikes (cosine about 0.90, below the 0.95 threshold).
Timed: `open_index` + `find_duplicates`, start to groups. Recall: every pair at or above the
threshold among 2000 sampled items against all others, found by exact float32 inner products,
must end up in one group.

Calibration of the default threshold: the sample photos and three copies of each (re-encoded
as JPEG quality 60, halved in size, cropped by 5% a side) are indexed with a model (the random
`tiny` checkpoint unless --model names another); reported: the cosine of each kind of copy with
its original, the highest cosine between two different photos, and what `find_duplicates` groups.

    python benchmarks/bench_dupes.py [--items 100000] [--dim 2048] [--model DIR]  (--items 20000: a quick run)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_search import dataset
from common import Figure, report, save

from qvlsearch.dupes import DEFAULT_THRESHOLD, find_duplicates
from qvlsearch.search import open_index
from qvlsearch.store import Store, now

REPO = Path(__file__).resolve().parent.parent
GOAL_S = 60.0
SAMPLE = 2000


def noisy(vectors: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at about `cosine` from each of `vectors`."""
    noise = rng.standard_normal(vectors.shape).astype(np.float32)
    noise -= (noise * vectors).sum(1, keepdims=True) * vectors  # orthogonal to the original
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return cosine * vectors + np.sqrt(1 - cosine**2) * noise


def write_index(path: Path, items: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An index of `items` synthetic rows with planted duplicates; returns the stored vectors (float32)
    and the planted rows (6 × items/100: exact originals, copies; near originals, copies; look-alikes)."""
    from qvlsearch.indexer import IndexOptions, settings_of

    rng = np.random.default_rng(seed)
    vectors, _ = dataset(items, dim, seed)
    planted = rng.permutation(items)[: 6 * (items // 100)].reshape(6, -1)  # 3 kinds of copy × (original, copy)
    vectors[planted[1]] = vectors[planted[0]]
    vectors[planted[3]] = noisy(vectors[planted[2]], 0.97, rng)
    vectors[planted[5]] = noisy(vectors[planted[4]], 0.90, rng)
    hashes = np.array([f"{i:032x}" for i in range(items)], dtype=object)
    hashes[planted[1]] = hashes[planted[0]]
    store = Store.create(path, settings_of(IndexOptions(model="synthetic"), min(dim, 256), "none", "flat"), dim)
    stamp = now()
    for i in range(items):
        store.put({"id": store.new_id(), "path": f"/photos/{i // 1000:03d}/IMG_{i:06d}.jpg",
                   "path_bytes": f"/photos/{i // 1000:03d}/IMG_{i:06d}.jpg".encode(), "root": "/photos",
                   "kind": "image", "size": int(rng.integers(50_000, 5_000_000)), "mtime_ns": 1_600_000_000 * 10**9 + i,
                   "content_hash": hashes[i], "width": 4000, "height": 3000, "status": "ok", "indexed_at": stamp},
                  vectors[i])
    store.commit()
    return vectors.astype(np.float16).astype(np.float32), planted


def run(workdir: Path, items: int = 100_000, dim: int = 2048) -> list[Figure]:
    started = time.perf_counter()
    vectors, planted = write_index(workdir / "dupes-index", items, dim)
    print(f"[wrote {items}×{dim} in {time.perf_counter() - started:.0f}s]", file=sys.stderr, flush=True)
    started = time.perf_counter()
    groups = find_duplicates(open_index(workdir / "dupes-index"), DEFAULT_THRESHOLD)
    elapsed = time.perf_counter() - started
    group_of = {m.id - 1: n for n, g in enumerate(groups) for m in g.members}  # ids are rows + 1
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sample = np.random.default_rng(1).choice(items, SAMPLE, replace=False)
    truth = [(int(a), int(b)) for a, row in zip(sample, vectors[sample] @ vectors.T, strict=True)
             for b in np.flatnonzero(row >= DEFAULT_THRESHOLD) if a != b]
    found = sum(group_of.get(a, -1) == group_of.get(b, -2) for a, b in truth)
    copies = sum(group_of.get(a, -1) == group_of.get(b, -2) for a, b in zip(planted[2], planted[3], strict=True))
    sizes = {"exact": sum(g.type == "exact" for g in groups), "near": sum(g.type == "near" for g in groups)}
    scale = f"{items}×{dim}"
    return [Figure("dupes", f"find_duplicates, {scale}", elapsed, "s", goal=f"<= {GOAL_S:g}" if items >= 100_000
                   else "", detail={"groups": sizes, "threshold": DEFAULT_THRESHOLD}),
            Figure("dupes", f"recall of pairs >= {DEFAULT_THRESHOLD} from {SAMPLE} sampled items, {scale}",
                   found / max(len(truth), 1), "", detail={"pairs": len(truth), "found": found}),
            Figure("dupes", f"planted near copies (cosine ~0.97) grouped with their original, {scale}",
                   copies / len(planted[2]), "", detail={"copies": len(planted[2]), "grouped": copies}),
            Figure("dupes", f"groups found (planted: {items // 100} exact, {items // 100} near), {scale}",
                   len(groups), "", detail=sizes)]


COPIES = {"jpeg q60": lambda im: (im, {"quality": 60}), "half size": lambda im: (im.resize(
    (im.width // 2, im.height // 2)), {"quality": 90}), "crop 5%": lambda im: (im.crop(
    (im.width // 20, im.height // 20, im.width * 19 // 20, im.height * 19 // 20)), {"quality": 90})}


def calibration(workdir: Path, model: Path) -> list[Figure]:
    """Copies of the sample photos against their originals and against each other, through index and dupes."""
    from PIL import Image

    from qvlsearch.indexer import Indexer, IndexOptions

    photos = workdir / "calibration-photos"
    photos.mkdir()
    originals = sorted(p for p in (REPO / "sample_data" / "photos").iterdir() if p.suffix.lower() != ".gif")
    for original in originals:
        image = Image.open(original).convert("RGB")
        image.save(photos / f"{original.stem}.png")
        for copy, make in enumerate(COPIES.values()):
            changed, options = make(image)
            changed.save(photos / f"{original.stem}.copy{copy}.jpg", **options)
    Indexer(workdir / "calibration-index", IndexOptions(model=str(model))).run([photos])
    index = open_index(workdir / "calibration-index")
    vectors = index.stored_vectors.get(index.ids)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    stems = [Path(p).name.split(".")[0] for p in index.items["path"].to_pylist()]
    copy_of = [Path(p).suffixes[0][5:] if ".copy" in p else "" for p in index.items["path"].to_pylist()]
    similarity = vectors @ vectors.T
    original = {stem: i for i, (stem, copy) in enumerate(zip(stems, copy_of, strict=True)) if not copy}
    by_copy = {name: [float(similarity[i, original[stems[i]]]) for i in range(len(stems)) if copy_of[i] == str(c)]
               for c, name in enumerate(COPIES)}
    distinct = [float(similarity[i, j]) for i in original.values() for j in original.values() if i < j]
    groups = find_duplicates(index, DEFAULT_THRESHOLD)
    mixed = sum(len({stems[index.ids.tolist().index(m.id)] for m in g.members}) > 1 for g in groups)
    model_name = "tiny (random weights)" if model.name == "embedder" else model.name
    figures = [Figure("dupes", f"calibration, {model_name}: cosine of a {name} copy with its original (min)",
                      min(values), "", detail={"mean": float(np.mean(values)),
                                                f">= {DEFAULT_THRESHOLD}": sum(v >= DEFAULT_THRESHOLD for v in values),
                                                "copies": len(values)})
               for name, values in by_copy.items()]
    figures.append(Figure("dupes", f"calibration, {model_name}: highest cosine of two different photos",
                          max(distinct), "", detail={"pairs": len(distinct), "median": float(np.median(distinct)),
                                                     f">= {DEFAULT_THRESHOLD}": sum(d >= DEFAULT_THRESHOLD
                                                                                    for d in distinct)}))
    figures.append(Figure("dupes", f"calibration, {model_name}: groups mixing different photos at "
                          f"{DEFAULT_THRESHOLD}", mixed, "", detail={"groups": len(groups)}))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--model", type=Path, help="embedding checkpoint for the calibration (default: tiny)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qvlsearch-dupes-") as tmp:
        from qvlsearch.tiny import build_checkpoints

        model = args.model or build_checkpoints(Path(tmp) / "tiny")["embedder"]
        figures = calibration(Path(tmp), model) + run(Path(tmp), args.items, args.dim)
    print(report(figures))
    print(f"results: {save(figures, 'dupes')}")


if __name__ == "__main__":
    main()
