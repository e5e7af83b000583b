"""Indexes written by schema 1 (one item table, one FAISS index, npz vector files): read as one segment,
and upgraded to segments by the next writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .files import StoreError
from .segments import read_faiss, read_items


def legacy_files(manifest: dict[str, Any]) -> list[str]:
    files = manifest.get("files", {})
    return [name for name in (files.get("items"), files.get("faiss"), *files.get("vectors", []), "items.parquet")
            if name]


def legacy_vectors(path: Path, manifest: dict[str, Any]) -> dict[int, np.ndarray]:
    """Every stored vector by id; an id stored twice (a changed file) is current in its last file."""
    vectors: dict[int, np.ndarray] = {}
    for name in manifest.get("files", {}).get("vectors", []):
        try:
            with np.load(path / name) as segment:
                vectors.update(zip(segment["ids"].tolist(), segment["vectors"], strict=True))
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError) as exc:
            raise StoreError(f"cannot read {path / name} ({type(exc).__name__}: {exc}); "
                             "delete the index folder and index the files again") from None
    return vectors


def legacy_rows_and_vectors(path: Path, manifest: dict[str, Any]) -> tuple[list[dict], dict[int, np.ndarray]]:
    files = manifest.get("files", {})
    rows = read_items(path / files["items"]).to_pylist() if files.get("items") else []
    vectors = legacy_vectors(path, manifest)
    ok = {row["id"] for row in rows if row["status"] == "ok"}
    missing = ok - set(vectors)
    if missing:
        raise StoreError(f"the index at {path} lacks stored vectors for {len(missing)} of its items; "
                         "delete that folder and index the files again")
    return rows, {i: v for i, v in vectors.items() if i in ok}


def legacy_segment(path: Path, manifest: dict[str, Any], columns: list[str], with_index: bool,
                   items: pq.ParquetFile):
    """The whole schema-1 index as one read-only segment: (rows, ok ids in FAISS row order, their vectors,
    the FAISS index, whether FAISS answers with item ids (an IDMap2) rather than rows); `items`: its item table,
    held open."""
    import faiss

    files = manifest["files"]
    table = read_items(path / files["items"], file=items).sort_by("id")
    index = read_faiss(path / files["faiss"], manifest["quantize"])
    id_map = hasattr(index, "id_map")  # written with an IDMap2: FAISS holds the ids
    if id_map:
        ok_ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    else:
        ok_ids = table.filter(pc.equal(table["status"], "ok"))["id"].to_numpy()
    vectors = legacy_vectors(path, manifest)
    missing = [i for i in ok_ids.tolist() if i not in vectors]
    if missing:
        raise StoreError(f"the index at {path} lacks stored vectors for {len(missing)} of its items; "
                         "delete that folder and index the files again")
    stacked = (np.stack([vectors[i] for i in ok_ids.tolist()]) if len(ok_ids)
               else np.zeros((0, manifest["full_dim"]), dtype=np.float16))
    return table.select(columns), ok_ids, stacked, index if with_index else None, id_map
