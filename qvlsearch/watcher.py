"""Keep an index current: `qvlsearch index PATH... --watch`. The indexer does the work, the watcher decides when.

After a first pass (an ordinary run), changed paths come from the operating system through `watchfiles` (or
from polling, on network and FUSE filesystems, or when asked). A path is taken once its size and mtime have not
changed for `settle` seconds, so a copy in progress is never read half-written; what has settled goes to the
indexer as one run over those paths, with the same store and model, and is committed as one batch: moves are
found by content hash within a batch, deletes remove rows, edits are embedded again. A root that disappears
keeps its rows and is rescanned when it is back; every root is rescanned every `rescan_every` seconds.
The index lock is held while a batch is written and given up while idle, so that `index --wait` gets its turn.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchfiles import Change

from .companions import is_beside_name
from .fs import ignored, suffix_kind, walk
from .indexer import Indexer, Summary, lock_index, owner_of
from .store import StoreError, check_index_folder
from .store.files import commit_key, read_manifest

log = logging.getLogger("qvlsearch")

WATCH_FILE = "watch.json"  # in the index folder while a watcher runs: `qvlsearch info` names it
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "afpfs", "9p", "ceph", "glusterfs", "lustre",
                       "davfs", "fuseblk"}
NETWORK_POLL_SECONDS = 5.0  # polling interval picked for a network or FUSE filesystem without --poll
IDLE_WAKE_MS = 1000  # how often an idle watcher looks whether its roots are still there
DEBOUNCE_MS, STEP_MS = 500, 50  # watchfiles: changes are grouped over at most DEBOUNCE_MS
WATCH_LIMIT = "the inotify watch limit was reached"
WORKERS_IDLE_SECONDS = 60.0  # decoder processes left running this long after a batch, then stopped (memory)

Signature = tuple[int, int, bool] | None  # size, mtime_ns, is a folder; None: the path is gone


@dataclass
class WatchOptions:
    settle: float = 2.0  # seconds a path's size and mtime must stay the same before it is taken
    poll: float | None = None  # seconds between polls; None: OS events unless a root is on a network filesystem
    rescan_every: float = 3600.0  # seconds between full rescans of every root (0: never)


def filesystem_type(path: str) -> str | None:
    """The type of the filesystem `path` is on, from /proc/mounts (Linux); None where that cannot be told."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    real, best, fstype = os.path.realpath(path), "", None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].encode().decode("unicode_escape")  # spaces and tabs come as \040 and \011
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, fstype = point, fields[2]
    return fstype


def polls(fstype: str | None) -> bool:
    """Whether OS events cannot be relied on for this filesystem type (network shares, FUSE mounts)."""
    return fstype is not None and (fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse."))


def signature(path: str) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, os.path.isdir(path)


def watched_inodes() -> set[int] | None:
    """The inode numbers of the folders this process's inotify instances watch (Linux, from /proc/self/fdinfo);
    None where that cannot be told. watchfiles starts without a folder it could not watch and says nothing, so
    this is how a folder past the inotify watch limit is noticed."""
    try:
        fds = os.listdir("/proc/self/fdinfo")
    except OSError:
        return None
    inodes: set[int] = set()
    for fd in fds:
        try:
            lines = Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
        except OSError:
            continue
        inodes.update(int(line.split(" ino:")[1].split()[0], 16) for line in lines if line.startswith("inotify wd:"))
    return inodes


def watcher_info(index_dir: Path) -> dict[str, Any] | None:
    """What the running watcher of an index wrote about itself; None when none runs."""
    try:
        info = json.loads((Path(index_dir) / WATCH_FILE).read_text())
        os.kill(int(info["pid"]), 0)
    except PermissionError:  # alive, another user's
        return info
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info


class Watcher:
    """One `qvlsearch index --watch` session over some roots."""

    def __init__(self, indexer: Indexer, roots: Sequence[str | os.PathLike], options: WatchOptions, *,
                 wait: bool = False, report: Callable[[str, Summary], None] = lambda what, summary: None,
                 say: Callable[[str], None] = log.warning):
        """`report(what, summary)` hears of each committed batch ("indexed", "watch" or "rescan")."""
        self.indexer, self.options, self.wait, self.report, self.say = indexer, options, wait, report, say
        self.roots = [os.path.abspath(os.fspath(r)) for r in roots]
        self.pending: dict[str, tuple[Signature, float]] = {}  # path: its signature, and since when it has it
        self.gone_roots: set[str] = set()
        self.lock: Any = None
        self.notifier: Any = None
        self.stopping = self.interrupted = False
        self.stop_by = 0.0
        self.mode = ""
        self.rescan_due = False  # events were lost (OS events gave way to polling): rescan every root
        self.last_batch = 0.0  # when the last batch ended (decoder processes stop after WORKERS_IDLE_SECONDS)

    # --- the session ------------------------------------------------------------------------------

    def run(self) -> int:
        """The first pass, then changes until SIGTERM (0) or SIGINT (130); what has settled is committed first."""
        for root in self.roots:
            if not os.path.lexists(root):
                raise StoreError(f"no such file or folder: {root}")
        check_index_folder(self.indexer.index_dir)
        self.mode = self.pick_mode()
        previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.acquire()
            self.write_watch_file()
            self.make_notifier()  # before the first pass: what changes during it comes as changes after it
            self.batch(self.roots, (), "indexed")
            self.say(f"watching {len(self.roots)} path{'s' * (len(self.roots) != 1)} ({self.mode}); "
                     "stop with Ctrl-C or SIGTERM")
            self.loop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.notifier is not None:
                self.notifier.close()
            (self.indexer.index_dir / WATCH_FILE).unlink(missing_ok=True)
            self.release()
            self.indexer.stop_workers()
        return 130 if self.interrupted else 0

    def on_signal(self, signum: int, frame: Any) -> None:
        if self.stopping and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (what is done is committed)
        if not self.stopping:
            self.stopping, self.stop_by = True, time.monotonic() + self.options.settle + 1.0
            self.interrupted = signum == signal.SIGINT

    def loop(self) -> None:
        next_rescan = time.monotonic() + self.options.rescan_every if self.options.rescan_every else None
        self.check_roots()
        drained = False  # once stopping: the changes that came before the signal have been read
        while not (drained and (not self.pending or time.monotonic() >= self.stop_by)):
            drained = self.stopping
            changes = self.wait_for_changes()
            if changes == "signal":  # a second Ctrl-C, met inside watchfiles' wait
                raise KeyboardInterrupt
            self.check_roots()  # before the changes are read: the files of a root that went are not gone
            if isinstance(changes, set):
                self.note(changes)
            if settled := self.settled():
                self.batch(settled, self.present_roots(), "watch")
            due = next_rescan is not None and time.monotonic() >= next_rescan
            if (due or self.rescan_due) and not self.stopping and self.present_roots():
                self.rescan_due = False
                self.batch(self.present_roots(), (), "rescan")
                next_rescan = time.monotonic() + self.options.rescan_every if self.options.rescan_every else None
            if not self.pending:
                self.release()  # idle: another writer may go
                if time.monotonic() - self.last_batch >= WORKERS_IDLE_SECONDS:
                    self.indexer.stop_workers()  # an idle watcher holds no decoder processes
        if self.pending:
            self.say(f"{len(self.pending)} changed paths had not settled; the next run takes them")

    # --- events and settling ----------------------------------------------------------------------

    def pick_mode(self) -> str:
        if self.options.poll:
            return f"polling every {self.options.poll:g}s"
        slow = [(root, t) for root in self.roots if polls(t := filesystem_type(root))]
        if slow:
            self.options.poll = NETWORK_POLL_SECONDS
            root, fstype = slow[0]
            return f"polling every {NETWORK_POLL_SECONDS:g}s: {root} is on {fstype}, where OS events do not arrive"
        return "OS file events"

    def present_roots(self) -> list[str]:
        return [r for r in self.roots if r not in self.gone_roots]

    def make_notifier(self) -> None:
        from watchfiles._rust_notify import RustNotify

        if self.notifier is not None:
            self.notifier.close()
            self.notifier = None
        roots = self.present_roots()
        if not roots:
            return
        poll = self.options.poll
        try:
            try:  # strict: watchfiles would leave out, unsaid, every folder it cannot watch (the watch limit)
                self.notifier = RustNotify(roots, False, bool(poll), int((poll or 1) * 1000), True, False)
            except PermissionError:  # a folder this user cannot read: watch the others (its files are errors)
                self.notifier = RustNotify(roots, False, bool(poll), int((poll or 1) * 1000), True, True)
        except FileNotFoundError:  # a root went meanwhile: the next check says so
            return
        except OSError as exc:  # the inotify watch limit (watchfiles: "OS file watch limit reached"), or no inotify
            text = str(exc).splitlines()[0]
            self.fall_back(WATCH_LIMIT if "watch limit" in text else text, roots)

    def fall_back(self, why: str, roots: list[str] | None = None) -> None:
        """OS events failed: poll from now on, and rescan (changes may have been missed)."""
        self.options.poll = NETWORK_POLL_SECONDS
        self.mode = f"polling every {NETWORK_POLL_SECONDS:g}s: OS file events failed ({why})"
        self.say(f"{self.mode}; raise fs.inotify.max_user_watches (sysctl) to get them back" if WATCH_LIMIT in why
                 else self.mode)
        if self.notifier is not None:
            self.notifier.close()
        from watchfiles._rust_notify import RustNotify

        self.notifier = RustNotify(roots or self.present_roots(), False, True, int(NETWORK_POLL_SECONDS * 1000),
                                   True, True)
        self.rescan_due = True
        self.write_watch_file()

    def check_roots(self) -> None:
        """A root that went keeps its rows and is said once; one that is back is rescanned."""
        changed = False
        for root in self.roots:
            there = os.path.lexists(root)
            if not there and root not in self.gone_roots:
                self.gone_roots.add(root)
                self.pending = {p: v for p, v in self.pending.items() if owner_of(p, [root]) != root}
                self.say(f"{root} is gone (unmounted or moved?); its files stay in the index until it is back")
                changed = True
            elif there and root in self.gone_roots:
                self.gone_roots.discard(root)
                self.say(f"{root} is back; rescanning it")
                self.batch([root], (), "rescan")
                changed = True
        if changed or self.notifier is None:
            self.make_notifier()

    def wait_for_changes(self) -> set[tuple[int, str]] | str:
        """Changes, or why none came: after at most a second idle, or when the next pending path may settle."""
        now = time.monotonic()
        timeout = IDLE_WAKE_MS / 1000
        if self.pending:
            timeout = min(timeout, max(0.05, min(since for _, since in self.pending.values())
                                       + self.options.settle - now))
        if self.stopping:
            timeout = max(0.05, min(timeout, self.stop_by - now))
        if self.notifier is None:
            time.sleep(timeout)
            return "timeout"
        # no stop event: watchfiles drops the changes it holds when one ends the wait (a signal ends it within
        # `timeout`, at most a second, and the changes are still read)
        try:
            return self.notifier.watch(DEBOUNCE_MS, STEP_MS, int(timeout * 1000), None)
        except RuntimeError as exc:  # watchfiles' error "in underlying watcher"
            if self.options.poll:
                raise StoreError(f"watching {', '.join(self.present_roots())} failed: {exc}") from None
            self.fall_back(str(exc).splitlines()[0])
            return "timeout"

    def note(self, changes: Iterable[tuple[int, str]]) -> None:
        """Changed paths become pending: files that could be indexed, folders that came (their files), gone paths."""
        now, o = time.monotonic(), self.indexer.options
        roots = self.present_roots()
        came: set[str] = set()  # folders that came, and the folders below them: each must have an OS watch now
        for change, path in changes:
            root = owner_of(path, roots)
            if root not in roots or path == root or ignored(path, root, include_hidden=o.include_hidden,
                                                            exclude=o.exclude):
                continue
            sig = signature(path)
            if sig is None or (not sig[2] and (suffix_kind(path) or is_beside_name(os.path.basename(path)))):
                self.pending[path] = (sig, now)
            elif sig[2] and change == Change.added and (o.follow_symlinks or not os.path.islink(path)):
                # a folder came (made, moved or copied in): its files; a folder merely changed has its files' events
                for f in walk([path], include_hidden=o.include_hidden, follow_symlinks=o.follow_symlinks,
                              beside=is_beside_name):
                    if not ignored(f.path, root, include_hidden=o.include_hidden, exclude=o.exclude):
                        self.pending[f.path] = (signature(f.path), now)
                if not self.options.poll:
                    came.update(folder for folder, _, _ in os.walk(path))
        if came:
            self.check_watched(came)

    def check_watched(self, folders: set[str]) -> None:
        """Folders that came must be watched now; one that is not is past the inotify watch limit: poll."""
        watched = watched_inodes()
        if not watched:  # not Linux, or no inotify (then no events would have come)
            return
        for folder in sorted(folders):
            try:
                st = os.lstat(folder)
            except OSError:
                continue  # gone again
            if stat.S_ISDIR(st.st_mode) and st.st_ino not in watched:
                self.fall_back(f"{WATCH_LIMIT}: {folder} is not watched")
                return

    def settled(self) -> list[str]:
        """The pending paths whose signature has not changed for `settle` seconds, taken out of pending."""
        now, taken = time.monotonic(), []
        for path, (sig, since) in list(self.pending.items()):
            current = signature(path)
            if current != sig:
                self.pending[path] = (current, now)
            elif now - since >= self.options.settle:
                taken.append(path)
                del self.pending[path]
        return sorted(taken)

    # --- writing ----------------------------------------------------------------------------------

    def acquire(self) -> None:
        """The index lock, and the store as committed (opened again when another writer committed meanwhile)."""
        if self.lock is not None:
            return
        self.lock = lock_index(self.indexer.index_dir, self.wait or hasattr(self.indexer, "store"))
        store = getattr(self.indexer, "store", None)
        if store is None or commit_key(read_manifest(self.indexer.index_dir)) != commit_key(store.manifest):
            self.indexer.open_store()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def batch(self, paths: list[str], owners: Sequence[str], what: str) -> None:
        """One indexer run over `paths` (below `owners`, the watched roots, unless they are roots), committed."""
        self.acquire()
        indexer = self.indexer
        indexer.begin()
        started = time.monotonic()
        try:
            indexer.update(indexer.store, paths, owners)
        finally:
            indexer.store.commit()  # also on a second Ctrl-C: keep what is done
            self.last_batch = time.monotonic()
        indexer.summary.seconds = time.monotonic() - started
        s = indexer.summary
        # the first pass always says what it did; a batch or a rescan only when it changed something
        if what == "indexed" or s.added or s.updated or s.moved or s.removed or s.failed or indexer.options.verbose:
            self.report(what, s)

    def write_watch_file(self) -> None:
        info = {"pid": os.getpid(), "roots": self.roots, "mode": self.mode, "settle": self.options.settle,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (self.indexer.index_dir / WATCH_FILE).write_text(json.dumps(info) + "\n")
