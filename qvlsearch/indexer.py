"""The indexing pipeline: walk → sniff and hash (threads) → embed in token batches → commit.

Only what changed is done again: files with the same size and mtime are not opened, a
moved or copied file reuses its stored vector by content hash, and deleted files leave
the index. Work is committed every `commit_every` items or `commit_seconds` seconds.
"""

from __future__ import annotations

import hashlib
import os
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .fs import Found, KindError, display_path, file_item, sniff_kind, suffix_kind, walk
from .parallel import prefetch
from .store import QUANTIZATIONS, Store, StoreError, check_factory, now


@dataclass
class IndexOptions:
    """Everything `qvlsearch index` can be told; the first block must match an existing index."""

    model: str = "Qwen/Qwen3-VL-Embedding-2B"
    dim: int | None = None  # None: the existing index's, else the model's hidden size
    quantize: str | None = None  # None: the existing index's, else "none"
    index_type: str | None = None  # None: the existing index's, else "flat"
    instruction: str = "Represent the user's input."
    min_pixels: int = 4096
    max_pixels: int = 1843200
    total_pixels: int = 7864320
    fps: float = 1.0
    max_frames: int = 64

    device: str | None = None
    batch_size: int | None = None
    workers: int | None = None
    processes: bool = False  # decode in worker processes instead of threads
    ray: bool = False  # embed on a Ray cluster (see ray_engine)
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a local Ray instance
    ray_workers: int | None = None  # model replicas; None: one per GPU, else 1
    verbose: bool = False
    exclude: Sequence[str] = ()
    include_hidden: bool = False
    follow_symlinks: bool = False
    commit_every: int = 256
    commit_seconds: float = 30.0


@dataclass
class Summary:
    """What a run did; `to_json()` is the `--json` output."""

    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: int = 0
    total: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["failures"] = [{"path": p, "error": e} for p, e in self.failures]
        data["seconds"] = round(self.seconds, 3)
        return data


@dataclass
class Sniffed:
    """A new or changed file after the cheap look: its kind, content hash and model input."""

    found: Found
    kind: str | None
    content_hash: str | None
    item: dict | None
    error: str | None


def content_hash(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sniff(found: Found, instruction: str) -> Sniffed:
    """Kind by content, hash, and the Embedder item; any failure is this file's error."""
    try:
        kind = sniff_kind(found.path)
        digest = content_hash(found.path)
        return Sniffed(found, kind, digest, {**file_item(found.path, kind), "instruction": instruction}, None)
    except KindError as exc:
        return Sniffed(found, None, None, None, str(exc))
    except OSError as exc:
        return Sniffed(found, None, None, None, exc.strerror or str(exc))


def settings_of(options: IndexOptions, dim: int, quantize: str, index_type: str) -> dict[str, Any]:
    """What must be the same for vectors to be comparable (the model revision is recorded, not compared)."""
    return {"model": options.model, "dim": dim,
            "quantize": quantize, "index_type": index_type, "instruction": options.instruction,
            "min_pixels": options.min_pixels, "max_pixels": options.max_pixels,
            "total_pixels": options.total_pixels, "fps": options.fps, "max_frames": options.max_frames}


def model_revision(model: str) -> str | None:
    """The Hub snapshot hash, or a hash of a local folder's config.json."""
    if os.path.isdir(model):
        config = Path(model) / "config.json"
        return "config-sha256:" + hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.exists() else None
    from transformers.utils import cached_file

    path = cached_file(model, "config.json", _raise_exceptions_for_missing_entries=False)
    parts = Path(path).parts if path else ()
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def model_hidden_size(model: str) -> int:
    from transformers import AutoConfig

    from .errors import ModelLoadError

    try:
        return AutoConfig.from_pretrained(model).text_config.hidden_size
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"cannot load model {model!r}: {str(exc).splitlines()[0]}") from None


def check_compatible(store: Store, wanted: dict[str, Any]) -> None:
    """Refuse to mix vectors of another model, dimension, quantization or prompt into an index."""
    have = store.settings
    differ = [k for k in wanted if have.get(k) != wanted[k]]
    if differ:
        pairs = ", ".join(f"{k}: index has {have.get(k)!r}, asked {wanted[k]!r}" for k in differ)
        raise StoreError(
            f"index {store.path} was built with other settings ({pairs}); use those settings, or change dim, "
            "quantization and index type without the model via `qvlsearch reindex`, or start a new index "
            "with --index DIR"
        )


def validate(options: IndexOptions) -> None:
    if options.quantize is not None and options.quantize not in QUANTIZATIONS:
        raise StoreError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {options.quantize!r}")
    if options.index_type is not None:
        check_factory(options.index_type, 64)


def lock_index(index_dir: Path, wait: bool) -> FileLock:
    """The one-writer lock; the OS releases it when its process dies, so a stale lock is never a problem."""
    index_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(index_dir / "lock", timeout=-1 if wait else 0)
    try:
        lock.acquire()
    except Timeout:
        holder = (index_dir / "lock.pid").read_text().strip() if (index_dir / "lock.pid").exists() else "?"
        raise StoreError(f"another qvlsearch index (pid {holder}) is writing to {index_dir}; "
                         "wait for it to finish or pass --wait") from None
    (index_dir / "lock.pid").write_text(f"{os.getpid()}\n")
    return lock


class Indexer:
    """One run of `qvlsearch index` over some roots into one index directory."""

    def __init__(self, index_dir: Path, options: IndexOptions, *, wait: bool = False, dry_run: bool = False,
                 progress: Callable[[int, int, int], None] | None = None, embedder: Any = None):
        """`embedder` may be a ready `Embedder` for `options.model` (loaded on first need otherwise)."""
        validate(options)
        self.index_dir = Path(index_dir)
        self.options = options
        self.wait = wait
        self.dry_run = dry_run
        self.progress = progress or (lambda done, total, failed: None)
        self.summary = Summary()
        self.embedder = embedder
        self.model_runs = 0  # items sent to the model in this run
        self.done = 0  # files dealt with so far, for the progress bar

    def run(self, roots: Sequence[str | os.PathLike]) -> Summary:
        started = time.monotonic()
        roots = [os.path.abspath(os.fspath(r)) for r in roots]
        for root in roots:
            if not os.path.lexists(root):
                raise StoreError(f"no such file or folder: {root}")
        lock = lock_index(self.index_dir, self.wait)
        try:
            store = self.store = self.open_store()
            self.last_commit, self.since_commit = time.monotonic(), 0
            try:
                self.update(store, roots)
            finally:
                if not self.dry_run:
                    store.commit()  # also on Ctrl-C: keep what is done
        finally:
            lock.release()
        self.summary.seconds = time.monotonic() - started
        return self.summary

    def open_store(self) -> Store:
        if (self.index_dir / "manifest.json").exists():
            store = Store.open(self.index_dir)
            store.tidy()  # what a killed writer left behind goes; the view catches up
            m, o = store.manifest, self.options
            check_compatible(store, settings_of(o, o.dim or m["dim"], o.quantize or m["quantize"],
                                                o.index_type or m["index_type"]))
            return store
        full_dim = model_hidden_size(self.options.model)
        dim = self.options.dim or full_dim
        if not 32 <= dim <= full_dim:
            raise StoreError(f"--dim must be between 32 and the model's hidden size {full_dim}, got {dim}")
        settings = settings_of(self.options, dim, self.options.quantize or "none", self.options.index_type or "flat")
        settings["model_revision"] = model_revision(self.options.model)
        return Store.create(self.index_dir, settings, full_dim)

    def update(self, store: Store, roots: list[str]) -> None:
        by_path = {row["path_bytes"]: row for row in store.rows.values()}
        found = list(walk(roots, include_hidden=self.options.include_hidden,
                          follow_symlinks=self.options.follow_symlinks, exclude=self.options.exclude))
        self.summary.total = len(found)
        seen = {os.fsencode(f.path) for f in found}
        under_roots = [r if os.path.isfile(r) else r.rstrip(os.sep) + os.sep for r in roots]
        gone = {row["content_hash"]: row for row in store.rows.values()
                if row["path_bytes"] not in seen and row["status"] == "ok" and row["content_hash"]
                and os.fsdecode(row["path_bytes"]).startswith(tuple(under_roots))}
        gone_ids = {row["id"] for row in store.rows.values() if row["path_bytes"] not in seen
                    and os.fsdecode(row["path_bytes"]).startswith(tuple(under_roots))}
        live_by_hash = {row["content_hash"]: row for row in store.rows.values()
                        if row["status"] == "ok" and row["id"] not in gone_ids}
        todo: list[tuple[Found, dict | None]] = []
        for f in found:
            row = by_path.get(os.fsencode(f.path))
            if row is not None and row["size"] == f.size and row["mtime_ns"] == f.mtime_ns and not f.error:
                if row["status"] == "error":  # still failing: reported again, not retried
                    self.summary.failed += 1
                    self.summary.failures.append((row["path"], row["error"]))
                else:
                    self.summary.unchanged += 1
                self.advance()
            elif f.error:
                self.record_error(store, f, row, None, f.error)
            else:
                todo.append((f, row))
        if self.dry_run:  # what would be embedded or dropped; moves show as added + removed
            self.summary.added = sum(row is None for _, row in todo)
            self.summary.updated = len(todo) - self.summary.added
            self.summary.removed = len(gone_ids)
            return

        pending: dict[int, tuple[Sniffed, dict | None]] = {}
        # The Embedder pulls `needs_model` in its own thread, so what it finds for the store
        # waits here, to be done in this thread (the store has one writer).
        deferred: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

        def needs_model() -> Iterator[dict]:
            """Sniffed files that no stored vector serves, as Embedder items (the rest go to `deferred`)."""
            sniffed = prefetch(lambda i, job: (sniff(job[0], self.options.instruction), job[1]), todo,
                               workers=self.options.workers or min(8, os.cpu_count() or 1), ahead=64)
            for s, row in sniffed:
                if s.error:
                    deferred.put(partial(self.record_error, store, s.found, row, s.kind, s.error))
                elif (source := gone.pop(s.content_hash, None) or live_by_hash.get(s.content_hash)) is not None:
                    deferred.put(partial(self.reuse, store, s, row, source, gone_ids))
                else:
                    pending[self.model_runs] = (s, row)
                    self.model_runs += 1
                    yield s.item

        def run_deferred() -> None:
            while not deferred.empty():
                deferred.get()()

        if todo:
            for result in self.get_embedder().embed_iter(needs_model(), batch_size=self.options.batch_size):
                run_deferred()
                s, row = pending.pop(result.index)
                if result.error is not None:
                    self.record_error(store, s.found, row, s.kind, getattr(result.error, "reason", str(result.error)))
                else:
                    self.record_ok(store, s, row, result.vector, result.facts)
            run_deferred()
        for item_id in gone_ids:
            if item_id in store.rows:
                store.remove([item_id])
                self.summary.removed += 1

    def get_embedder(self):
        o = self.options
        if self.embedder is None and o.ray:
            from .media import VisionOptions
            from .ray_engine import RayEmbedder

            self.embedder = RayEmbedder(o.model, address=o.ray_address, workers=o.ray_workers, device=o.device,
                                        options=VisionOptions(o.min_pixels, o.max_pixels, o.total_pixels, o.fps,
                                                              o.max_frames), verbose=o.verbose)
        elif self.embedder is None:
            from .embedder import Embedder

            self.embedder = Embedder(o.model, device=o.device, min_pixels=o.min_pixels, max_pixels=o.max_pixels,
                                     total_pixels=o.total_pixels, fps=o.fps, max_frames=o.max_frames,
                                     workers=o.workers, processes=o.processes)
        return self.embedder

    def row(self, store: Store, f: Found, old: dict | None, **values: Any) -> dict[str, Any]:
        return {"id": old["id"] if old else store.new_id(), "path": display_path(f.path),
                "path_bytes": os.fsencode(f.path), "root": display_path(f.root), "size": f.size,
                "mtime_ns": f.mtime_ns, "content_hash": None, "width": None, "height": None, "duration_s": None,
                "frames": None, "tokens": None, "error": None, "indexed_at": now(), **values}

    def record_error(self, store: Store, f: Found, old: dict | None, kind: str | None, error: str) -> None:
        if old is not None:
            store.remove([old["id"]])
        store.put(self.row(store, f, old, kind=kind or suffix_kind(f.path) or "unknown", status="error",
                           error=error))
        self.summary.failed += 1
        self.summary.failures.append((display_path(f.path), error))
        self.advance()

    def record_ok(self, store: Store, s: Sniffed, old: dict | None, vector: Any, facts: dict) -> None:
        store.put(self.row(store, s.found, old, kind=s.kind, status="ok", content_hash=s.content_hash, **facts),
                  vector)
        if old is None:
            self.summary.added += 1
        else:
            self.summary.updated += 1
        self.advance()

    def reuse(self, store: Store, s: Sniffed, old: dict | None, source: dict, gone_ids: set[int]) -> None:
        """A moved, copied or merely touched file: take the stored vector, run no model."""
        facts = {k: source[k] for k in ("width", "height", "duration_s", "frames", "tokens")}
        vector = store.vector(source["id"])  # ids are never reused: this is the vector of the source's content
        if source["id"] in gone_ids:  # moved: the old path's row goes, its id and vector move along
            gone_ids.discard(source["id"])
            store.remove([source["id"]])
            if old is not None:
                store.remove([old["id"]])
            store.put({**self.row(store, s.found, source, kind=s.kind, status="ok", content_hash=s.content_hash,
                                  **facts)}, vector)
            self.summary.moved += 1
        else:
            store.put(self.row(store, s.found, old, kind=s.kind, status="ok", content_hash=s.content_hash, **facts),
                      vector)
            if old is None:
                self.summary.added += 1
            elif old["id"] == source["id"]:
                self.summary.unchanged += 1  # touched, same content
            else:
                self.summary.updated += 1
        self.advance()

    def advance(self) -> None:
        """One more file dealt with: progress, and a commit when enough work is pending."""
        self.done += 1
        self.since_commit += 1
        if not self.dry_run and self.store.dirty and (self.since_commit >= self.options.commit_every
                                 or time.monotonic() - self.last_commit >= self.options.commit_seconds):
            self.store.commit()
            self.last_commit, self.since_commit = time.monotonic(), 0
        self.progress(self.done, self.summary.total, self.summary.failed)
