"""The indexing pipeline: walk → sniff and hash (threads) → embed in token batches → commit.

A file becomes one row per searchable unit: the whole file, each page of a PDF, each moment
of a video. Only what changed is done again, file by file: files with the same size and mtime
are not opened, a moved or copied file reuses its stored vectors by content hash, and deleted
files leave the index with all their rows. The sniff step also reads each file's date taken, GPS
position and camera (`metadata.read_metadata`); an index written before those columns existed
gets them on its next run, without the model. So too the words of each unit (`words.read_words`: a text
file's content, a PDF page's text layer, descriptions), which go to the full-text index beside the vectors;
an index written before words were indexed gets them on its next run, without the model. A Live Photo's
video and the RAW of a RAW+JPEG pair are named in their still's row and are no items of their own;
sidecars (Takeout JSON, XMP) fill the date, place, description and keywords a file does not carry
(companions.py, sidecars.py). When only what lies beside a file changed (a sidecar edited, a Live Photo's
video deleted), its rows get the new metadata and keep their vectors. Work is committed every
`commit_every` files or `commit_seconds` seconds; a file's rows are always committed together.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import queue
import shutil
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from filelock import FileLock, Timeout

from .companions import BESIDE_FIELDS, Arranged, arrange, is_beside_name, related_paths, same_capture
from .decoders import DECODED_APART, MEDIA_KINDS, Decoders, crash_reason, decoding_kind
from .errors import MediaError, SettingError, check_setting
from .estimate import CostMeter, Estimate, unit_kind
from .fs import Found, KindError, display_path, file_item, sniff_kind, suffix_kind, walk
from .hub import model_setting
from .limits import VisionOptions
from .metadata import FIELDS, read_metadata
from .moments import MOMENT_FRAMES, MOMENT_SECONDS, place, video_duration, windows
from .pages import MAX_PAGES, PdfPage, page_count
from .parallel import WorkerCrashed, prefetch
from .sidecars import SIDECAR_FIELDS, fill, is_sidecar_name, read_sidecars
from .store import QUANTIZATIONS, Store, StoreError, check_factory, check_index_folder, now
from .words import read_words

METADATA_VERSION = 2  # in the manifest once every ok row's metadata columns have been read (2: to the microsecond)
REINDEXABLE = ("dim", "quantize", "index_type")  # the settings `qvlsearch reindex` changes

log = logging.getLogger("qvlsearch")


@dataclass
class IndexOptions:
    """Everything `qvlsearch index` can be told; the first block must match an existing index."""

    model: str | os.PathLike = "Qwen/Qwen3-VL-Embedding-2B"  # a local folder is stored as its resolved path
    dim: int | None = None  # None: the existing index's, else the model's hidden size
    quantize: str | None = None  # None: the existing index's, else "none"
    index_type: str | None = None  # None: the existing index's, else "flat"
    instruction: str = "Represent the user's input."
    min_pixels: int = 4096
    max_pixels: int = 1843200
    total_pixels: int = 7864320
    fps: float = 1.0
    max_frames: int = 64
    moment_seconds: float | None = None  # None: the existing index's, else MOMENT_SECONDS; 0: no moments
    max_pages: int | None = None  # None: the existing index's, else MAX_PAGES

    device: str | None = None
    batch_size: int | None = None
    workers: int | None = None
    processes: bool = False  # decode in worker processes instead of threads
    compile: str | None = None  # torch.compile mode of the model's layers (None: eager)
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
    warnings: list[tuple[str, str]] = field(default_factory=list)  # e.g. PDF pages past --max-pages, skipped
    cost: dict[str, Any] = field(default_factory=lambda: CostMeter().to_json())  # planned, embedded, rates

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("cost"))
        data["failures"] = [{"path": p, "error": e} for p, e in self.failures]
        data["warnings"] = [{"path": p, "warning": w} for p, w in self.warnings]
        data["seconds"] = round(self.seconds, 3)
        return data


@dataclass
class Unit:
    """One searchable unit of a file: the whole file, a page of a PDF or a moment of a video."""

    item: dict[str, Any]  # the Embedder item
    fields: dict[str, Any]  # kind, and page or start_s/end_s


@dataclass
class Sniffed:
    """A new or changed file after the cheap look: its kind, content hash and units."""

    found: Found
    kind: str | None
    content_hash: str | None
    units: list[Unit]
    error: str | None
    warning: str | None = None
    metadata: dict = field(default_factory=dict)  # taken_at, lat, lon, camera
    words: dict = field(default_factory=dict)  # the file's words by place: None (the whole file) or a page number


def unit_words(words: dict[int | None, str], fields: dict[str, Any], metadata: dict[str, Any]) -> str | None:
    """The words of the unit at `fields` (a page, the whole file; a video's moments have none of their own), and
    for the row that stands for its file, the description and keywords its sidecars give (`metadata`)."""
    if fields.get("start_s") is not None:
        return None
    beside = [metadata.get("description") or "", *(metadata.get("keywords") or [])] if fields.get("page") in (
        None, 1) else []
    return "\n".join(text for text in (words.get(fields.get("page")), *beside) if text) or None


@dataclass
class FileJob:
    """A file whose units are with the model: its rows are put together when the last one is back."""

    sniffed: Sniffed
    old: list[dict[str, Any]]  # the file's rows before this run
    left: int
    rows: list[tuple[dict[str, Any], Any]] = field(default_factory=list)  # (row, vector or None)


@dataclass
class Changes:
    """What a walk found that needs more than counting: files to sniff (with their stored rows, if any) and
    files gone (with theirs); `unchanged` and `seen` are paths, `os.fsencode`d."""

    gone: dict[bytes, list[dict[str, Any]]]
    seen: set[bytes]
    todo: list[tuple[Found, list[dict[str, Any]]]] = field(default_factory=list)
    unchanged: set[bytes] = field(default_factory=set)  # unchanged files without an error row
    refresh: list[tuple[Found, list[dict[str, Any]]]] = field(default_factory=list)  # unchanged, but not beside them


def content_hash(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def plan_units(path: str, kind: str, options: IndexOptions) -> tuple[list[Unit], str | None]:
    """The units of a file and a warning (pages skipped); MediaError when a PDF cannot be opened."""
    instruction = options.instruction
    if kind == "pdf":
        count = page_count(path)
        if count == 0:
            raise MediaError(f"PDF {path!r} has no pages", reason="the PDF has no pages")
        pages = min(count, options.max_pages or MAX_PAGES)
        warning = f"{count - pages} of {count} pages skipped (past --max-pages {pages})" if count > pages else None
        return [Unit({"image": PdfPage(path, page), "instruction": instruction}, {"kind": "pdf", "page": page})
                for page in range(1, pages + 1)], warning
    item = {**file_item(path, kind), "instruction": instruction}
    units = [Unit(item, {"kind": kind})]
    if kind == "video" and options.moment_seconds:
        try:
            duration = video_duration(path)
        except Exception:  # noqa: BLE001 - the whole-file unit reports why the video cannot be read
            duration = 0.0
        units += [Unit({**item, "video_start": start, "video_end": end, "max_frames": MOMENT_FRAMES},
                       {"kind": "video", "start_s": start, "end_s": end, "duration_s": duration})
                  for start, end in windows(duration, options.moment_seconds)]
    return units, None


def plan_file(path: str, options: IndexOptions) -> tuple[list[Unit], float]:
    """What a file will cost before it is hashed or decoded: its units and, for a video, its length in seconds
    (from the container). A file that cannot be looked at plans nothing: the run reports it."""
    try:
        kind = suffix_kind(path) or sniff_kind(path)
        units, _ = plan_units(path, kind, options)
        return units, video_duration(path) if kind == "video" else 0.0
    except (KindError, MediaError, OSError, ValueError):
        return [], 0.0


def inspect(path: str, kind: str, options: IndexOptions
            ) -> tuple[list[Unit], str | None, dict[str, Any], dict[int | None, str]]:
    """What opening a file tells (a decoder parses it): its units, a warning, its metadata and its words."""
    units, warning = plan_units(path, kind, options)
    return units, warning, read_metadata(path, kind), read_words(path, kind, pages=len(units))


def metadata_and_words(path: str, kind: str, pages: int) -> dict[str, Any]:
    """A file's metadata fields and, under "words", its words by place (see `inspect`)."""
    return {**read_metadata(path, kind), "words": read_words(path, kind, pages)}


def sniff(found: Found, options: IndexOptions, decoders: Decoders | None = None) -> Sniffed:
    """Kind by content, hash, and the units to embed; any failure is this file's error. The file is
    opened in the `decoders`' worker processes when its kind is one of theirs."""
    kind = None
    try:
        kind = sniff_kind(found.path)
        digest = content_hash(found.path)
        if decoders is not None:
            units, warning, metadata, words = decoders.run(decoding_kind(found.path, kind), inspect, found.path,
                                                           kind, options)
        else:
            units, warning, metadata, words = inspect(found.path, kind, options)
        return Sniffed(found, kind, digest, units, None, warning, metadata, words)
    except KindError as exc:
        return Sniffed(found, None, None, [], str(exc))
    except MediaError as exc:
        return Sniffed(found, kind, None, [], exc.reason)
    except WorkerCrashed as exc:
        return Sniffed(found, kind, None, [], crash_reason(exc.how))
    except OSError as exc:
        return Sniffed(found, None, None, [], exc.strerror or str(exc))


REUSED = ("kind", "content_hash", "width", "height", "duration_s", "frames", "tokens", "status", "error", "page",
          "start_s", "end_s")


def reusable(rows: list[dict[str, Any]]) -> bool:
    """Whether a file's stored rows can serve a copy of it: it was read, and some unit has a vector."""
    return bool(rows[0]["content_hash"]) and any(r["status"] == "ok" for r in rows)


def unit_order(row: dict[str, Any]) -> tuple:
    """A file's rows in order: the whole-file row (or first page) first, then pages, then moments."""
    return row.get("start_s") is not None, row.get("page") or 0, row.get("start_s") or 0.0


def rows_by_file(rows: Iterable[dict[str, Any]]) -> dict[bytes, list[dict[str, Any]]]:
    """Every file's rows, in `unit_order`."""
    files: dict[bytes, list[dict[str, Any]]] = {}
    for row in rows:
        files.setdefault(row["path_bytes"], []).append(row)
    for unit_rows in files.values():
        unit_rows.sort(key=unit_order)
    return files


class StoredFiles:
    """What an index holds, file by file, kept as Arrow columns: a run compares every file it finds with
    them in a few vectorized steps, and only the files that changed or went become Python rows."""

    def __init__(self, table: pa.Table):
        self.table = table
        self.paths = table["path_bytes"]
        failing = pc.equal(table["status"], "error")
        self.failing = set(self.paths.filter(failing).to_pylist())  # files with an error row
        paired = table["live_video"].is_valid()
        self.live_videos = dict(zip(self.paths.filter(paired).to_pylist(),  # still -> its Live Photo video, as stored
                                    table["live_video"].filter(paired).to_pylist(), strict=True))

    def beside(self, paths: pa.Array) -> list[tuple]:
        """For each of `paths` (encoded), what its stored first row says lies beside it (`BESIDE_FIELDS`), or
        Nones when the index lacks it."""
        at = pc.index_in(paths, value_set=self.paths)
        if not len(self.table):
            return [(None,) * len(BESIDE_FIELDS)] * len(paths)
        columns = [self.table[name].take(at).to_pylist() for name in BESIDE_FIELDS]
        return list(zip(*columns, strict=True))

    def same_stat(self, found: list[Found], paths: pa.Array) -> np.ndarray:
        """For each found file (`paths`: theirs, encoded), whether the index has it with this size and mtime,
        so that it is not opened again."""
        at = pc.index_in(paths, value_set=self.paths)  # each path's first row; null when the index lacks it
        known = at.is_valid().to_numpy(zero_copy_only=False)
        first = pc.fill_null(at, 0)
        sizes = np.fromiter((f.size for f in found), np.int64, len(found))
        mtimes = np.fromiter((f.mtime_ns for f in found), np.int64, len(found))
        if not len(self.table):
            return known
        stored_sizes = pc.fill_null(self.table["size"].take(first), -1).to_numpy()
        stored_mtimes = pc.fill_null(self.table["mtime_ns"].take(first), -1).to_numpy()
        return known & (stored_sizes == sizes) & (stored_mtimes == mtimes)

    def missing(self, paths: pa.Array) -> list[bytes]:
        """The stored files whose paths are not among `paths`."""
        absent = pc.invert(pc.is_in(self.paths, value_set=paths))
        return pc.unique(self.paths.filter(absent)).to_pylist()

    def rows_of(self, paths: Iterable[bytes]) -> dict[bytes, list[dict[str, Any]]]:
        """The rows of these files (one pass over the table), each file's in `unit_order`."""
        paths = list(paths)
        if not paths:
            return {}
        wanted = pc.is_in(self.paths, value_set=pa.array(paths, pa.binary()))
        return rows_by_file(self.table.filter(wanted).to_pylist())

    def by_hash(self, leave_out: Collection[bytes]) -> dict[str, bytes]:
        """A file with each content hash that has a vector, among the files not in `leave_out`."""
        ok = pc.equal(self.table["status"], "ok")
        hashes = self.table["content_hash"].filter(ok).to_pylist()
        paths = self.paths.filter(ok).to_pylist()
        return {h: path for h, path in zip(hashes, paths, strict=True) if h and path not in leave_out}


def path_filter(files: Iterable[str], folders: Iterable[str]) -> Callable[[bytes], bool]:
    """Whether a stored `path_bytes` is one of `files` or lies below one of `folders` (never a mere string prefix)."""
    exact = {os.fsencode(f) for f in files}
    prefixes = tuple(os.fsencode(folder.rstrip(os.sep) + os.sep) for folder in folders)
    return lambda path: path in exact or path.startswith(prefixes)


def owner_of(path: str, owners: Sequence[str]) -> str:
    """The longest of `owners` (folders) that `path` is or lies below; `path` itself when none."""
    below = [o for o in owners if path == o or path.startswith(o.rstrip(os.sep) + os.sep)]
    return max(below, key=len, default=path)


def settings_of(options: IndexOptions, dim: int, quantize: str, index_type: str) -> dict[str, Any]:
    """What must be the same for vectors and rows to be comparable (the model revision is recorded, not compared)."""
    return {"model": options.model, "dim": dim,
            "quantize": quantize, "index_type": index_type, "instruction": options.instruction,
            "min_pixels": options.min_pixels, "max_pixels": options.max_pixels,
            "total_pixels": options.total_pixels, "fps": options.fps, "max_frames": options.max_frames,
            "moment_seconds": options.moment_seconds, "max_pages": options.max_pages}


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
    from .hub import require_model

    require_model(model)  # at once, before transformers is imported, and without the Hub's retries
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
        reindex = ("change dim, quantization and index type without the model via `qvlsearch reindex`, or "
                   if set(differ) & set(REINDEXABLE) else "")
        raise StoreError(f"index {store.path} was built with other settings ({pairs}); use those settings, or "
                         f"{reindex}start a new index with --index DIR")


MIN_DIM = 32  # the narrowest Matryoshka cut qvlsearch takes (as Embedder.embed's dim)


def check_dim(dim: int, quantize: str, full_dim: int | None = None, name: str = "dim") -> None:
    """The width of the search vectors: from MIN_DIM to the model's (`full_dim`, where known), a multiple of 8
    for binary codes."""
    rule = f"an integer from {MIN_DIM} to the model's hidden size {full_dim}" if full_dim else None
    check_setting(name, dim, MIN_DIM, full_dim, rule=rule)
    if quantize == "binary" and dim % 8:
        raise SettingError(name, "a multiple of 8 with binary quantization (8 dimensions make a byte)", dim)


def check_quantize(quantize: str) -> None:
    if quantize not in QUANTIZATIONS:
        raise SettingError("quantize", f"one of {', '.join(QUANTIZATIONS)}", quantize)


def check_structure(dim: int, quantize: str, index_type: str, full_dim: int) -> None:
    """The search structure's settings, before any work: width, quantization and a FAISS type that builds."""
    check_quantize(quantize)
    check_dim(dim, quantize, full_dim)
    check_factory(index_type, dim)


def validate(options: IndexOptions) -> None:
    """Refuse options that are wrong whatever the index holds (a SettingError naming the option); the
    dimension's upper bound and the index type are checked once the model's width is known."""
    if options.quantize is not None:
        check_quantize(options.quantize)
    if options.dim is not None:
        check_dim(options.dim, options.quantize or "none")
    VisionOptions(options.min_pixels, options.max_pixels, options.total_pixels, options.fps, options.max_frames)
    if options.moment_seconds not in (None, 0):
        check_setting("moment_seconds", options.moment_seconds, 1, integer=False,
                      rule="0 (no moments) or a number of seconds of at least 1")
    for name in ("max_pages", "batch_size", "workers", "ray_workers", "commit_every"):
        if getattr(options, name) is not None:
            check_setting(name, getattr(options, name), 1)
    check_setting("commit_seconds", options.commit_seconds, 0, integer=False, above=True)
    if options.device not in (None, "auto"):
        from .qwen import pick_device

        pick_device(options.device)


def lock_index(index_dir: Path, wait: bool) -> FileLock:
    """The one-writer lock; the OS releases it when its process dies, so a stale lock is never a problem.
    A folder that cannot be made or written to is a StoreError."""
    try:
        while True:
            index_dir.mkdir(parents=True, exist_ok=True)
            lock = FileLock(index_dir / "lock", timeout=0)
            try:
                lock.acquire()
            except Timeout:
                holder = (index_dir / "lock.pid").read_text().strip() if (index_dir / "lock.pid").exists() else "?"
                if not wait:
                    raise StoreError(f"another qvlsearch index (pid {holder}) is writing to {index_dir}; "
                                     "wait for it to finish or pass --wait") from None
                log.warning("waiting for another qvlsearch index (pid %s) writing to %s", holder, index_dir)
                lock.acquire(timeout=-1)
            if (index_dir / "lock").exists():
                break
            lock.release()  # a first run that failed removed the folder while this one waited: make it again
        (index_dir / "lock.pid").write_text(f"{os.getpid()}\n")
    except OSError as exc:
        verb = "write to" if index_dir.is_dir() else "create"
        raise StoreError(f"cannot {verb} the index folder {index_dir}: {exc.strerror or exc}; pass --index a "
                         "folder you can write to") from None
    return lock


def undo_first_run(index_dir: Path) -> Callable[[], None]:
    """For a run into a folder without an index: what removes the folders and files it made (lock, segments),
    to be called while holding the lock when the run ends without a commit; otherwise a no-op."""
    index_dir = Path(os.path.abspath(index_dir))
    if (index_dir / "manifest.json").exists():
        return lambda: None
    missing = [p for p in (index_dir, *index_dir.parents) if not p.exists()]
    before = set() if missing else set(os.listdir(index_dir))

    def undo() -> None:
        if (index_dir / "manifest.json").exists():
            return
        made = missing[-1:] or [index_dir / name for name in set(os.listdir(index_dir)) - before]
        for path in made:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    return undo


class Indexer:
    """One run of `qvlsearch index` over some roots into one index directory."""

    def __init__(self, index_dir: Path, options: IndexOptions, *, wait: bool = False, dry_run: bool = False,
                 progress: Callable[[int, int, int], None] | None = None, embedder: Any = None,
                 say: Callable[[str], None] | None = None, sample: int = 0):
        """`embedder` may be a ready `Embedder` for `options.model` (loaded on first need otherwise). With `say`,
        the run counts its work by kind before the model starts and tells it, then each kind's measured rate
        and the expected total (see estimate.py). A dry run also counts, and embeds the first `sample` items
        of each kind to measure their rates; it writes nothing."""
        validate(options)
        check_setting("sample", sample, 0)
        self.index_dir = Path(index_dir)
        self.options = replace(options, model=model_setting(options.model))
        self.wait = wait
        self.dry_run = dry_run
        self.progress = progress or (lambda done, total, failed: None)
        self.embedder = embedder
        self.say = say
        self.sample = sample
        # Files of these kinds are opened and decoded in worker processes (started when the first comes), so
        # that a decoder's crash is that file's error row: videos, PDFs and RAW files; with --processes, every
        # media file.
        self.decoders = Decoders(options.workers, MEDIA_KINDS if options.processes else DECODED_APART)
        self.begin()

    def begin(self) -> None:
        """A new run's counts (a watcher makes one run of each batch, with the same model and store)."""
        self.summary = Summary()
        self.estimate = Estimate(self.say, self.options.max_pixels)
        self.model_runs = 0  # items sent to the model in this run
        self.done = 0  # files dealt with so far, for the progress bar
        self.last_commit, self.since_commit = time.monotonic(), 0
        self.arranged = Arranged([])  # the walked files sorted into items and what lies beside them (`compare`)

    def run(self, roots: Sequence[str | os.PathLike]) -> Summary:
        started = time.monotonic()
        roots = [os.path.abspath(os.fspath(r)) for r in roots]
        for root in roots:
            if not os.path.lexists(root):
                raise StoreError(f"no such file or folder: {root}")
        self.begin()
        self.summary.warnings += [(display_path(root), "a sidecar with no photo beside it (same name): nothing to "
                                   "index; name the photo or its folder") for root in roots
                                  if os.path.isfile(root) and is_sidecar_name(os.path.basename(root))
                                  and related_paths([root]) == [root]]
        check_index_folder(self.index_dir)
        if self.dry_run:  # no folder, no lock, no clean-up: nothing is written
            try:
                self.update(self.open_store(), roots)
            finally:
                self.decoders.shutdown()
        else:
            undo = undo_first_run(self.index_dir)
            lock = lock_index(self.index_dir, self.wait)
            try:
                store = self.open_store()
                try:
                    self.update(store, roots)
                finally:
                    store.commit()  # also on Ctrl-C: keep what is done
            finally:
                undo()  # a first run that failed before its first commit leaves nothing behind
                lock.release()
                self.decoders.shutdown()
        self.summary.seconds = time.monotonic() - started
        self.summary.cost = self.estimate.meter.to_json()
        return self.summary

    def stop_workers(self) -> None:
        """Stop the decoder processes (and the embedder's); the next file that needs them starts them again."""
        self.decoders.shutdown()
        if hasattr(self.embedder, "stop_workers"):  # a RayEmbedder's replicas are Ray's
            self.embedder.stop_workers()

    def open_store(self) -> Store:
        if (self.index_dir / "manifest.json").exists():
            store = self.store = Store.open(self.index_dir, write=not self.dry_run)
            if not self.dry_run:
                store.tidy()  # what a killed writer left behind goes; the view catches up
            m, o = store.manifest, self.options
            # moments and pages follow the index; one made before them (no value, or None as a schema-1 upgrade
            # wrote it) takes the value asked, else the default
            unset = {k for k in ("moment_seconds", "max_pages") if m.get(k) is None}
            o = self.options = replace(o, **{k: v if v is not None else default if k in unset else m[k]
                                             for k, v, default in (("moment_seconds", o.moment_seconds, MOMENT_SECONDS),
                                                                   ("max_pages", o.max_pages, MAX_PAGES))})
            wanted = settings_of(o, o.dim or m["dim"], o.quantize or m["quantize"], o.index_type or m["index_type"])
            check_compatible(store, {k: v for k, v in wanted.items() if k in m and k not in unset})
            m.update(moment_seconds=o.moment_seconds, max_pages=o.max_pages)
            return store
        self.options = replace(self.options, moment_seconds=MOMENT_SECONDS if self.options.moment_seconds is None
                               else self.options.moment_seconds, max_pages=self.options.max_pages or MAX_PAGES)
        full_dim = model_hidden_size(self.options.model)
        dim = self.options.dim or full_dim
        settings = settings_of(self.options, dim, self.options.quantize or "none", self.options.index_type or "flat")
        check_structure(dim, settings["quantize"], settings["index_type"], full_dim)
        settings["model_revision"] = model_revision(self.options.model)
        self.store = Store.create(self.index_dir, settings, full_dim)
        self.store.manifest["metadata_version"] = METADATA_VERSION
        return self.store

    def compare(self, store: Store, files: StoredFiles, roots: list[str], owners: Sequence[str] = ()) -> Changes:
        """Walk the roots and compare each file with the index: unchanged files are counted (and a file that
        cannot be read is recorded) here; what needs more work comes back. The walk's 100k `Found`s go when
        this returns, before the model loads (the garbage collector walked them through its imports: 0.5 s).

        A root that no longer exists (a watcher's changed path) takes the stored files at it or below it along;
        with `owners` (the folders a watcher watches, when `roots` are changed paths below them) each file's row
        names the owner it lies below as its root."""
        roots = related_paths(roots)  # a file root (a watcher's change) brings its Live Photo part, RAW, sidecars
        walked = list(walk([r for r in roots if os.path.lexists(r)], include_hidden=self.options.include_hidden,
                           follow_symlinks=self.options.follow_symlinks, exclude=self.options.exclude,
                           beside=is_beside_name))
        if owners:
            walked = [replace(f, root=owner_of(f.path, owners)) for f in walked]
        walked_same = files.same_stat(walked, pa.array([os.fsencode(f.path) for f in walked], pa.binary()))
        unchanged_at = {f.path: bool(same) for f, same in zip(walked, walked_same, strict=True)}
        self.arranged = arrange(walked, partial(self.is_live_photo, files, unchanged_at))
        found, self.arranged.items = self.arranged.items, []  # what lies beside them stays, for the run
        self.summary.total = len(found)
        paths = [os.fsencode(f.path) for f in found]
        seen, found_paths = set(paths), pa.array(paths, pa.binary())
        items = {id(f) for f in found}
        same = walked_same[np.fromiter((id(f) in items for f in walked), bool, len(walked))]
        in_roots = path_filter(roots, roots)  # a file root is its path, a folder root all below it, a gone one either
        unlisted = path_filter((), [f.path for f in found if f.unlisted_folder])  # its files are unknown, not gone
        gone_paths = [path for path in files.missing(found_paths) if in_roots(path) and not unlisted(path)]
        changed = [(f, path) for f, path, unchanged in zip(found, paths, same, strict=True)
                   if f.error or not unchanged]
        stored_beside = files.beside(found_paths)
        refresh = {path for f, path, same_stat, stored in zip(found, paths, same, stored_beside, strict=True)
                   if same_stat and not f.error and path not in files.failing
                   and self.arranged.fields_of(f.path) != stored}
        old = files.rows_of([*gone_paths, *(path for _, path in changed), *(files.failing & seen), *refresh])
        changes = Changes(gone={path: old[path] for path in gone_paths}, seen=seen)
        for f, path, same_stat in zip(found, paths, same, strict=True):
            if path in refresh:
                changes.refresh.append((f, old[path]))
            elif same_stat and not f.error:
                errors = [(place(r), r["error"]) for r in old.get(path, []) if r["status"] == "error"]
                if errors:  # still failing: reported again, not retried
                    self.summary.failed += 1
                    self.summary.failures += [(display_path(f.path), f"{label}: {e}" if label else e)
                                              for label, e in errors]
                else:
                    self.summary.unchanged += 1
                    changes.unchanged.add(path)
                self.advance()
            elif f.error:
                self.record_error(store, f, old.get(path, []), None, f.error)
            else:
                changes.todo.append((f, old.get(path, [])))
        return changes

    def is_live_photo(self, files: StoredFiles, unchanged_at: dict[str, bool], still: Found, video: Found) -> bool:
        """Whether a still and a video with the same stem are one Live Photo; the files are read only when the
        index cannot tell: an unchanged still paired with this video, or an unchanged still and video indexed
        apart, stay as they were."""
        if unchanged_at.get(still.path):
            stored = files.live_videos.get(os.fsencode(still.path))
            if stored == display_path(video.path):
                return True
            if stored is None and unchanged_at.get(video.path):
                return False
        return same_capture(still, video)

    def update(self, store: Store, roots: list[str], owners: Sequence[str] = ()) -> None:
        files = StoredFiles(store.live_table())
        changes = self.compare(store, files, roots, owners)
        todo, gone, unchanged, seen = changes.todo, changes.gone, changes.unchanged, changes.seen
        gone_by_hash = {rows[0]["content_hash"]: rows for rows in gone.values() if reusable(rows)}
        gone_at_start = frozenset(gone)
        sample = self.plan_work([found for found, _ in todo]) if todo and (self.say or self.dry_run) else []
        if self.dry_run:  # what would be embedded or dropped; moves show as added + removed
            self.summary.added = sum(not rows for _, rows in todo)
            self.summary.updated = len(todo) - self.summary.added + len(changes.refresh)
            self.summary.removed = len(gone)
            if sample:
                self.embed_sample(sample)
            return
        self.refresh_beside(store, changes.refresh)

        jobs: dict[int, tuple[FileJob, Unit]] = {}
        # The Embedder pulls `needs_model` in its own thread, so what it finds for the store
        # waits here, to be done in this thread (the store has one writer).
        deferred: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

        def needs_model() -> Iterator[dict]:
            """The units of sniffed files that no stored vectors serve, as Embedder items (the rest: `deferred`)."""
            sniffed = prefetch(lambda i, job: (self.with_beside(sniff(job[0], self.options, self.decoders)), job[1]),
                               todo, workers=self.options.workers or min(8, os.cpu_count() or 1), ahead=64)
            live_by_hash: dict[str, bytes] | None = None  # made at the first file that needs it
            for s, rows in sniffed:
                if s.error:
                    deferred.put(partial(self.record_error, store, s.found, rows, s.kind, s.error))
                    continue
                source = gone_by_hash.pop(s.content_hash, None)
                if source is None:
                    live_by_hash = files.by_hash(gone_at_start) if live_by_hash is None else live_by_hash
                    if (path := live_by_hash.get(s.content_hash)) is not None:  # a copy of a file the index has
                        source = files.rows_of([path])[path]
                if source:
                    deferred.put(partial(self.reuse, store, s, rows, source, gone))
                else:
                    job = FileJob(s, rows, left=len(s.units))
                    for unit in s.units:
                        jobs[self.model_runs] = (job, unit)
                        self.model_runs += 1
                        yield unit.item

        def run_deferred() -> None:
            while not deferred.empty():
                deferred.get()()

        if todo:
            embedder = self.get_embedder()
            self.estimate.meter.start()
            for result in embedder.embed_iter(needs_model(), batch_size=self.options.batch_size):
                run_deferred()
                job, unit = jobs.pop(result.index)
                self.estimate.recorded(unit_kind(unit.fields), self.device_type(), result)
                if result.error is not None:
                    reason = getattr(result.error, "reason", str(result.error))
                    row = self.row(job.sniffed.found, **job.sniffed.metadata, **unit.fields, status="error",
                                   error=reason, content_hash=job.sniffed.content_hash)
                    job.rows.append((row, None))
                else:
                    row = self.row(job.sniffed.found, **{**job.sniffed.metadata, **result.facts, **unit.fields},
                                   status="ok", content_hash=job.sniffed.content_hash,
                                   words=unit_words(job.sniffed.words, unit.fields, job.sniffed.metadata))
                    job.rows.append((row, result.vector))
                job.left -= 1
                if job.left == 0:
                    self.finish(store, job)
            run_deferred()
        gone_ids = [r["id"] for rows in gone.values() for r in rows]
        self.summary.removed += sum(any(store.is_live(r["id"]) for r in rows) for rows in gone.values())
        store.remove(gone_ids)
        if store.manifest.get("metadata_version") != METADATA_VERSION:  # unchanged files, and files elsewhere
            self.add_metadata(store, [row for row in store.rows.values() if row["status"] == "ok" and (
                row["path_bytes"] in unchanged or row["path_bytes"] not in seen)])
        self.add_words(store)

    def read_if_unchanged(self, unit_rows: list[dict], read: Callable[..., Any], *args: Any) -> Any:
        """`read(path, kind, *args)` of the file of `unit_rows` (in a decoder process for its kind), or None when
        it changed since it was indexed (the run that embeds it again reads it) or cannot be read."""
        path, row = os.fsdecode(unit_rows[0]["path_bytes"]), unit_rows[0]
        try:
            stat = os.stat(path)
        except OSError:
            return None
        if (stat.st_size, stat.st_mtime_ns) != (row["size"], row["mtime_ns"]):
            return None
        try:
            return self.decoders.run(decoding_kind(path, row["kind"]), read, path, row["kind"], *args)
        except WorkerCrashed:
            return None

    def add_words(self, store: Store) -> None:
        """Give each segment written before words were indexed its words database: every unchanged file's words
        are read again (no model), a changed or gone file's rows get only their names (the run that embeds it
        again reads its words; its old rows go)."""
        workers = self.options.workers or min(8, os.cpu_count() or 1)
        for segment in [s for s in store.manifest["segments"] if not s.get("words")]:
            rows = [r for r in store.segment_rows(segment["name"]) if r["status"] == "ok"]
            by_file = list(rows_by_file(rows).values())
            texts: dict[int, str] = {}

            def words_of(i: int, unit_rows: list[dict]) -> tuple[list[dict], dict | None]:
                pages = max((r["page"] or 0) for r in unit_rows)
                return unit_rows, self.read_if_unchanged(unit_rows, read_words, pages)

            for unit_rows, words in prefetch(words_of, by_file, workers=workers, ahead=64):
                for row in unit_rows:
                    if words and (text := unit_words(words, row, row)):
                        texts[row["id"]] = text
            store.add_words(segment["name"], texts)

    def plan_work(self, files: list[Found]) -> list[tuple[str, Unit]]:
        """Count the work of these files by kind into the estimate and tell it; the first `sample` units of
        each kind come back (a dry run's sample). Videos and PDFs are looked at in the decoders' processes."""
        def look(i: int, found: Found) -> tuple[list[Unit], float]:
            kind = suffix_kind(found.path)
            try:
                return self.decoders.run(kind or "unknown", plan_file, found.path, self.options)
            except WorkerCrashed:
                return [], 0.0

        sample: list[tuple[str, Unit]] = []
        taken: dict[str, int] = {}
        for units, video_seconds in prefetch(look, files, workers=self.options.workers or min(8, os.cpu_count() or 1),
                                             ahead=64):
            kinds = [unit_kind(unit.fields) for unit in units]
            self.estimate.meter.plan(kinds, video_seconds)
            for kind, unit in zip(kinds, units, strict=True):
                if taken.get(kind, 0) < self.sample:
                    taken[kind] = taken.get(kind, 0) + 1
                    sample.append((kind, unit))
        self.estimate.planned()
        return sample

    def embed_sample(self, sample: list[tuple[str, Unit]]) -> None:
        """Embed a dry run's sample to measure each kind's rate; the vectors are dropped."""
        embedder = self.get_embedder()
        self.estimate.meter.start()
        for result in embedder.embed_iter([unit.item for _, unit in sample], batch_size=self.options.batch_size):
            self.estimate.recorded(sample[result.index][0], self.device_type(), result)
            if result.error is not None:
                self.summary.warnings.append(("sample", f"not measured: {result.error}"))

    def device_type(self) -> str | None:
        """'cpu', 'cuda' or 'mps' where the model runs here; None on Ray or before it loads."""
        return getattr(getattr(self.embedder, "device", None), "type", None)

    def add_metadata(self, store: Store, rows: list[dict]) -> None:
        """Give an index written before the metadata columns existed those columns: each unchanged file's
        metadata is read again, its vectors kept (no model). A file changed since it was indexed is left to
        the run that embeds it again."""
        workers = self.options.workers or min(8, os.cpu_count() or 1)
        by_file = list(rows_by_file(rows).values())
        done = 0
        for unit_rows, read in prefetch(lambda i, unit_rows: (unit_rows, self.read_again(unit_rows)), by_file,
                                        workers=workers, ahead=64):
            if read is None:
                continue
            metadata, words, _ = read  # a sidecar's warning is the next run's to give
            self.rewrite(store, unit_rows, metadata, words)
            done += 1
            if done % self.options.commit_every == 0:  # committed as it goes: the vectors are not all held at once
                store.commit()
        store.manifest["metadata_version"] = METADATA_VERSION
        store.dirty = True

    def refresh_beside(self, store: Store, refresh: list[tuple[Found, list[dict[str, Any]]]]) -> None:
        """Unchanged files whose sidecars or companions changed: their metadata again, their vectors kept."""
        workers = self.options.workers or min(8, os.cpu_count() or 1)
        for (f, rows), read in prefetch(lambda i, job: (job, self.read_again(job[1])), refresh, workers=workers,
                                        ahead=64):
            if read is not None:  # else it changed meanwhile: the next run embeds it again
                metadata, words, warnings = read
                self.rewrite(store, rows, metadata, words)
                self.summary.updated += 1
                self.summary.warnings += [(display_path(f.path), w) for w in warnings]
            self.advance()

    def read_again(self, unit_rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict, list[str]] | None:
        """An unchanged file's metadata (with what lies beside it), words by place and sidecar warnings, read
        again without the model; None when it changed since it was indexed or cannot be read."""
        pages = max((r["page"] or 0) for r in unit_rows)
        own = self.read_if_unchanged(unit_rows, metadata_and_words, pages)
        if own is None:
            return None
        words = own.pop("words")
        metadata, warnings = self.beside_metadata(os.fsdecode(unit_rows[0]["path_bytes"]), own)
        return metadata, words, warnings

    @staticmethod
    def rewrite(store: Store, unit_rows: list[dict[str, Any]], metadata: dict[str, Any],
                words: dict[int | None, str]) -> None:
        """A file's rows again under new ids, with fresh metadata and words and the same vectors (rows are never
        changed)."""
        vectors = [store.vector(row["id"]) for row in unit_rows]
        store.remove([row["id"] for row in unit_rows])
        for row, vector in zip(unit_rows, vectors, strict=True):
            store.put({**row, **metadata, "id": store.new_id(), "words": unit_words(words, row, metadata)}, vector)

    def beside_metadata(self, path: str, own: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """`own` (the file's metadata) filled in from the sidecars beside `path`, with its companions' names."""
        beside = self.arranged.of(path)
        found, warnings = read_sidecars(s.path for s in beside.sidecars)
        return {**dict.fromkeys(SIDECAR_FIELDS), **fill(own, found), **beside.fields()}, warnings

    def with_beside(self, s: Sniffed) -> Sniffed:
        """A sniffed file's metadata with what lies beside it (see `beside_metadata`)."""
        if s.error is None:
            s.metadata, warnings = self.beside_metadata(s.found.path, s.metadata)
            s.warning = "; ".join(w for w in (s.warning, *warnings) if w) or None
        return s

    def get_embedder(self):
        o = self.options
        if self.embedder is None and o.ray:
            from .media import VisionOptions
            from .ray_engine import RayEmbedder

            self.embedder = RayEmbedder(o.model, address=o.ray_address, workers=o.ray_workers, device=o.device,
                                        options=VisionOptions(o.min_pixels, o.max_pixels, o.total_pixels, o.fps,
                                                              o.max_frames), verbose=o.verbose,
                                        compile=o.compile)
        elif self.embedder is None:
            # What is alive now outlives the load: the collector need not walk it again at each of the many
            # collections that importing torch and transformers sets off (0.3 s over a 100k-file walk's data).
            gc.freeze()
            try:
                from .embedder import Embedder

                self.embedder = Embedder(o.model, device=o.device, min_pixels=o.min_pixels, max_pixels=o.max_pixels,
                                         total_pixels=o.total_pixels, fps=o.fps, max_frames=o.max_frames,
                                         workers=o.workers, processes=o.processes, compile=o.compile,
                                         decoders=self.decoders)
            finally:
                gc.unfreeze()
        return self.embedder

    def row(self, f: Found, **values: Any) -> dict[str, Any]:
        """A new row for a unit of file `f` (stored under a new id: rows are never changed)."""
        return {"id": self.store.new_id(), "path": display_path(f.path), "path_bytes": os.fsencode(f.path),
                "root": display_path(f.root), "size": f.size, "mtime_ns": f.mtime_ns, "content_hash": None,
                "width": None, "height": None, "duration_s": None, "frames": None, "tokens": None, "error": None,
                "indexed_at": now(), "page": None, "start_s": None, "end_s": None, **dict.fromkeys(FIELDS),
                **dict.fromkeys(SIDECAR_FIELDS), **dict.fromkeys(BESIDE_FIELDS), **values}

    def record_error(self, store: Store, f: Found, old: list[dict], kind: str | None, error: str) -> None:
        """The whole file failed: its old rows go, one error row stands for it."""
        store.remove([r["id"] for r in old])
        store.put(self.row(f, kind=kind or suffix_kind(f.path) or "unknown", status="error", error=error))
        self.summary.failed += 1
        self.summary.failures.append((display_path(f.path), error))
        self.advance()

    def finish(self, store: Store, job: FileJob) -> None:
        """All units of a file are back from the model: its rows replace the old ones, in one commit."""
        store.remove([r["id"] for r in job.old])
        for row, vector in sorted(job.rows, key=lambda rv: rv[0]["id"]):
            store.put(row, vector)
        path = display_path(job.sniffed.found.path)
        errors = [(place(row), row["error"]) for row, _ in job.rows if row["status"] == "error"]
        if errors:
            self.summary.failed += 1
            self.summary.failures += [(path, f"{label}: {e}" if label else e) for label, e in errors]
        if len(errors) < len(job.rows):
            if job.old:
                self.summary.updated += 1
            else:
                self.summary.added += 1
        if job.sniffed.warning:
            self.summary.warnings.append((path, job.sniffed.warning))
        self.advance()

    def reuse(self, store: Store, s: Sniffed, old: list[dict], source: list[dict],
              gone: dict[bytes, list[dict]]) -> None:
        """A moved, copied or merely touched file: its rows and stored vectors again, no model."""
        moved = gone.pop(source[0]["path_bytes"], None) is not None  # the old path's rows go, vectors move along
        rows = [(self.row(s.found, **{k: v for k, v in row.items() if k in REUSED}, **s.metadata,
                          words=unit_words(s.words, row, s.metadata)),
                 store.vector(row["id"]) if row["status"] == "ok" else None) for row in source]
        store.remove([r["id"] for r in old] + ([r["id"] for r in source] if moved else []))
        for row, vector in rows:  # ids are never reused: these are the vectors of this content
            store.put(row, vector)
        if s.warning:
            self.summary.warnings.append((display_path(s.found.path), s.warning))
        if moved:
            self.summary.moved += 1
        elif not old:
            self.summary.added += 1
        elif old[0]["content_hash"] == source[0]["content_hash"]:
            self.summary.unchanged += 1  # touched, same content
        else:
            self.summary.updated += 1
        self.advance()

    def advance(self) -> None:
        """One more file dealt with: progress, and a commit when enough changed files are pending."""
        self.done += 1
        if self.dry_run or not self.store.dirty:  # nothing pending: unchanged files start no commit
            self.last_commit = time.monotonic()
        else:
            self.since_commit += 1
            if (self.since_commit >= self.options.commit_every
                    or time.monotonic() - self.last_commit >= self.options.commit_seconds):
                self.store.commit()
                self.last_commit, self.since_commit = time.monotonic(), 0
        self.progress(self.done, self.summary.total, self.summary.failed)
