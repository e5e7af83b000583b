"""`qvlsearch index --watch`: a real watcher in a subprocess, real files, the tiny checkpoint; no mocked events.

Each watcher is started once and taken through several scenarios in turn (a start costs a model load).
Events are lost for real: the kernel's inotify queue overflows while the watcher is stopped (SIGSTOP), and
the inotify watch limit is lowered in a user namespace of the watcher's own (the machine's limit is not
touched). Every wait polls for its condition (the machine may be loaded), with a generous bound.
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
from typer.testing import CliRunner

from qvlsearch.cli import app
from qvlsearch.search import SearchIndex
from qvlsearch.store import Snapshot
from qvlsearch.watcher import WATCH_FILE, filesystem_type, polls, watcher_info

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


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qvlsearch", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


class Watch:
    """`qvlsearch index ROOT --watch --json` running; its batches (JSON lines) and its stderr, as they come."""

    def __init__(self, tmp: Path, root: Path, model: Path, *extra: str, settle: float, inotify_watches: int = 0):
        """`inotify_watches`: run in a user namespace of its own where that many inotify watches are allowed."""
        self.index = tmp / "idx"
        self.out, self.err = tmp / "watch.out", tmp / "watch.err"
        command = [sys.executable, "-m", "qvlsearch", "index", str(root), "--index", str(self.index), "--model",
                   str(model), "--watch", "--settle", str(settle), "--json", *extra]
        if inotify_watches:
            if shutil.which("unshare") is None:
                pytest.fail("unshare (util-linux) is needed to lower the inotify watch limit for one process")
            command = ["unshare", "--user", "--map-root-user", "--", "sh", "-c",
                       f'echo {inotify_watches} > /proc/sys/user/max_inotify_watches && exec "$@"', "sh", *command]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(command, stdout=out, stderr=err, env=ENV)
        try:
            until(lambda: "watching" in self.stderr() or self.proc.poll() is not None, "the first pass", 2 * BOUND)
            assert self.proc.poll() is None, self.stderr()
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def stderr(self) -> str:
        return self.err.read_text()

    def batches(self) -> list[dict]:
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def next_batches(self, seen: int, condition: Callable[[list[dict]], bool], what: str) -> list[dict]:
        """The batches after the first `seen` once `condition` holds for them."""
        return until(lambda: (new := self.batches()[seen:]) and condition(new) and new, what)

    def stop(self, signum: int) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=BOUND)

    def paths(self) -> dict[str, str]:
        """Each indexed file's path: its status."""
        items = Snapshot(self.index, ["path", "status"], with_index=False).items
        return dict(zip(items["path"].to_pylist(), items["status"].to_pylist(), strict=True))

    def assert_stopped_cleanly(self) -> None:
        assert not (self.index / WATCH_FILE).exists()
        FileLock(self.index / "lock", timeout=0).acquire()  # released
        assert "Traceback" not in self.stderr(), self.stderr()


def total(batches: list[dict], key: str) -> int:
    return sum(b[key] for b in batches)


def names(paths: dict[str, str]) -> set[str]:
    return {Path(p).name for p in paths}


@pytest.fixture
def watched(tmp_path, checkpoints):
    """A library (a/note.txt, a/todo.txt, an empty b/) and what starts watchers over it (killed at the end)."""
    root = tmp_path / "lib"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "note.txt").write_text("a note about the garden")
    (root / "a" / "todo.txt").write_text("water the plants")
    watches: list[Watch] = []

    def start(*extra: str, settle: float = 0.5, inotify_watches: int = 0) -> Watch:
        watches.append(Watch(tmp_path, root, checkpoints["embedder"], *extra, settle=settle,
                             inotify_watches=inotify_watches))
        return watches[-1]

    yield root, start
    for w in watches:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def write_notes(folder: Path, count: int, prefix: str) -> set[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"{prefix}{i:04d}.txt").write_text(f"{prefix} note {i} about item {i * 7919 % 1000}")
    return {f"{prefix}{i:04d}.txt" for i in range(count)}


def test_watch_follows_adds_edits_moves_deletes_imports_and_a_second_writer(watched, checkpoints, embedder):
    root, start = watched
    (root / "a" / "todo.txt").unlink()
    shutil.copy(PHOTOS / "bee.jpg", root / "a" / "bee.jpg")
    w = start("--exclude", "*.part", settle=1.0)
    assert w.batches()[0]["what"] == "indexed" and w.batches()[0]["added"] == 2
    assert "OS file events" in w.stderr()
    info = CliRunner().invoke(app, ["info", "--index", str(w.index)])  # in this process: no torch import
    assert info.exit_code == 0 and f"watcher:   pid {w.proc.pid}" in info.stdout, info.stdout

    # adds: a search finds them (`search` reads the index as the watcher commits it)
    seen = len(w.batches())
    shutil.copy(PHOTOS / "black cat at night.jpg", root / "b" / "cat.jpg")
    (root / "b" / "poem.txt").write_text("the moon over the sea")
    (root / "b" / "old.txt").write_text("to be deleted")
    w.next_batches(seen, lambda b: total(b, "added") == 3, "three files added")
    found = SearchIndex(w.index, embedder=embedder).search("the moon over the sea")
    assert str(root / "b" / "poem.txt") in {r.path for r in found}

    # at once: an edit (embedded again), a rename across folders and a folder renamed (moves: the stored
    # vectors, no model), a delete
    seen = len(w.batches())
    (root / "a" / "note.txt").write_text("a note about the orchard")
    os.rename(root / "b" / "cat.jpg", root / "a" / "cat-moved.jpg")
    (root / "b" / "old.txt").unlink()
    os.rename(root / "b", root / "c")
    changed = w.next_batches(seen, lambda b: total(b, "updated") == 1 and total(b, "moved") == 2
                             and total(b, "removed") == 1, "the edit, the moves and the delete")
    assert total(changed, "added") == 0
    assert set(w.paths()) == {str(root / "a" / n) for n in ("bee.jpg", "cat-moved.jpg", "note.txt")} | {
        str(root / "c" / "poem.txt")}

    # a photo written in chunks over ~2 s is taken once, whole; hidden and excluded files are not taken
    seen = len(w.batches())
    data = (PHOTOS / "bee.jpg").read_bytes()
    (root / ".hidden.txt").write_text("hidden")
    (root / "c" / "download.txt.part").write_text("partial")
    with open(root / "c" / "slow.jpg", "wb") as f:
        for i in range(8):
            f.write(data[i * len(data) // 8:(i + 1) * len(data) // 8])
            f.flush()
            time.sleep(0.25)
    w.next_batches(seen, lambda b: total(b, "added") == 1, "the slow copy")
    paths = w.paths()
    assert paths[str(root / "c" / "slow.jpg")] == "ok" and "error" not in paths.values()
    assert total(w.batches(), "failed") == 0
    assert names(paths) == {"bee.jpg", "cat-moved.jpg", "note.txt", "poem.txt", "slow.jpg"}

    # 1,000 files dropped at once: all taken, in a few batches (one line each, not one per file)
    seen = len(w.batches())
    dropped = write_notes(root / "drop", 1000, "n")
    w.next_batches(seen, lambda b: total(b, "added") == 1000, "1,000 files")
    assert len(w.batches()) - seen < 20 and total(w.batches(), "failed") == 0
    assert dropped <= names(w.paths())

    # a second writer with --wait gets its turn while the watcher idles; the watcher goes on after it
    second = cli("index", str(root), "--index", str(w.index), "--model", str(checkpoints["embedder"]), "--wait")
    assert second.returncode == 0 and "0 added" in second.stderr and "1005 unchanged" in second.stderr, second.stderr
    seen = len(w.batches())
    (root / "a" / "after.txt").write_text("written after the second writer")
    w.next_batches(seen, lambda b: total(b, "added") == 1, "a file after the second writer")

    # Ctrl-C with work pending: what was written before it settles and is committed, then exit 130
    late = write_notes(root / "c", 30, "late")
    assert w.stop(signal.SIGINT) == 130
    paths = w.paths()
    assert late <= names(paths) and len(paths) == 1036 and "error" not in paths.values()
    w.assert_stopped_cleanly()
    assert watcher_info(w.index) is None


def test_dropped_events_a_root_renamed_away_and_back_and_the_watch_limit_reached(watched, tmp_path):
    root, start = watched
    w = start("--rescan-every", "2", inotify_watches=3)  # lib, a and b: all watched
    # the watcher stopped (SIGSTOP) while more changes come than the kernel queues for it: the queue overflows
    # and a file written after that is never reported; the periodic rescan finds it
    queue = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    w.proc.send_signal(signal.SIGSTOP)
    try:
        until(lambda: all(Path(t, "stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
                          for t in Path(f"/proc/{w.proc.pid}/task").iterdir()), "every thread stopped")
        with open(root / "b" / "one.dat", "wb") as one, open(root / "b" / "two.dat", "wb") as two:
            for _ in range(queue):  # alternating: the kernel merges only repeats of the last event
                one.write(b"x")
                one.flush()
                two.write(b"x")
                two.flush()
        (root / "b" / "lost.txt").write_text("its events were dropped")
    finally:
        w.proc.send_signal(signal.SIGCONT)
    seen = len(w.batches())
    found = w.next_batches(seen, lambda b: total(b, "added") == 1, "the dropped file, by the rescan")
    assert [b["what"] for b in found if b["added"]] == ["rescan"]

    # the root renamed away: its rows stay, said once; renamed back: rescanned (what came meanwhile is added)
    away = tmp_path / "lib-away"
    os.rename(root, away)
    until(lambda: "is gone" in w.stderr(), "the root going")
    (away / "a" / "while-away.txt").write_text("added while the root was away")
    time.sleep(2.5)  # settles and a periodic rescan's time pass: nothing may be removed meanwhile
    assert w.stderr().count("is gone") == 1 and names(w.paths()) == {"note.txt", "todo.txt", "lost.txt"}
    seen = len(w.batches())
    os.rename(away, root)
    back = w.next_batches(seen, lambda b: total(b, "added") == 1, "the rescan when the root is back")
    assert [b["what"] for b in back if b["added"]] == ["rescan"] and total(back, "removed") == 0
    assert w.stderr().count("is back; rescanning it") == 1
    assert names(w.paths()) == {"note.txt", "todo.txt", "lost.txt", "while-away.txt"}

    # folders that came past the inotify watch limit: said once, then polling (and a rescan)
    assert "OS file events" in w.stderr() and "failed" not in w.stderr()
    seen = len(w.batches())
    write_notes(root / "import" / "day1", 3, "one")  # two more folders
    w.next_batches(seen, lambda b: total(b, "added") == 3, "the folder that came")
    until(lambda: "the inotify watch limit was reached" in w.stderr(), "the fall-back said")
    seen = len(w.batches())
    (root / "import" / "day1" / "later.txt").write_text("in a folder without an inotify watch")
    w.next_batches(seen, lambda b: total(b, "added") == 1, "a later file, found by polling")
    assert w.stop(signal.SIGTERM) == 0
    assert len(w.paths()) == 8
    w.assert_stopped_cleanly()
    # a rescan every 2 s, most of them finding nothing: those said nothing
    assert all(any(b[key] for key in ("added", "updated", "moved", "removed", "failed"))
               for b in w.batches() if b["what"] == "rescan")


def test_past_the_inotify_watch_limit_at_start_it_polls_and_sigterm_commits_pending_work(watched):
    root, start = watched
    for i in range(6):
        (root / "b" / f"album{i}").mkdir()
    w = start(inotify_watches=4, settle=1.0)  # 9 folders
    assert ("polling every 5s: OS file events failed (the inotify watch limit was reached); raise "
            "fs.inotify.max_user_watches") in w.stderr(), w.stderr()
    assert "polling every 5s" in json.loads((w.index / WATCH_FILE).read_text())["mode"]
    seen = len(w.batches())
    (root / "b" / "album5" / "deep.txt").write_text("in a folder OS events would not have covered")
    w.next_batches(seen, lambda b: total(b, "added") == 1, "a file found by polling")

    # SIGTERM while a file is pending (seen by a poll while it was still being written): it settles, is
    # committed whole, and the exit is 0
    with open(root / "b" / "slow.txt", "w") as f:
        for i in range(40):  # 8 s: a 5 s poll sees it
            f.write(f"line {i} of a slowly written file\n")
            f.flush()
            time.sleep(0.2)
    assert w.stop(signal.SIGTERM) == 0
    assert names(w.paths()) == {"note.txt", "todo.txt", "deep.txt", "slow.txt"}
    assert total(w.batches(), "added") == 4 and total(w.batches(), "updated") == 0  # slow.txt once, whole
    w.assert_stopped_cleanly()


def test_network_and_fuse_filesystems_are_polled(tmp_path):
    assert polls("nfs4") and polls("cifs") and polls("fuse.sshfs") and not polls("ext4") and not polls(None)
    # a real mount, at a path with a space (escaped as \\040 in /proc/mounts)
    point = tmp_path / "a share"
    point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)]).returncode:
        pytest.fail("mounting a tmpfs needs root")
    try:
        (point / "x").mkdir()
        assert filesystem_type(str(point / "x")) == "tmpfs"
    finally:
        subprocess.run(["umount", str(point)], check=True)
    assert filesystem_type(str(point)) == filesystem_type(str(tmp_path))
