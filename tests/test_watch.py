"""`qvlsearch index --watch`: a real watcher in a subprocess, real files, the tiny checkpoint; no mocked events.

Every wait polls for its condition (the machine may be loaded), with a generous bound.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from qvlsearch.store import Snapshot
from qvlsearch.watcher import WATCH_FILE, filesystem_type, polls

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
PHOTOS = Path(__file__).resolve().parent.parent / "sample_data" / "photos"
BOUND = 60.0  # seconds any one condition may take on a loaded machine


def until(condition: Callable[[], object], what: str, bound: float = BOUND) -> object:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {bound:.0f}s: {what}")


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qvlsearch", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


class Watch:
    """`qvlsearch index ROOT --watch --json` running; its batches (JSON lines) and its stderr, as they come."""

    def __init__(self, tmp: Path, root: Path, index: Path, model: Path, *extra: str, settle: float = 0.5):
        self.index, self.model = index, model
        self.out, self.err = tmp / "watch.out", tmp / "watch.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qvlsearch", "index", str(root), "--index", str(index), "--model", str(model),
                 "--watch", "--settle", str(settle), "--json", *extra], stdout=out, stderr=err, env=ENV)
        until(lambda: "watching" in self.stderr() or self.proc.poll() is not None, "the first pass")
        assert self.proc.poll() is None, self.stderr()

    def stderr(self) -> str:
        return self.err.read_text()

    def batches(self) -> list[dict]:
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def next_batches(self, seen: int, condition: Callable[[list[dict]], bool], what: str) -> list[dict]:
        """The batches after the first `seen` once `condition` holds for them."""
        return until(lambda: (new := self.batches()[seen:]) and condition(new) and new, what)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=BOUND)

    def paths(self) -> dict[str, str]:
        """Each indexed file's name below the root: its status."""
        items = Snapshot(self.index, ["path", "status"], with_index=False).items
        return dict(zip(items["path"].to_pylist(), items["status"].to_pylist(), strict=True))


def total(batches: list[dict], key: str) -> int:
    return sum(b[key] for b in batches)


def names(paths: dict[str, str]) -> set[str]:
    return {Path(p).name for p in paths}


@pytest.fixture
def watched(tmp_path, checkpoints):
    root = tmp_path / "lib"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    shutil.copy(PHOTOS / "bee.jpg", root / "a" / "bee.jpg")
    (root / "a" / "note.txt").write_text("a note about the garden")
    watches: list[Watch] = []

    def start(*extra: str, settle: float = 0.5) -> Watch:
        watches.append(Watch(tmp_path, root, tmp_path / "idx", checkpoints["embedder"], *extra, settle=settle))
        return watches[-1]

    yield root, start
    for w in watches:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def test_watch_follows_adds_edits_deletes_moves_and_copies_in_progress(watched, checkpoints, tmp_path):
    root, start = watched
    w = start("--exclude", "*.part", settle=1.0)
    assert w.batches()[0]["what"] == "indexed" and w.batches()[0]["added"] == 2
    assert "OS file events" in w.stderr()
    info = cli("info", "--index", str(w.index))
    assert f"watcher:   pid {w.proc.pid}" in info.stdout, info.stdout

    # add: `qvlsearch search` finds it
    seen = len(w.batches())
    shutil.copy(PHOTOS / "black cat at night.jpg", root / "b" / "cat.jpg")
    (root / "b" / "poem.txt").write_text("the moon over the sea")
    w.next_batches(seen, lambda b: total(b, "added") == 2, "two files added")
    found = cli("search", "the moon over the sea", "--index", str(w.index), "--model", str(checkpoints["embedder"]))
    assert found.returncode == 0 and str(root / "b" / "poem.txt") in found.stdout, found.stderr

    # edit: embedded again; rename across folders: a move, no model; delete
    seen = len(w.batches())
    (root / "b" / "poem.txt").write_text("the sun over the hills")
    w.next_batches(seen, lambda b: total(b, "updated") == 1, "the edit")
    seen = len(w.batches())
    os.rename(root / "b" / "cat.jpg", root / "a" / "cat-moved.jpg")
    moved = w.next_batches(seen, lambda b: total(b, "moved") == 1, "the move")
    assert total(moved, "added") == 0 and total(moved, "removed") == 0
    seen = len(w.batches())
    (root / "a" / "note.txt").unlink()
    w.next_batches(seen, lambda b: total(b, "removed") == 1, "the delete")
    assert names(w.paths()) == {"bee.jpg", "cat-moved.jpg", "poem.txt"}

    # a photo written in chunks over ~2 s is taken once, whole; hidden and excluded files are not taken
    seen = len(w.batches())
    data = (PHOTOS / "bee.jpg").read_bytes()
    (root / ".hidden.txt").write_text("hidden")
    (root / "b" / "download.txt.part").write_text("partial")
    with open(root / "b" / "slow.jpg", "wb") as f:
        for i in range(8):
            f.write(data[i * len(data) // 8:(i + 1) * len(data) // 8])
            f.flush()
            time.sleep(0.25)
    w.next_batches(seen, lambda b: total(b, "added") == 1, "the slow copy")
    paths = w.paths()
    assert paths[str(root / "b" / "slow.jpg")] == "ok" and "error" not in paths.values()
    assert total(w.batches(), "failed") == 0 and names(paths) == {"bee.jpg", "cat-moved.jpg", "poem.txt", "slow.jpg"}

    # 200+ files dropped at once: all taken, in batches that say so (one line each, not one per file)
    seen = len(w.batches())
    drop = root / "drop"
    drop.mkdir()
    for i in range(220):
        (drop / f"n{i:03d}.txt").write_text(f"note number {i} about item {i * 7919 % 1000}")
    w.next_batches(seen, lambda b: total(b, "added") == 220, "220 files")
    assert len(w.batches()) - seen < 20 and total(w.batches(), "failed") == 0

    # a second writer with --wait gets its turn while the watcher idles; the watcher goes on after it
    second = cli("index", str(root), "--index", str(w.index), "--model", str(checkpoints["embedder"]), "--wait")
    assert second.returncode == 0 and "0 added" in second.stderr and "224 unchanged" in second.stderr, second.stderr
    seen = len(w.batches())
    (root / "a" / "after.txt").write_text("written after the second writer")
    w.next_batches(seen, lambda b: total(b, "added") == 1, "a file after the second writer")

    assert w.stop(signal.SIGTERM) == 0
    assert not (w.index / WATCH_FILE).exists()
    assert "watcher:" not in cli("info", "--index", str(w.index)).stdout
    assert len(w.paths()) == 225


def test_root_renamed_away_and_back_keeps_its_rows_polling(watched, tmp_path):
    root, start = watched
    w = start("--poll", "1")
    assert "polling every 1s" in w.stderr()
    seen = len(w.batches())
    (root / "b" / "polled.txt").write_text("found by polling")
    w.next_batches(seen, lambda b: total(b, "added") == 1, "a file found by polling")

    away = tmp_path / "lib-away"
    os.rename(root, away)
    until(lambda: "is gone" in w.stderr(), "the root going")
    (away / "a" / "while-away.txt").write_text("added while the root was away")
    time.sleep(2.5)  # polls and settles pass: nothing may be removed meanwhile
    assert w.stderr().count("is gone") == 1 and len(w.paths()) == 3
    seen = len(w.batches())
    os.rename(away, root)
    back = w.next_batches(seen, lambda b: total(b, "added") == 1, "the rescan when the root is back")
    assert back[0]["what"] == "rescan" and total(back, "removed") == 0 and "is back" in w.stderr()
    assert names(w.paths()) == {"bee.jpg", "note.txt", "polled.txt", "while-away.txt"}
    assert w.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_stop_with_work_pending_commits_what_settles(watched, signum, code):
    root, start = watched
    w = start()
    for i in range(30):
        (root / "b" / f"late{i}.txt").write_text(f"late file {i}")
    assert w.stop(signum) == code  # sent before these files have settled
    paths = w.paths()
    assert {f"late{i}.txt" for i in range(30)} <= names(paths) and "error" not in paths.values()
    assert not (w.index / WATCH_FILE).exists()
    FileLock(w.index / "lock", timeout=0).acquire()  # released


def test_network_and_fuse_filesystems_are_polled():
    assert polls("nfs4") and polls("cifs") and polls("fuse.sshfs") and not polls("ext4") and not polls(None)
    assert filesystem_type("/") is None or isinstance(filesystem_type("/"), str)
