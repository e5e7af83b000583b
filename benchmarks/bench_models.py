"""Benchmarks 2 and 3: embedding and reranking throughput against the official strategies.

The baselines re-implement how people drive the official code (tests/reference.py):
the embedder on one padded batch of 8 items per call with media decoded serially in the
forward thread, or one item per call; the reranker on one (query, document) pair per
forward pass. Goals on CPU (2 cores, where one item already keeps the cores busy): no
overhead, embedding and reranking ≥ 1.0× the faster baseline, each the best of 3 alternating rounds.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
from common import Figure
from corpus import WORDS, photo

EMBED_IMAGE_SIZES = [(320, 240), (640, 480), (800, 600), (1024, 768), (512, 512), (1280, 960)]


def texts(count: int, lo: int, hi: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(count)]


def images(folder: Path, sizes: list[tuple[int, int]], seed: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, size in enumerate(sizes):
        path = folder / f"img{seed}-{i}.jpg"
        photo(size, rng).save(path, quality=90)
        paths.append(str(path))
    return paths


def clips(workdir: Path) -> list[Path]:
    """Two 2-second 320x240 H.264 clips; ones already in `workdir` are kept (PyAV writes them)."""
    paths = [workdir / f"embed-clip{i}.mp4" for i in range(2)]
    for path in paths:
        if not path.exists():
            from make_media import make_video

            make_video(path, frames=16, fps=8, size=(320, 240))
    return paths


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def contenders(model_class: type, path: str, device: str | None, variants: list[dict] | None) -> dict:
    """qvlsearch's model with its defaults, and with each of `variants` (constructor options), by name."""
    ours = {"defaults": model_class(path, device=device)}
    for options in variants or []:
        ours[", ".join(f"{k}={v}" for k, v in options.items())] = model_class(path, device=device, **options)
    return ours


def embedding(workdir: Path, path: str, device: str | None = None, goal: str = ">= 1.5", scale: int = 1,
              repeats: int = 1, variants: list[dict] | None = None) -> list[Figure]:
    """Mixed items (texts of 10–300 tokens, photos of mixed sizes, two videos) through three strategies.

    `scale` multiplies the set (each copy has its own texts and photos); each strategy's
    time is the best of `repeats` rounds, the strategies taking turns within a round. With
    `variants` (lists of Embedder options, e.g. the GPU levers), qvlsearch is also timed with each.
    """
    from reference import ReferenceEmbedder

    from qvlsearch import Embedder

    videos = [str(clip) for clip in clips(workdir)]
    sizes = EMBED_IMAGE_SIZES + EMBED_IMAGE_SIZES[:2]
    items = []
    for copy in range(scale):
        items += [{"text": t} for t in texts(16, 8, 220, 1 + 10 * copy)]
        items += [{"image": p} for p in images(workdir / "embed-images", sizes, 2 + 10 * copy)]
    items += [{"video": v} for v in videos * scale]
    random.Random(3).shuffle(items)
    ours = contenders(Embedder, path, device, variants)
    first = ours["defaults"]
    reference = ReferenceEmbedder(path, device=str(first.device), dtype=first.dtype)
    for embedder in ours.values():
        embedder.embed(items[:4])  # warm-up (and worker processes started)
    reference.process(items[:2])
    rounds = [(timed(lambda: [reference.process(items[i:i + 8]) for i in range(0, len(items), 8)]),
               timed(lambda: [reference.process([item]) for item in items]),
               *(timed(lambda e=e: e.embed(items)) for e in ours.values())) for _ in range(repeats)]
    t_batch8, t_single, *t_ours = (min(times) for times in zip(*rounds, strict=True))
    baseline = min(t_batch8, t_single)
    detail = {"items": len(items), "batch8_s": round(t_batch8, 3), "single_s": round(t_single, 3),
              **{f"ours_{mode}_s": round(t, 3) for mode, t in zip(ours, t_ours, strict=True)},
              "rounds": [[round(t, 3) for t in r] for r in rounds],
              "device": str(first.device), "dtype": str(first.dtype), "workers": first.workers}
    figures = [
        Figure("embed", "official-style, padded batches of 8", len(items) / t_batch8, "items/s", detail=detail),
        Figure("embed", "official-style, one item per call", len(items) / t_single, "items/s", detail=detail),
    ]
    for mode, t in zip(ours, t_ours, strict=True):
        suffix = "" if len(ours) == 1 else f", {mode}"
        figures += [
            Figure("embed", f"qvlsearch Embedder.embed{suffix}", len(items) / t, "items/s", detail=detail),
            Figure("embed", f"speed-up over the faster baseline{suffix}", baseline / t, "x", goal=goal, detail=detail),
        ]
    return figures


def reranking(workdir: Path, path: str, device: str | None = None, goal: str = ">= 2", scale: int = 1,
              repeats: int = 1, variants: list[dict] | None = None) -> list[Figure]:
    """One query against 100 text documents and 20 image documents (times `scale`), best of `repeats` rounds;
    with `variants` (lists of Reranker options), qvlsearch is also timed with each."""
    from reference import ReferenceReranker

    from qvlsearch import Reranker

    docs = []
    for copy in range(scale):
        docs += [{"text": t} for t in texts(100, 10, 200, 4 + 10 * copy)]
        docs += [{"image": p} for p in images(workdir / "rerank-images", [(320, 240), (640, 480)] * 10, 5 + 10 * copy)]
    inputs = {"query": {"text": "a cat sleeping on a chair near the window"}, "documents": docs}
    ours = contenders(Reranker, path, device, variants)
    first = ours["defaults"]
    reference = ReferenceReranker(path, device=str(first.device), dtype=first.dtype)
    for reranker in ours.values():
        reranker.process({**inputs, "documents": docs[:4]})  # warm-up (and compiling)
    reference.process({**inputs, "documents": docs[:2]})
    rounds = [(timed(lambda: reference.process(inputs)), *(timed(lambda r=r: r.process(inputs)) for r in ours.values()))
              for _ in range(repeats)]
    t_reference, *t_ours = (min(times) for times in zip(*rounds, strict=True))
    detail = {"documents": len(docs), "one_pair_per_forward_s": round(t_reference, 3),
              **{f"ours_{mode}_s": round(t, 3) for mode, t in zip(ours, t_ours, strict=True)},
              "rounds": [[round(t, 3) for t in r] for r in rounds],
              "device": str(first.device), "dtype": str(first.dtype)}
    figures = [Figure("rerank", "official-style, one pair per forward", len(docs) / t_reference, "docs/s",
                      detail=detail)]
    for mode, t in zip(ours, t_ours, strict=True):
        suffix = "" if len(ours) == 1 else f", {mode}"
        figures += [
            Figure("rerank", f"qvlsearch Reranker.rerank{suffix}", len(docs) / t, "docs/s", detail=detail),
            Figure("rerank", f"speed-up over one pair per forward{suffix}", t_reference / t, "x", goal=goal,
                   detail=detail),
        ]
    return figures


def run(workdir: Path, checkpoints: dict[str, Path]) -> list[Figure]:
    return (embedding(workdir, str(checkpoints["embedder"]), goal=">= 1.0", repeats=3)
            + reranking(workdir, str(checkpoints["reranker"]), goal=">= 1.0", repeats=3))
