"""The files of an index folder: their exact names, atomic writes, the manifest, and the outside view.

The clean-up deletes only files in segments/ whose names match `STORE_FILE` exactly, and files that
a commit let go (listed in the manifest as superseded); no other file and no folder is ever deleted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import re
import shutil
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..errors import QvlsearchError

SCHEMA_VERSION = 2
SEGMENTS, ITEMS_VIEW, DELETED_VIEW = "segments", "items", "deleted"
# Files in segments/: a segment's rows, vectors, FAISS index and words; a generation's tombstones; a trained index.
STORE_FILE = re.compile(r"seg-\d{6}\.(parquet|npy|faiss|words)|del-\d{6}\.parquet|trained-\d{6}\.faiss")
OWN_TOP_LEVEL = {"manifest.json", "lock", "lock.pid", "server.json", "watch.json", SEGMENTS, ITEMS_VIEW, DELETED_VIEW}

ITEM_SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("path", pa.string()),
    ("path_bytes", pa.binary()),
    ("root", pa.string()),
    ("kind", pa.string()),
    ("size", pa.int64()),
    ("mtime_ns", pa.int64()),
    ("content_hash", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("duration_s", pa.float64()),
    ("frames", pa.int32()),
    ("tokens", pa.int32()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("indexed_at", pa.timestamp("us", tz="UTC")),
    ("page", pa.int32()),  # a PDF page's number (from 1); null for other rows
    ("start_s", pa.float64()),  # a video moment's window, in seconds; null for whole files
    ("end_s", pa.float64()),
    ("taken_at", pa.timestamp("us", tz="UTC")),  # EXIF or container date taken; None when unknown
    ("lat", pa.float64()),
    ("lon", pa.float64()),
    ("camera", pa.string()),
    # what lies beside the file (companions.py, sidecars.py); an index written before reads them as nulls, and
    # the next run fills them in for the files it walks, from the sidecars and companions it finds
    ("live_video", pa.string()),  # a Live Photo still's motion part (its path); the video is no item of its own
    ("raw_file", pa.string()),  # the RAW beside the JPEG of a RAW+JPEG pair (its path)
    ("description", pa.string()),  # from a sidecar (Takeout JSON, XMP dc:description)
    ("keywords", pa.list_(pa.string())),  # from an XMP sidecar's dc:subject
    ("sidecar_stamp", pa.string()),  # the sidecars' names, sizes and mtimes: a change updates the metadata
])
DELETED_SCHEMA = pa.schema([("id", pa.int64())])
SETTINGS_KEYS = ("model", "model_revision", "dim", "quantize", "index_type", "instruction",
                 "min_pixels", "max_pixels", "total_pixels", "fps", "max_frames", "moment_seconds", "max_pages")


class StoreError(QvlsearchError):
    """The index directory is missing, damaged, locked, full or built with other settings."""


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def write_atomically(path: Path, write: Callable[[Path], Any], rows: Callable[[Path], int] | None = None,
                     expected: int = 0) -> None:
    """`write(tmp_path)`, fsync, then rename over `path`: a reader sees the old file or the new one.

    With `rows`, the file must read back first, `rows(tmp_path) == expected` (a write can fail silently: FAISS
    ignores an error on closing its file, on a full disk); else OSError, and it is not renamed into place.
    """
    tmp = tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if rows is not None:
            check_written(tmp, rows, expected)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_written(path: Path, rows: Callable[[Path], int], expected: int) -> None:
    try:
        complete = path.stat().st_size > 0 and rows(path) == expected
    except (OSError, ValueError, RuntimeError):  # Arrow's, NumPy's and FAISS's errors for a cut file
        complete = False
    if not complete:
        raise OSError(errno.EIO, "the file written does not read back (is the disk full?)", str(path))


def link_or_copy(source: Path, target: Path) -> None:
    """Make `target` a hard link to `source`, or a copy where the filesystem has no hard links (exFAT, SMB)."""
    tmp = tmp_name(target)
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        try:
            shutil.copyfile(source, tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a copy cut short by a full disk takes no space
            raise
    os.replace(tmp, target)


def read_manifest(path: Path) -> dict[str, Any]:
    """The committed generation's manifest (schema 1 or 2); raises StoreError when there is none or it is damaged."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise StoreError(f"no index at {path}; create one with `qvlsearch index PATH --index {path}`") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"cannot read {path / 'manifest.json'}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") not in (1, SCHEMA_VERSION):
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise StoreError(f"index {path} has schema version {version}, this qvlsearch reads 1 and "
                         f"{SCHEMA_VERSION}; delete that folder and index the files again")
    return manifest


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """The one atomic step of a commit; gives `manifest` a new `manifest_id` (unique, also across a rebuilt index)."""
    manifest["manifest_id"] = uuid.uuid4().hex
    text = json.dumps(manifest, indent=2, default=str) + "\n"
    write_atomically(path / "manifest.json", lambda tmp: tmp.write_text(text))


def commit_key(manifest: dict[str, Any]) -> tuple[Any, Any]:
    """What tells one commit from another: its generation and manifest id (a rebuilt index counts from 1 again)."""
    return manifest.get("generation"), manifest.get("manifest_id")


def folder_bytes(path: Path, skip: tuple[str, ...] = (ITEMS_VIEW, DELETED_VIEW)) -> int:
    """The bytes of the files below `path` (not in the `skip` folders, which hold links); a file that a writer
    deletes meanwhile counts as gone."""
    total = 0
    for folder, dirs, files in os.walk(path):
        if Path(folder) == path:
            dirs[:] = [d for d in dirs if d not in skip]
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def check_index_folder(path: Path) -> None:
    """Refuse an index path that is a file, or a folder that holds anything but an index (it may be the
    user's photos): a new index goes into a new or empty folder."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"--index {path} is a file, not a folder; pass a new or empty folder")
    if not path.is_dir() or (path / "manifest.json").exists():
        return
    foreign = sorted(entry.name for entry in path.iterdir() if entry.name not in OWN_TOP_LEVEL)
    if foreign:
        raise StoreError(f"--index {path} is not an index and not empty (it holds {foreign[0]!r}"
                         f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); pass a new or empty folder")


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C (SIGINT) that comes during the block takes effect when the block ends, so that a commit's
    manifest, the writer's state and the view outside tools read switch together. Only the main thread can
    hold a signal, and only a handler Python set can be put back: elsewhere this holds nothing."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    came: list[Any] = []
    signal.signal(signal.SIGINT, lambda signum, frame: came.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if came and callable(previous):  # Python's own raises KeyboardInterrupt; a watcher's starts stopping
            previous(signal.SIGINT, came[0])
        elif came and previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)


def sync_view(path: Path, live: set[str], folder: str) -> None:
    """Make `path/folder` hold links to exactly the `live` files of segments/ (the view outside tools read)."""
    view = path / folder
    view.mkdir(exist_ok=True)
    remove_store_files(view, live)
    for name in live:
        if not (view / name).exists():
            link_or_copy(path / SEGMENTS / name, view / name)


def remove_store_files(folder: Path, keep: set[str], pattern: re.Pattern = STORE_FILE) -> None:
    """Delete the files in `folder` whose names the store writes, except `keep`; never a folder, never another file."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        name = entry.name
        is_tmp = name.startswith(".") and name.endswith(".tmp") and pattern.fullmatch(name[1:-4])
        if (pattern.fullmatch(name) or is_tmp) and name not in keep and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
