"""The index directory: manifest, item table (Parquet), vectors (float16) and the FAISS index.

Layout of an index directory:

    manifest.json            settings, counts and the files of the current generation (written last)
    items.parquet            one row per file (a hard link to the current generation's table)
    items-<gen>.parquet      the item table of generation <gen>
    index-<gen>.faiss        FAISS index over the `ok` items (ids = item ids)
    vectors-<gen>.npz        full-dimension float16 vectors added in generation <gen>
    lock                     held by the one writer

Every commit writes new files, then replaces manifest.json by rename: a reader (or a run
killed at any moment) sees either the old generation or the new one, never a mix.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import QvlsearchError

SCHEMA_VERSION = 1
INDEX_TYPES = ("flat", "hnsw", "ivf")
QUANTIZATIONS = ("none", "int8", "binary")

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
])
# Every name the store writes in an index folder, and the only names its clean-up may delete:
# a generation's files, their temporary names (".<name>.tmp"), and the items.parquet link being made.
GENERATION_FILE = r"(?:items-\d{6,}\.parquet|index-\d{6,}\.faiss|vectors-\d{6,}\.npz)"
LEFTOVER_NAME = re.compile(rf"{GENERATION_FILE}|\.(?:{GENERATION_FILE}|manifest\.json)\.tmp|\.items\.parquet\.link")
STORE_NAMES = {"manifest.json", "items.parquet", "lock", "lock.pid"}
SETTINGS_KEYS = ("model", "model_revision", "dim", "quantize", "index_type", "instruction",
                 "min_pixels", "max_pixels", "total_pixels", "fps", "max_frames")


class StoreError(QvlsearchError):
    """The index directory is missing, damaged, locked or built with other settings."""


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def write_atomically(path: Path, write: Any) -> None:
    """`write(tmp_path)`, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def faiss_factory(index_type: str, quantize: str, count: int) -> str:
    """The FAISS index-factory string for an index type and a quantization."""
    if index_type not in INDEX_TYPES:
        return index_type  # a FAISS factory string given as is
    codec = "SQ8" if quantize == "int8" else "Flat"
    if index_type == "hnsw":
        return "HNSW32" if codec == "Flat" else "HNSW32,SQ8"
    if index_type == "ivf":
        return f"IVF{max(1, min(65536, int(count ** 0.5)))},{codec}"
    return codec


def build_faiss(vectors: np.ndarray, dim: int, quantize: str, index_type: str) -> Any:
    """A FAISS index over `vectors` cut to `dim` (Matryoshka) and renormalized; inner product.

    FAISS row i is `vectors` row i: the index holds no ids (8 bytes a vector, and IDMap2's
    reverse map in memory); the searcher maps rows to ids, which are the ok rows in id order.
    """
    import faiss

    x = np.array(vectors[:, :dim], dtype=np.float32)  # a copy: the caller's array stays as it was
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if quantize == "binary":
        from .quantize import binary_encode

        index = faiss.IndexBinaryFlat(dim)
        if len(x):
            index.add(binary_encode(x))
        return index
    factory = faiss_factory(index_type, quantize, len(x))
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if len(x):
            if not index.is_trained:
                index.train(x)
            index.add(x)
    except RuntimeError as exc:
        raise StoreError(f"FAISS cannot build index type {factory!r} over {len(x)} vectors of dim {dim}: "
                         f"{faiss_reason(exc)}; choose another --index-type with `qvlsearch reindex`") from None
    return index


def faiss_reason(exc: RuntimeError) -> str:
    """The message of a FAISS exception without its C++ file and line."""
    text = " ".join(str(exc).split())
    found = re.search(r"\.(?:cpp|h):\d+: (?:Error: )?(.*)", text)
    return found.group(1) if found else text


def check_index_type(index_type: str, quantize: str, dim: int) -> None:
    """Raise StoreError unless FAISS can make `index_type` (a name or a factory string) at `dim`."""
    import faiss

    if quantize == "binary":
        return  # a binary index is always BinaryFlat
    try:
        faiss.index_factory(dim, faiss_factory(index_type, quantize, 1), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise StoreError(f"--index-type must be flat, hnsw, ivf or a FAISS factory string that works at dim {dim}, "
                         f"got {index_type!r} ({faiss_reason(exc)})") from None


def is_store_file(name: str) -> bool:
    """Whether an index folder's entry `name` is one the store writes (no other name is ever deleted)."""
    return name in STORE_NAMES or LEFTOVER_NAME.fullmatch(name) is not None


def check_index_folder(path: Path) -> None:
    """Refuse a folder that holds anything but an index: a new index goes into a new or empty folder."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"--index {path} is a file, not a folder; pass a new or empty folder")
    if path.is_dir() and not (path / "manifest.json").exists():
        foreign = sorted(entry.name for entry in path.iterdir() if not is_store_file(entry.name))
        if foreign:
            raise StoreError(f"--index {path} is not an index and not empty (it holds {foreign[0]!r}"
                             f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); "
                             "pass a new or empty folder")


def read_faiss(path: Path, quantize: str) -> Any:
    import faiss

    return faiss.read_index_binary(str(path)) if quantize == "binary" else faiss.read_index(str(path))


@dataclass
class Store:
    """An index directory held in memory by its one writer (or read by a searcher)."""

    path: Path
    manifest: dict[str, Any]
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    vectors: dict[int, np.ndarray] = field(default_factory=dict)  # float16, full dimension, ok rows only
    new_vectors: dict[int, np.ndarray] = field(default_factory=dict)  # added since the last commit
    dirty: bool = False  # changed since the last commit

    @classmethod
    def create(cls, path: Path, settings: dict[str, Any], full_dim: int) -> Store:
        created = now().isoformat()
        manifest = {"schema_version": SCHEMA_VERSION, **settings, "full_dim": full_dim, "generation": 0,
                    "next_id": 1, "files": {}, "counts": {}, "created": created, "updated": created}
        return cls(Path(path), manifest)

    @classmethod
    def open(cls, path: Path, *, with_vectors: bool = True) -> Store:
        """Load the committed generation; raises StoreError when there is none or it is damaged."""
        path = Path(path)
        manifest = read_manifest(path)
        store = cls(path, manifest)
        files = manifest.get("files", {})
        if files.get("items"):
            table = read_items(path / files["items"])
            store.rows = {row["id"]: row for row in table.to_pylist()}
        if with_vectors:
            for name in files.get("vectors", []):
                with np.load(path / name) as segment:
                    for item_id, vector in zip(segment["ids"].tolist(), segment["vectors"], strict=True):
                        if store.rows.get(item_id, {}).get("status") == "ok":
                            store.vectors[item_id] = vector
        return store

    @property
    def settings(self) -> dict[str, Any]:
        return {k: self.manifest.get(k) for k in SETTINGS_KEYS}

    def new_id(self) -> int:
        item_id = self.manifest["next_id"]
        self.manifest["next_id"] += 1
        return item_id

    def put(self, row: dict[str, Any], vector: np.ndarray | None = None) -> None:
        """Add or replace a row; an `ok` row comes with its full-dimension vector."""
        self.rows[row["id"]] = row
        self.dirty = True
        if vector is not None:
            self.vectors[row["id"]] = self.new_vectors[row["id"]] = np.asarray(vector, dtype=np.float16)

    def remove(self, ids: Iterable[int]) -> None:
        for item_id in ids:
            self.dirty = True
            self.rows.pop(item_id, None)
            self.vectors.pop(item_id, None)
            self.new_vectors.pop(item_id, None)

    def counts(self) -> dict[str, Any]:
        by_kind: dict[str, int] = {}
        by_status: dict[str, int] = {"ok": 0, "error": 0}
        for row in self.rows.values():
            by_kind[row["kind"]] = by_kind.get(row["kind"], 0) + 1
            by_status[row["status"]] = by_status.get(row["status"], 0) + 1
        return {"items": len(self.rows), **by_status, "by_kind": by_kind}

    def commit(self) -> None:
        """Write a new generation and switch the manifest to it (the one atomic step); no-op when nothing changed."""
        if not self.dirty and self.manifest["generation"] > 0:
            return
        gen = self.manifest["generation"] + 1
        files = {"items": f"items-{gen:06d}.parquet", "faiss": f"index-{gen:06d}.faiss",
                 "vectors": list(self.manifest.get("files", {}).get("vectors", []))}
        self.path.mkdir(parents=True, exist_ok=True)
        stored = self.manifest.get("stored_vectors", 0) + len(self.new_vectors)
        if stored > 2 * len(self.vectors) + 1024:  # mostly vectors of deleted files: compact into one segment
            self.new_vectors = dict(self.vectors)
            files["vectors"], stored = [], len(self.vectors)
        if self.new_vectors:
            name = f"vectors-{gen:06d}.npz"
            ids = np.fromiter(self.new_vectors, dtype=np.int64, count=len(self.new_vectors))
            stacked = np.stack(list(self.new_vectors.values()))
            write_atomically(self.path / name, lambda tmp: save_npz(tmp, ids=ids, vectors=stacked))
            files["vectors"].append(name)
        rows = sorted(self.rows.values(), key=lambda r: r["id"])
        table = pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)
        write_atomically(self.path / files["items"], lambda tmp: pq.write_table(table, tmp))
        ok_ids = np.array([r["id"] for r in rows if r["status"] == "ok"], dtype=np.int64)
        matrix = (np.stack([self.vectors[i] for i in ok_ids.tolist()]) if len(ok_ids)
                  else np.zeros((0, self.manifest["full_dim"]), dtype=np.float16))
        index = build_faiss(matrix, self.manifest["dim"], self.manifest["quantize"], self.manifest["index_type"])
        write_atomically(self.path / files["faiss"], lambda tmp: write_faiss(index, tmp, self.manifest["quantize"]))
        old_files = self.manifest.get("files", {})
        factory = ("BinaryFlat" if self.manifest["quantize"] == "binary"
                   else faiss_factory(self.manifest["index_type"], self.manifest["quantize"], len(ok_ids)))
        self.manifest.update(generation=gen, files=files, counts=self.counts(), faiss_factory=factory,
                             stored_vectors=stored, updated=now().isoformat())
        write_atomically(self.path / "manifest.json",
                         lambda tmp: tmp.write_text(json.dumps(self.manifest, indent=2, default=str) + "\n"))
        self.new_vectors.clear()
        self.dirty = False
        self.link_items_table()
        for name in {old_files.get("items"), old_files.get("faiss"), *old_files.get("vectors", [])} - {
                files["items"], files["faiss"], *files["vectors"], None}:
            (self.path / name).unlink(missing_ok=True)

    def link_items_table(self) -> None:
        """Point items.parquet at the current table (for pandas, DuckDB, Polars users)."""
        tmp = self.path / ".items.parquet.link"
        tmp.unlink(missing_ok=True)
        try:
            os.link(self.path / self.manifest["files"]["items"], tmp)
        except OSError:  # a file system without hard links (exFAT, SMB): a copy does
            shutil.copyfile(self.path / self.manifest["files"]["items"], tmp)
        os.replace(tmp, self.path / "items.parquet")

    def remove_uncommitted_files(self) -> None:
        """Delete what a killed writer left behind: files of the store's own names that no generation refers to.

        Only regular files whose whole name is one the store writes (`is_store_file`) are deleted; any
        other file, and every folder and link, stays.
        """
        files = self.manifest.get("files", {})
        keep = {files.get("items"), files.get("faiss"), *files.get("vectors", [])}
        for entry in os.scandir(self.path):
            if (entry.name not in keep and LEFTOVER_NAME.fullmatch(entry.name)
                    and entry.is_file(follow_symlinks=False)):
                os.unlink(entry.path)
        if files.get("items"):
            self.link_items_table()

    def faiss_index(self) -> Any:
        return read_faiss(self.path / self.manifest["files"]["faiss"], self.manifest["quantize"])


def read_items(path: Path, columns: list[str] | None = None) -> pa.Table:
    """An item table; a damaged or missing one is a one-line StoreError."""
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise StoreError(f"cannot read the item table {path} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                         "delete the index folder and index the files again") from None


def read_manifest(path: Path) -> dict[str, Any]:
    """The committed generation's manifest; raises StoreError when there is none or it is damaged."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise StoreError(f"no index at {path}; create one with `qvlsearch index PATH --index {path}`") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"cannot read {path / 'manifest.json'}: {exc}") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"index {path} has schema version {manifest.get('schema_version')}, this qvlsearch "
                         f"reads {SCHEMA_VERSION}; delete that folder and index the files again")
    return manifest


class StoredVectors:
    """An index's full-dimension float16 vectors, memory-mapped from its segments, to read a few by id."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        ids = []
        self.segments: list[np.ndarray] = []
        for name in manifest.get("files", {}).get("vectors", []):
            try:
                with np.load(path / name) as segment:
                    ids.append(segment["ids"])
                self.segments.append(npz_memmap(path / name, "vectors"))
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
                raise StoreError(f"cannot read {path / name} ({type(exc).__name__}: {exc}); "
                                 "delete the index folder and index the files again") from None
        stacked = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        # An id stored twice (a changed file) is current in its last segment: keep its last row.
        self.ids, first_from_end = np.unique(stacked[::-1], return_index=True)
        self.rows = len(stacked) - 1 - first_from_end
        self.starts = np.cumsum([0] + [len(s) for s in self.segments])

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Vectors of `ids`, one row each, as float32."""
        positions = np.minimum(np.searchsorted(self.ids, ids), max(len(self.ids) - 1, 0))
        if len(ids) and not (len(self.ids) and np.array_equal(self.ids[positions], ids)):
            raise StoreError(f"the index at {self.path} lacks stored vectors for some of its items; "
                             "delete that folder and index the files again")
        rows = self.rows[positions]
        segment = np.searchsorted(self.starts, rows, side="right") - 1
        local = rows - self.starts[segment]
        dim = self.segments[0].shape[1] if self.segments else 0
        return np.array([self.segments[s][r] for s, r in zip(segment, local, strict=True)],
                        dtype=np.float32).reshape(len(ids), dim)


def npz_memmap(path: Path, member: str) -> np.ndarray:
    """A read-only memory map of one array of an uncompressed .npz (as `np.savez` writes them)."""
    import struct

    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise StoreError(f"cannot map {path}: it is compressed (qvlsearch writes it uncompressed); "
                         "index the files again into a new index")
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)  # the local file header: name and extra-field lengths, then the data
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset, order="F" if fortran_order else "C")


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def write_faiss(index: Any, path: Path, quantize: str) -> None:
    import faiss

    (faiss.write_index_binary if quantize == "binary" else faiss.write_index)(index, str(path))
