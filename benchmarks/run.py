"""`make bench`: the CPU benchmark suite. Prints each figure beside its goal and writes
benchmarks/results/<machine>-<date>-cpu.json.

    python benchmarks/run.py [index] [models] [search] [scale] [server] [dupes]   (default: all)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from common import report, save  # noqa: E402

SUITES = ("index", "models", "search", "scale", "server", "dupes")


def main(argv: list[str]) -> int:
    import bench_dupes
    import bench_index
    import bench_models
    import bench_scale
    import bench_search
    import bench_server

    from qvlsearch.tiny import build_checkpoints

    chosen = argv or list(SUITES)
    unknown = set(chosen) - set(SUITES)
    if unknown:
        print(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(SUITES)}", file=sys.stderr)
        return 2
    started = time.monotonic()
    figures = []
    with tempfile.TemporaryDirectory(prefix="qvlsearch-bench-") as tmp:
        work = Path(tmp)
        tiny = build_checkpoints(work / "tiny", preset="tiny")
        runs = {"index": lambda: bench_index.run(work, tiny),
                "models": lambda: bench_models.run(work, build_checkpoints(work / "small", preset="small")),
                "search": lambda: bench_search.run(work, tiny),
                "scale": lambda: bench_scale.run(work, tiny),
                "server": lambda: bench_server.run(work, tiny),
                "dupes": lambda: bench_dupes.calibration(work, tiny["embedder"]) + bench_dupes.run(work)}
        for name in chosen:
            begun = time.monotonic()
            figures += runs[name]()
            print(f"[{name} done in {time.monotonic() - begun:.0f}s]", file=sys.stderr, flush=True)
    print(report(figures))
    print(f"\nresults: {save(figures, 'cpu')} ({time.monotonic() - started:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
