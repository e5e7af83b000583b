"""Benchmark: `qvlsearch index --watch`, from a file's last write to its row being searchable, and an idle watcher.

Latency: a watcher runs over a small folder (`--settle 2`, the default); N text files are written one every
half second (a steady stream: each settles on its own while others come), and each one's time from its last
write to its row being committed (what `search` and `serve` read; polled here every 50 ms through the store,
since a `search` process would itself take seconds to start) is taken; median and p99, with OS events and with
`--poll 1`, with the tiny and the wide (2048) checkpoints. Goal: settle + the batch's own indexing time
+ <= 1 s, i.e. an overhead (latency - settle - indexing) <= 1 s.

Throughput (the events it keeps up with): a burst of B new text files written as fast as the disk takes them;
the files per second written (each one events: created, written, closed), and the files per second it took
them in, from the first write to the last row committed, less the settle time.

Idle: a watcher over a tree of many files in many folders (files of a suffix that is not indexed, so that the
first pass is quick; the watcher still watches every folder, and polling still stats every file) is left alone
for IDLE seconds; its CPU time (all threads, /proc) per second of wall time, with OS events and with --poll 5.
Goal: < 1% of a core with events.

    python benchmarks/bench_watch.py [N files, default 100] [tree files, default 100000] [idle s, default 60]
                                     [burst files, default 2000]
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import Figure

from qvlsearch.store import Snapshot

SETTLE = 2.0


def watcher(root: Path, index: Path, model: Path, log: Path, *extra: str) -> subprocess.Popen:
    """A running watcher whose first pass is done."""
    proc = subprocess.Popen([sys.executable, "-m", "qvlsearch", "index", str(root), "--index", str(index), "--model",
                             str(model), "--watch", "--json", "--settle", str(SETTLE), *extra],
                            stdout=open(log, "w"), stderr=subprocess.DEVNULL)  # noqa: SIM115 - the child holds it
    while not log.read_text().strip():
        if proc.poll() is not None:
            raise RuntimeError(f"watcher exited with {proc.returncode}")
        time.sleep(0.2)
    return proc


def committed(index: Path) -> set[str]:
    try:
        return set(Snapshot(index, ["path"], with_index=False).items["path"].to_pylist())
    except Exception:  # noqa: BLE001 - a generation switching under the read: try again
        return set()


def latencies(work: Path, model: Path, files: int, *extra: str) -> tuple[list[float], list[float]]:
    """Each file's seconds from its last write to its row committed, and each batch's own indexing seconds."""
    root, index, log = work / "lib", work / "idx", work / "watch.jsonl"
    root.mkdir(parents=True)
    (root / "seed.txt").write_text("a first file, so that the index exists")
    proc = watcher(root, index, model, log, *extra)
    written: dict[str, float] = {}
    took: dict[str, float] = {}

    def write() -> None:
        for i in range(files):
            path = root / f"note{i:04d}.txt"
            path.write_text(f"note {i}: the quick brown fox number {i * 7919 % 10007}")
            written[str(path)] = time.monotonic()
            time.sleep(0.5)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        while len(took) < files:
            now, rows = time.monotonic(), committed(index)
            took.update({p: now - t for p, t in list(written.items()) if p in rows and p not in took})
            time.sleep(0.05)
    finally:
        writer.join()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    batches = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    return list(took.values()), [b["seconds"] for b in batches if b["what"] == "watch"]


def burst(work: Path, model: Path, files: int) -> tuple[float, float, float]:
    """Files per second written in a burst of `files`, files per second taken in (settle excluded), and the
    seconds from the last write to the last row committed."""
    root, index, log = work / "burst", work / "burst-idx", work / "burst.jsonl"
    root.mkdir(parents=True)
    (root / "seed.txt").write_text("a first file, so that the index exists")
    proc = watcher(root, index, model, log)
    try:
        started = time.monotonic()
        for i in range(files):
            (root / f"b{i:05d}.txt").write_text(f"burst note {i} about item {i * 7919 % 10007}")
        last_write = time.monotonic()
        while len(committed(index)) < files + 1:
            time.sleep(0.1)
        done = time.monotonic()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    return files / (last_write - started), files / (done - started - SETTLE), done - last_write


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, all threads


def rss_mib(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def idle(work: Path, model: Path, tree_files: int, seconds: float, *extra: str) -> tuple[float, float]:
    """CPU share of one core and RSS (MiB) of a watcher left alone over a tree of `tree_files` files."""
    root, index, log = work / "tree", work / "tree-idx", work / "tree.jsonl"
    if not root.exists():
        for i in range(tree_files):
            folder = root / f"d{i // 100:04d}"
            if i % 100 == 0:
                folder.mkdir(parents=True)
            (folder / f"f{i:06d}.dat").write_bytes(b"x")
        (root / "seed.txt").write_text("the one indexed file")
    proc = watcher(root, index, model, log, *extra)
    try:
        time.sleep(5)  # the watches or the poller's first scan are in place
        before, started = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        share = (cpu_seconds(proc.pid) - before) / (time.monotonic() - started)
        return share, rss_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(work: Path, checkpoints: dict[str, dict[str, Path]], files: int = 100, tree_files: int = 100_000,
        idle_seconds: float = 60.0, burst_files: int = 2000) -> list[Figure]:
    """`checkpoints`: the embedders to measure latency with, by preset name ("tiny", "wide")."""
    figures = []
    for preset, paths in checkpoints.items():
        model = paths["embedder"]
        for mode, extra in (("events", ()), ("poll 1s", ("--poll", "1"))):
            took, batch_s = latencies(work / f"{preset}-{mode.replace(' ', '')}", model, files, *extra)
            overhead = [t - SETTLE - statistics.median(batch_s) for t in took]
            detail = {"files": files, "settle_s": SETTLE, "median_batch_s": round(statistics.median(batch_s), 3),
                      "load_1min": os.getloadavg()[0]}
            figures += [
                Figure("watch", f"{preset}: write to searchable, {mode}, median", statistics.median(took), "s", "",
                       detail),
                Figure("watch", f"{preset}: write to searchable, {mode}, p99", percentile(took, 0.99), "s", "",
                       detail),
                Figure("watch", f"{preset}: overhead beyond settle + indexing, {mode}, median",
                       statistics.median(overhead), "s", "<= 1.0", detail)]
        written, taken, after = burst(work / f"{preset}-burst", model, burst_files)
        detail = {"files": burst_files, "settle_s": SETTLE, "last_write_to_committed_s": round(after, 2),
                  "load_1min": os.getloadavg()[0]}
        figures += [Figure("watch", f"{preset}: burst of {burst_files} files, written", written, "files/s", "",
                           detail),
                    Figure("watch", f"{preset}: burst of {burst_files} files, taken in", taken, "files/s", "",
                           detail)]
    model = next(iter(checkpoints.values()))["embedder"]
    for mode, extra in (("events", ()), ("poll 5s", ("--poll", "5"))):
        share, rss = idle(work, model, tree_files, idle_seconds, *extra)
        detail = {"tree_files": tree_files, "folders": tree_files // 100, "seconds": idle_seconds,
                  "rss_mib": round(rss), "load_1min": os.getloadavg()[0]}
        figures.append(Figure("watch", f"idle CPU, {mode}, {tree_files} files", 100 * share, "% of a core",
                              "<= 1.0" if mode == "events" else "", detail))
    return figures


if __name__ == "__main__":
    from common import report

    from qvlsearch.tiny import build_checkpoints

    args = [float(a) for a in sys.argv[1:]]
    with tempfile.TemporaryDirectory(prefix="qvlsearch-bench-watch-") as tmp:
        models = {preset: build_checkpoints(Path(tmp) / preset, preset=preset) for preset in ("tiny", "wide")}
        print(report(run(Path(tmp), models, *(int(a) for a in args[:2]), *args[2:3], *(int(a) for a in args[3:4]))))
