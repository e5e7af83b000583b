"""Shared pieces of the benchmark suite: timing, the result record, the report and the results file.

Each benchmark compares two things measured in the same run and reports their ratio,
because absolute times on a shared machine are noise.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent / "tests"))  # the reference (official-algorithm) implementation lives there


@dataclass
class Figure:
    """One measured number, with its goal when it has one."""

    benchmark: str
    name: str
    value: float
    unit: str
    goal: str = ""  # e.g. ">= 1.5", "<= 1.25"
    detail: dict = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if not self.goal:
            return None
        op, bound = self.goal.split()
        return self.value >= float(bound) if op == ">=" else self.value <= float(bound)


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of `repeats` runs of `fn`, in seconds (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def synchronized_clock(device) -> float:
    """perf_counter after a GPU's queued work is done."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def prepared_batches(embedder, items: list) -> list:
    """`items` decoded, processed and padded into batches as `embed` batches them (failures dropped)."""
    from qvlsearch.batching import Failed

    encoded = [embedder.encode(i, item) for i, item in enumerate(items)]
    # `formed`, not `collate`: with decode_jpeg_on_device, JPEGs are decoded as the batches form
    batches = (batch for group in embedder.token_batches(encoded) for batch in embedder.formed(group))
    return [b for b in batches if not isinstance(b, Failed)]


def model_alone_s(embedder, items: list) -> float:
    """Seconds the Embedder's model takes on `items` decoded and prepared beforehand (not timed),
    batched as `embed` batches them: what the pipeline could reach at best."""
    batches = prepared_batches(embedder, items)
    started = synchronized_clock(embedder.device)
    for batch in batches:
        embedder.vectors(batch, dim=None, normalize=True)
    return synchronized_clock(embedder.device) - started


def machine() -> str:
    """A short name for this machine: the GPU's, else the CPU model and core count."""
    try:
        import torch

        if torch.cuda.is_available():
            return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(0)).strip("-")
    except ImportError:
        pass
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1] for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{re.sub(r'[^A-Za-z0-9]+', '-', model).strip('-')}-{os.cpu_count()}cpu"


def report(figures: list[Figure]) -> str:
    """A plain table: benchmark, figure, value, goal, met."""
    rows = [("benchmark", "figure", "value", "goal", "met")]
    for f in figures:
        met = {True: "yes", False: "NO", None: ""}[f.met]
        rows.append((f.benchmark, f.name, f"{f.value:.4g} {f.unit}".strip(), f.goal, met))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def save(figures: list[Figure], suite: str) -> Path:
    """Write benchmarks/results/<machine>-<date>[-suite].json and return its path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{machine()}-{dt.date.today().isoformat()}-{suite}.json"
    record = {"machine": machine(), "suite": suite, "date": dt.datetime.now(dt.timezone.utc).isoformat(),
              "python": platform.python_version(), "figures": [{**asdict(f), "met": f.met} for f in figures]}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def run_standalone(run: Callable[[Path, dict[str, Path]], list[Figure]], suite: str, budget_s: float) -> None:
    """Run one benchmark module on its own: fresh tiny checkpoints, a report, a results file."""
    started = time.perf_counter()
    os.environ["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        from qvlsearch.tiny import build_checkpoints

        figures = run(Path(tmp), build_checkpoints(Path(tmp) / "tiny"))
    elapsed = time.perf_counter() - started
    figures.append(Figure(suite, "benchmark run time", elapsed, "s", goal=f"<= {budget_s:g}"))
    print(report(figures))
    print(f"results: {save(figures, suite=suite)}  ({elapsed:.0f} s)")
