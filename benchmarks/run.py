"""`make bench`: the CPU benchmark suite. Prints each figure beside its goal and writes
benchmarks/results/<machine>-<date>-cpu.json.

    python benchmarks/run.py [index] [models] [search] [scale] [server] [dupes] [moments] [store] [watch] [web]
                                                   (default: all but store, watch and web)

`store` runs only when named: it writes indexes of up to 1M × 2048 vectors, which takes 20–45
minutes on 2 cores, 3 GiB of memory and 13 GB of free disk in the temporary folder ($TMPDIR).
`watch` runs only when named too: it leaves watchers idle for minutes on purpose; `web` too: it needs
Debian's chromium (`apt-get install chromium`).
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from common import report, save  # noqa: E402

SUITES = ("index", "models", "search", "scale", "server", "dupes", "moments", "store", "watch", "web")
DEFAULT = SUITES[:-3]


def main(argv: list[str]) -> int:
    from qvlsearch.tiny import build_checkpoints

    chosen = argv or list(DEFAULT)
    unknown = set(chosen) - set(SUITES)
    if unknown:
        print(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(SUITES)}", file=sys.stderr)
        return 2
    started = time.monotonic()
    figures = []
    with tempfile.TemporaryDirectory(prefix="qvlsearch-bench-") as tmp:
        work = Path(tmp)
        tiny = build_checkpoints(work / "tiny", preset="tiny")
        for name in chosen:
            begun = time.monotonic()
            module = importlib.import_module(f"bench_{name}")  # only the chosen ones: each imports what it needs
            if name == "dupes":
                figures += module.calibration(work, tiny["embedder"]) + module.run(work)
            elif name == "watch":
                figures += module.run(work, {"tiny": tiny, "wide": build_checkpoints(work / "wide", preset="wide")})
            else:
                models = build_checkpoints(work / "small", preset="small") if name == "models" else tiny
                figures += module.run(work, models)
            print(f"[{name} done in {time.monotonic() - begun:.0f}s]", file=sys.stderr, flush=True)
    print(report(figures))
    print(f"\nresults: {save(figures, 'cpu')} ({time.monotonic() - started:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
