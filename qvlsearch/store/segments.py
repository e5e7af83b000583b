"""Immutable segments: a segment's rows (Parquet), vectors (float16 .npy) and FAISS index, written once.

Row i of a segment's vectors and of its FAISS index is the i-th `ok` row of its Parquet
file, in file order. A segment is never changed after it is written: deletes are
tombstones (ids) beside it, and merging writes a new segment from old ones.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..words import words_rows
from .files import ITEM_SCHEMA, SEGMENTS, StoreError, write_atomically

INDEX_TYPES = ("flat", "hnsw", "ivf", "ivfpq")
QUANTIZATIONS = ("none", "int8", "binary")
# Below this many vectors a segment is searched exactly; at or above it, it gets the index type's
# structure (an HNSW graph, IVF lists). Exact search of 10k×2048 takes about 2 ms; an HNSW graph
# costs about 1.2 ms a vector to build at that width, paid once when a merge reaches this size.
SEAL_ROWS = 10_000
CHUNK_ROWS = 32_768  # vectors converted to float32 at a time while building or merging


def faiss_factory(index_type: str, quantize: str, count: int) -> str:
    """The FAISS index-factory string for a segment of `count` vectors."""
    if quantize == "binary":
        return "BinaryFlat"
    codec = "SQ8" if quantize == "int8" else "Flat"
    if index_type == "flat" or count < SEAL_ROWS:
        return codec
    if index_type == "hnsw":
        return "HNSW32" if codec == "Flat" else "HNSW32,SQ8"
    if index_type == "ivf":
        return f"IVF{max(1, min(65536, int(count ** 0.5)))},{codec}"
    if index_type == "ivfpq":
        return f"IVF{max(1, min(65536, int(count ** 0.5)))},PQ32x8"
    return index_type  # a FAISS factory string given as is


def faiss_reason(exc: RuntimeError) -> str:
    """The message of a FAISS exception without its C++ file and line."""
    text = " ".join(str(exc).split())
    found = re.search(r"\.(?:cpp|h):\d+: (?:Error: )?(.*)", text)
    return found.group(1) if found else text


def check_factory(index_type: str, dim: int) -> None:
    """Raise StoreError now for an index type FAISS cannot build at `dim` (not after the embedding work)."""
    import faiss

    factory = faiss_factory(index_type, "none", SEAL_ROWS)
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise StoreError(f"--index-type must be flat, hnsw, ivf, ivfpq or a FAISS factory string that works at "
                         f"dim {dim}, got {index_type!r} ({faiss_reason(exc)})") from None


def normalized(vectors: np.ndarray, dim: int) -> np.ndarray:
    """`vectors` cut to `dim` (Matryoshka) and renormalized, as a new float32 array."""
    x = np.array(vectors[:, :dim], dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def chunks(vectors: np.ndarray, dim: int) -> Iterator[np.ndarray]:
    for start in range(0, len(vectors), CHUNK_ROWS):
        yield normalized(vectors[start:start + CHUNK_ROWS], dim)


def training_sample(vectors: np.ndarray, dim: int, rows: int = 100_000) -> np.ndarray:
    step = max(1, len(vectors) // rows)
    return normalized(vectors[::step][:rows], dim)


def build_faiss(vectors: np.ndarray, dim: int, quantize: str, factory: str, trained: Any = None) -> Any:
    """A FAISS index (inner product on normalized vectors cut to `dim`) over `vectors`, added in chunks.

    `trained` is an empty trained index to start from (shared IVF lists); else it is trained here.
    """
    import faiss

    if quantize == "binary":
        from ..quantize import binary_encode

        index = faiss.IndexBinaryFlat(dim)
        for x in chunks(vectors, dim):
            index.add(binary_encode(x))
        return index
    index = faiss.clone_index(trained) if trained is not None else faiss.index_factory(
        dim, factory, faiss.METRIC_INNER_PRODUCT)
    if len(vectors) and not index.is_trained:
        index.train(training_sample(vectors, dim))
    for x in chunks(vectors, dim):
        index.add(x)
    return index


def write_faiss(index: Any, path: Path) -> None:
    """Write a FAISS index; its write errors (RuntimeError) become OSError, as any other file's."""
    import faiss

    try:
        (faiss.write_index_binary if isinstance(index, faiss.IndexBinary) else faiss.write_index)(index, str(path))
    except RuntimeError as exc:
        reason = faiss_reason(exc)
        found = re.search(r"write error in .*\(([^()]+)\)$", reason)  # "… 12243 != 128000 (No space left on device)"
        raise OSError(errno.EIO, found.group(1) if found else reason, str(path)) from None


def read_faiss(path: Path, quantize: str) -> Any:
    """A segment's FAISS index; flat codes are memory-mapped, not read into memory."""
    import faiss

    if quantize == "binary":
        return faiss.read_index_binary(str(path))
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)


def faiss_rows(quantize: str) -> Callable[[Path], int]:
    """How many vectors a written FAISS file holds, read back (flat codes are mapped, not read)."""
    return lambda path: read_faiss(path, quantize).ntotal


def parquet_rows(path: Path) -> int:
    return pq.read_metadata(path).num_rows


def npy_rows(path: Path) -> int:
    return len(np.load(path, mmap_mode="r", allow_pickle=False))  # a file shorter than its header says fails


def write_segment(index_dir: Path, name: str, table: pa.Table, vectors: np.ndarray, manifest: dict[str, Any],
                  factory: str, trained: Any = None, vectors_written: bool = False,
                  words: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Write a segment's files, each atomically and read back before it is renamed into place; returns its
    manifest entry.

    `vectors` (float16, full width) are the ok rows' vectors in table order; with `vectors_written` they are
    already the segment's .npy file, memory-mapped (a merge writes them there first). `words(tmp_path)` writes
    its words database (one row per ok row); without it the segment has none (its sources had none).
    """
    folder = index_dir / SEGMENTS
    folder.mkdir(exist_ok=True)
    table = table.cast(ITEM_SCHEMA)
    write_atomically(folder / f"{name}.parquet", lambda tmp: pq.write_table(table, tmp), parquet_rows, table.num_rows)
    if not vectors_written:
        write_atomically(folder / f"{name}.npy", lambda tmp: save_npy(tmp, vectors), npy_rows, len(vectors))
    index = build_faiss(vectors, manifest["dim"], manifest["quantize"], factory, trained)
    write_atomically(folder / f"{name}.faiss", lambda tmp: write_faiss(index, tmp), faiss_rows(manifest["quantize"]),
                     len(vectors))
    if words is not None:
        write_atomically(folder / f"{name}.words", words, words_rows, len(vectors))
    return {"name": name, "rows": table.num_rows, "ok": len(vectors), "deleted": 0, "index": factory,
            "bytes": sum((folder / f"{name}.{ext}").stat().st_size for ext in segment_files(words is not None)),
            "words": words is not None}


def segment_files(words: bool) -> tuple[str, ...]:
    """The extensions of a segment's files."""
    return ("parquet", "npy", "faiss", "words") if words else ("parquet", "npy", "faiss")


def save_npy(path: Path, vectors: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save(path) would add ".npy" to a temporary name
        np.save(f, vectors, allow_pickle=False)


def save_npy_parts(path: Path, shape: tuple[int, int], parts: Iterable[np.ndarray]) -> None:
    """An .npy file of float16 rows, `shape`, written from `parts` (blocks of rows) by ordinary writes: on a full
    disk a write fails with ENOSPC (filling a memory map there kills the process with SIGBUS)."""
    with open(path, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        for part in parts:
            f.write(np.ascontiguousarray(part, dtype=np.float16).data)


def ok_positions(table: pa.Table) -> np.ndarray:
    """Where the ok rows are in a segment's table (row i of its vectors is the i-th of them)."""
    return np.flatnonzero(pc.fill_null(pc.equal(table["status"], "ok"), False).to_numpy(zero_copy_only=False))


def open_items(path: Path) -> pq.ParquetFile:
    """A segment's item table, held open: its rows stay readable after a merge deletes the file."""
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "No such file", str(path)) from None  # Arrow's names no file
    except (pa.ArrowInvalid, OSError) as exc:
        raise damaged_items(path, exc) from None


def read_items(path: Path, columns: list[str] | None = None, file: pq.ParquetFile | None = None) -> pa.Table:
    """A segment's rows (from `file`, `path` held open, if given); an item table written before a column was added
    reads that column as nulls."""
    file = file or open_items(path)
    wanted = columns or ITEM_SCHEMA.names
    try:
        table = file.read(columns=[name for name in wanted if name in file.schema_arrow.names])
    except (pa.ArrowInvalid, OSError) as exc:
        raise damaged_items(path, exc) from None
    for field in ITEM_SCHEMA:
        if field.name in wanted and field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(wanted)


def damaged_items(path: Path, exc: Exception) -> StoreError:
    return StoreError(f"cannot read the item table {path} ({exc}); run `qvlsearch optimize`, then "
                      "`qvlsearch index` to embed those files again")


def read_vectors(path: Path) -> np.ndarray:
    """A segment's vectors, memory-mapped read-only."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read {path} ({exc}); run `qvlsearch optimize`, or delete the index folder and "
                         "index the files again") from None


def read_deleted(path: Path) -> np.ndarray:
    try:
        return pq.read_table(path)["id"].to_numpy()
    except FileNotFoundError:
        raise
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise StoreError(f"cannot read {path} ({exc}); delete the index folder and index the files again") from None
