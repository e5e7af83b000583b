"""The index writer of qvlsearch 0.1.0 (schema 1), frozen: to make index folders as the previous release
wrote them, for the upgrade tests. Its code path, trimmed to what writes a folder; do not change it."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qvlsearch.store import ITEM_SCHEMA


def write_atomically(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def write_schema1_index(path: Path, settings: dict[str, Any], full_dim: int, rows: list[dict[str, Any]],
                        vectors: dict[int, np.ndarray], id_map: bool = False) -> None:
    """One commit of 0.1.0's Store: items-000001.parquet, index-000001.faiss, vectors-000001.npz, manifest.json.
    Its settings had no moments or pages: `moment_seconds` and `max_pages` are left out."""
    import faiss

    settings = {k: v for k, v in settings.items() if k not in ("moment_seconds", "max_pages")}

    path.mkdir(parents=True, exist_ok=True)
    gen = 1
    files = {"items": f"items-{gen:06d}.parquet", "faiss": f"index-{gen:06d}.faiss",
             "vectors": [f"vectors-{gen:06d}.npz"]}
    ids = np.fromiter(vectors, dtype=np.int64, count=len(vectors))
    stacked = np.stack([np.asarray(v, dtype=np.float16) for v in vectors.values()])
    write_atomically(path / files["vectors"][0], lambda tmp: save_npz(tmp, ids=ids, vectors=stacked))
    rows = sorted(rows, key=lambda r: r["id"])
    table = pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)
    write_atomically(path / files["items"], lambda tmp: pq.write_table(table, tmp))
    ok_ids = np.array([r["id"] for r in rows if r["status"] == "ok"], dtype=np.int64)
    x = np.stack([vectors[i] for i in ok_ids.tolist()]).astype(np.float32)[:, :settings["dim"]]
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    index = faiss.index_factory(settings["dim"], "Flat", faiss.METRIC_INNER_PRODUCT)
    if id_map:  # releases before 0.1.0's last one kept item ids in an IDMap2
        index = faiss.IndexIDMap2(index)
        index.add_with_ids(x, ok_ids)
    else:
        index.add(x)
    write_atomically(path / files["faiss"], lambda tmp: faiss.write_index(index, str(tmp)))
    by_kind: dict[str, int] = {}
    for row in rows:
        by_kind[row["kind"]] = by_kind.get(row["kind"], 0) + 1
    ok = sum(r["status"] == "ok" for r in rows)
    created = dt.datetime.now(dt.timezone.utc).isoformat()
    manifest = {"schema_version": 1, **settings, "full_dim": full_dim, "generation": gen,
                "next_id": max(r["id"] for r in rows) + 1, "files": files,
                "counts": {"items": len(rows), "ok": ok, "error": len(rows) - ok, "by_kind": by_kind},
                "created": created, "updated": created, "faiss_factory": "Flat", "stored_vectors": len(ids)}
    write_atomically(path / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    os.link(path / files["items"], path / "items.parquet")
