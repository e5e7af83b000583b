"""The GPU benchmarks, in one command of under 8 minutes (model init included):

    python benchmarks/gpu.py [--preset 2b] [--device cuda] [--out DIR] [--workdir DIR]

It builds the `2b` checkpoints (Qwen3-VL-2B shapes, random weights, bfloat16) on the GPU,
then measures, each against its baseline in the same run:
  - embedding throughput against the official strategies (goal >= 4x the faster one);
  - reranking throughput against one pair per forward pass (goal >= 8x);
  - GPU efficiency: images/s and achieved TFLOP/s for 512x512 and 1024x768 photos and
    128-token texts, with FLOPs from the model shapes (about 5.45 GFLOP per visual token
    and 2.82 GFLOP per text token for Qwen3-VL-2B, attention not counted), and the model
    FLOP utilization against the card's dense bf16 peak (goal >= 40% for 1024x768).
Figures go to stdout and benchmarks/results/<card>-<date>-gpu.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from common import Figure, model_alone_s, prepared_batches, report, save, synchronized_clock  # noqa: E402

GFLOP_PER_VISUAL_TOKEN = 5.45
GFLOP_PER_TEXT_TOKEN = 2.82
DENSE_BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def peak_tflops(card: str) -> float | None:
    return next((v for k, v in DENSE_BF16_PEAK_TFLOPS.items() if k in card), None)


def feeding_alone_s(embedder, items: list) -> float:
    """Seconds to decode, process and batch `items` with the Embedder's workers, no model: the CPU side's ceiling."""
    started = time.perf_counter()
    for _ in embedder.batches(embedder.encode, items, None, embedder.worker_processes):
        pass
    return time.perf_counter() - started


def profile_model(embedder, items: list, path: Path) -> None:
    """Write where the model's time goes on prepared inputs (torch.profiler tables) to `path`."""
    from torch.profiler import ProfilerActivity, profile

    batches = prepared_batches(embedder, items)
    embedder.vectors(batches[0], dim=None, normalize=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if embedder.device.type == "cuda" else [])
    started = synchronized_clock(embedder.device)
    with profile(activities=activities) as prof:
        for batch in batches:
            embedder.vectors(batch, dim=None, normalize=True)
        finished = synchronized_clock(embedder.device)
    wall = finished - started
    averages = prof.key_averages()
    tables = [f"{len(items)} items in {len(batches)} batches, {wall:.3f} s under the profiler"]
    for key in ("self_cuda_time_total", "self_cpu_time_total"):
        try:
            tables.append(f"sorted by {key}\n" + averages.table(sort_by=key, row_limit=30, max_name_column_width=70))
        except Exception as exc:  # the key's name varies across torch versions; CUPTI may be missing
            tables.append(f"sorted by {key}: {type(exc).__name__}: {exc}")
    path.write_text("\n\n".join(tables) + "\n")


# The levers of the GPU-efficiency issue, as Embedder options, in the order a short run measures them.
LEVERS = {
    "eager": {},
    "compile": {"compile": "default"},
    "packing": {"packing": True},
    "jpeg-on-device": {"decode_jpeg_on_device": True},
    "all": {"compile": "default", "packing": True, "decode_jpeg_on_device": True},
    "processes": {"processes": True},
    "cuda-graphs": {"compile": "reduce-overhead"},  # texts only: fixed shapes are where graphs pay
    "all+processes": {"compile": "default", "packing": True, "decode_jpeg_on_device": True, "processes": True},
}


def efficiency_cases(workdir: Path, count: int) -> dict[str, list[dict]]:
    """Uniform inputs: `count` 512x512 and 1024x768 JPEG photos (32 files, reused) and 128-token texts."""
    import numpy as np
    from bench_models import texts
    from corpus import photo

    rng = np.random.default_rng(0)
    cases = {}
    for w, h in ((512, 512), (1024, 768)):
        folder = workdir / f"eff-{w}x{h}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(min(count, 32)):  # decode work is real; reuse files to save writing time
            paths.append(str(folder / f"{i}.jpg"))
            photo((w, h), rng).save(paths[-1], quality=90)
        cases[f"{w}x{h} photos"] = [{"image": paths[i % len(paths)]} for i in range(count)]
    cases["128-token texts"] = [{"text": t} for t in texts(count, 100, 100, 9)]
    return cases


def float32_vectors(path: str, device: str, cases: dict[str, list[dict]], count: int = 16) -> dict:
    """The float32 model's vectors for the first `count` items of each case: what bfloat16 must stay near."""
    import torch

    from qvlsearch import Embedder

    reference = Embedder(path, device=device, dtype="float32")
    vectors = {name: reference.embed(items[:count]) for name, items in cases.items()}
    del reference
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return vectors


def efficiency(cases: dict[str, list[dict]], path: str, device: str, lever: str, options: dict,
               reference: dict | None = None, batch_tokens: int | None = None,
               profile_dir: Path | None = None) -> list[Figure]:
    """Throughput on uniform inputs with the Embedder `options` of `lever`, converted to achieved
    TFLOP/s and utilization; beside it the model alone on prepared inputs and the feeding alone,
    and the lowest cosine to the float32 model's vectors (`reference`)."""
    import numpy as np
    import torch

    from qvlsearch import Embedder

    embedder = Embedder(path, device=device, max_batch_tokens=batch_tokens, **options)
    card = torch.cuda.get_device_name(0) if embedder.device.type == "cuda" else "cpu"
    peak = peak_tflops(card)
    figures = []
    for name, items in cases.items():
        if lever == "cuda-graphs" and "texts" not in name:
            continue
        warm_up_started = time.perf_counter()
        embedder.embed(items if options.get("compile") else items[:16])  # warm-up (compiling: every batch shape)
        warm_up_s = time.perf_counter() - warm_up_started
        tokens = {"visual": 0, "text": 0}
        started = synchronized_clock(embedder.device)
        for result in embedder.embed_iter(items):
            visual = (result.facts.get("width", 0) // 32) * (result.facts.get("height", 0) // 32)
            tokens["visual"] += visual
            tokens["text"] += result.facts["tokens"] - visual
        seconds = synchronized_clock(embedder.device) - started
        model_seconds = model_alone_s(embedder, items)
        feeding_seconds = feeding_alone_s(embedder, items)
        if profile_dir:
            profile_model(embedder, items[:64], profile_dir / f"profile-{lever}-{name.split()[0]}.txt")
        gflop = tokens["visual"] * GFLOP_PER_VISUAL_TOKEN + tokens["text"] * GFLOP_PER_TEXT_TOKEN
        detail = {"items": len(items), **tokens, "seconds": round(seconds, 3), "model_only_s": round(model_seconds, 3),
                  "feeding_only_s": round(feeding_seconds, 3), "warm_up_s": round(warm_up_s, 1),
                  "options": options, "compiled_in_the_end": embedder.compile_mode,
                  "workers": embedder.workers, "max_batch_tokens": embedder.max_batch_tokens,
                  "attn": embedder.attn_implementation, "card": card, "peak_tflops": peak}
        label = f"{name}, {lever}" + (f", batches of {embedder.max_batch_tokens} tokens" if batch_tokens else "")
        figures += [
            Figure("gpu", f"{label}: throughput", len(items) / seconds, "items/s", detail=detail),
            Figure("gpu", f"{label}: achieved", gflop / 1e3 / seconds, "TFLOP/s", detail=detail),
            Figure("gpu", f"{label}: model only, inputs ready", gflop / 1e3 / model_seconds, "TFLOP/s", detail=detail),
            Figure("gpu", f"{label}: inputs prepared only, no model", len(items) / feeding_seconds, "items/s",
                   detail=detail),
            Figure("gpu", f"{label}: pipeline / model alone", model_seconds / seconds, "", ">= 0.9", detail),
        ]
        if peak:
            goal = ">= 0.4" if name.startswith("1024x768") and not batch_tokens else ""
            figures.append(Figure("gpu", f"{label}: model FLOP utilization", gflop / 1e3 / seconds / peak, "", goal,
                                  detail))
        if reference is not None:
            ours = embedder.embed(items[: len(reference[name])])
            figures.append(Figure("gpu", f"{label}: lowest cosine to float32", float(np.min(np.sum(
                ours * reference[name], axis=1))), "", ">= 0.999", detail))
        print(f"[{label} done]", file=sys.stderr, flush=True)
    del embedder
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="2b", help="checkpoint shapes (default: 2b)")
    parser.add_argument("--device", default="cuda", help="device (default: cuda)")
    parser.add_argument("--count", type=int, default=128, help="items per efficiency case (default: 128)")
    parser.add_argument("--scale", type=int, default=3,
                        help="copies of the CPU suite's embed and rerank sets (default: 3, so that the GPU's "
                             "share is not lost in noise)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the embed and rerank comparisons; "
                        "each strategy's best counts (default: 2)")
    parser.add_argument("--levers", default=",".join(LEVERS),
                        help=f"efficiency runs, in this order, comma-separated (default: all: {','.join(LEVERS)})")
    parser.add_argument("--best", default="compile,packing,jpeg-on-device",
                        help="levers also used for the embed and rerank comparisons (default: %(default)s; "
                             "'' for none)")
    parser.add_argument("--budget-s", type=float, default=540,
                        help="start no lever after this many seconds; the rest are listed as skipped (default: 540)")
    parser.add_argument("--no-comparisons", action="store_true", help="skip the embed and rerank comparisons")
    parser.add_argument("--profile", action="store_true",
                        help="also write torch.profiler tables of the model on each efficiency case to --out")
    parser.add_argument("--batch-tokens", type=int, action="append", default=[],
                        help="also measure eager efficiency with batches of this many tokens (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="also copy the results JSON into this folder")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="work folder (default: a temporary one); clips already there are used as they are, "
                             "for machines without PyAV: `python benchmarks/gpu.py --clips-only --workdir DIR`")
    parser.add_argument("--clips-only", action="store_true", help="only write the video clips into --workdir")
    args = parser.parse_args(argv)
    levers = [name for name in args.levers.split(",") if name]
    unknown = [name for name in levers if name not in LEVERS]
    if unknown:
        parser.error(f"unknown lever(s) {', '.join(unknown)}; known: {', '.join(LEVERS)}")
    best = {k: v for name in args.best.split(",") if name for k, v in LEVERS[name].items()}
    import bench_models

    from qvlsearch.tiny import build_checkpoints

    if args.clips_only:
        bench_models.clips(args.workdir or Path("."))
        return 0
    started = time.monotonic()

    def progress(what: str) -> None:
        print(f"[{what} at {time.monotonic() - started:.0f}s]", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="qvlsearch-gpu-") as tmp:
        work = args.workdir or Path(tmp)
        checkpoints = build_checkpoints(work / args.preset, preset=args.preset, device=args.device)
        embedder_path, reranker_path = str(checkpoints["embedder"]), str(checkpoints["reranker"])
        progress("checkpoints built")
        figures, failed = [], []
        rerank_best = {k: v for k, v in best.items() if k == "compile"}  # packing turns the shared prefix off
        comparisons = [] if args.no_comparisons else [
            ("embedding comparison", lambda: bench_models.embedding(
                work, embedder_path, device=args.device, goal=">= 4", scale=args.scale, repeats=args.repeats,
                variants=[best] if best else None)),
            ("reranking comparison", lambda: bench_models.reranking(
                work, reranker_path, device=args.device, goal=">= 8", scale=args.scale, repeats=args.repeats,
                variants=[{"share_prefix": False}] + ([rerank_best] if rerank_best else []))),
        ]
        for name, compare in comparisons:
            try:
                figures += compare()
            except Exception as exc:  # as below: keep going
                failed.append(failure(name, exc))
            progress(f"{name} done")
            keep(figures, args.out)
        cases = efficiency_cases(work, args.count)
        reference = float32_vectors(embedder_path, args.device, cases)
        profile_dir = args.out if args.profile else None
        if profile_dir:
            profile_dir.mkdir(parents=True, exist_ok=True)
        skipped = []
        runs = [(lever, LEVERS[lever], None) for lever in levers] + [("eager", {}, n) for n in args.batch_tokens]
        for lever, options, tokens in runs:
            if time.monotonic() - started > args.budget_s:
                skipped.append(lever)
                continue
            try:
                figures += efficiency(cases, embedder_path, args.device, lever, options, reference, tokens,
                                      profile_dir if lever == "eager" and not tokens else None)
            except Exception as exc:  # one lever that breaks on this machine must not lose the others' figures
                failed.append(failure(lever, exc))
            progress(f"lever {lever} done")
            keep(figures, args.out)  # after each lever: a run cut short keeps what it measured
    print(report(figures))
    for line in failed:
        print(f"\nFAILED {line}")
    if skipped:
        print(f"\nskipped (over --budget-s): {','.join(skipped)}; run them with --no-comparisons --levers "
              f"{','.join(skipped)}")
    path = keep(figures, args.out)
    print(f"\nresults: {path} ({time.monotonic() - started:.0f}s in all)")
    return 1 if failed else 0


def failure(name: str, exc: Exception) -> str:
    """Print the traceback (into the log) and return one line for the summary."""
    traceback.print_exc()
    first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{name}: {type(exc).__name__}: {first_line}"


def keep(figures: list[Figure], out: Path | None) -> Path:
    """Save the figures so far (benchmarks/results/, and a copy in `out`); the results file's path."""
    path = save(figures, "gpu")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / path.name).write_text(path.read_text())
    return path


if __name__ == "__main__":
    sys.exit(main())
