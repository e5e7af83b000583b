"""Readers: one committed generation of an index, opened whole, whatever the writer does meanwhile.

A reader reads the manifest, then its segments. Files a commit supersedes stay for a grace period,
and a reader that still finds one gone (a very slow open) reads the new manifest and starts again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .files import ITEM_SCHEMA, SEGMENTS, StoreError, read_manifest
from .segments import ok_positions, read_deleted, read_faiss, read_items, read_vectors

OPEN_TRIES = 5


@dataclass
class OpenSegment:
    """A segment opened for searching: FAISS row i (and vector row i) holds item `ok_ids[i]`."""

    name: str
    ok_ids: np.ndarray
    vectors: np.ndarray  # float16, full width, memory-mapped
    index: Any  # the FAISS index, or None when not asked for
    deleted_rows: np.ndarray  # FAISS rows whose items are deleted
    answers_ids: bool = False  # FAISS answers with item ids, not rows (a schema-1 index with an IDMap2)

    @property
    def live(self) -> int:
        return len(self.ok_ids) - len(self.deleted_rows)


class Snapshot:
    """The live rows (`items`, ascending id, the asked columns) and segments of one committed generation."""

    def __init__(self, path: str | Path, columns: list[str] | None = None, with_index: bool = True):
        self.path = Path(path)
        columns = list(columns or ITEM_SCHEMA.names)
        for _ in range(OPEN_TRIES):
            self.manifest = read_manifest(self.path)
            try:
                self.load(columns, with_index)
                return
            except FileNotFoundError as exc:
                if read_manifest(self.path).get("generation") == self.manifest.get("generation"):
                    raise StoreError(f"{exc.filename} is missing from the index at {self.path}; run `qvlsearch "
                                     "optimize` (it drops what cannot be read), then `qvlsearch index` to embed those "
                                     "files again") from None
        raise StoreError(f"the index at {self.path} changed {OPEN_TRIES} times while it was being opened; try again")

    def load(self, columns: list[str], with_index: bool) -> None:
        m = self.manifest
        wanted = list(dict.fromkeys(["id", "status", *columns]))
        if m["schema_version"] == 1:
            from .legacy import legacy_segment

            if not m.get("files", {}).get("items"):
                self.segments, self.items = [], ITEM_SCHEMA.empty_table().select(columns)
                return
            table, ok_ids, vectors, index, id_map = legacy_segment(self.path, m, wanted, with_index)
            self.segments = [OpenSegment("legacy", ok_ids, vectors, index, np.zeros(0, dtype=np.int64), id_map)]
            self.items = table.select(columns)
            return
        deleted = np.zeros(0, dtype=np.int64)
        for name in m["deletes"]:
            deleted = np.union1d(deleted, read_deleted(self.path / SEGMENTS / name))
        tables, self.segments = [], []
        for segment in m["segments"]:
            stem = self.path / SEGMENTS / segment["name"]
            table = read_items(stem.with_suffix(".parquet"), wanted)
            ok_ids = table["id"].to_numpy()[ok_positions(table)]
            deleted_rows = np.flatnonzero(np.isin(ok_ids, deleted)) if segment["deleted"] else np.zeros(0, np.int64)
            index = read_segment_index(stem.with_suffix(".faiss"), m["quantize"]) if with_index else None
            self.segments.append(OpenSegment(segment["name"], ok_ids, read_vectors(stem.with_suffix(".npy")), index,
                                             deleted_rows))
            tables.append(table)
        items = pa.concat_tables(tables) if tables else ITEM_SCHEMA.empty_table().select(wanted)
        if len(deleted):
            items = items.filter(pc.invert(pc.is_in(items["id"], value_set=pa.array(deleted))))
        self.items = items.sort_by("id").select(columns)

    def __len__(self) -> int:
        return sum(s.live for s in self.segments)


def read_segment_index(path: Path, quantize: str) -> Any:
    try:
        return read_faiss(path, quantize)
    except RuntimeError as exc:
        if not path.exists():
            raise FileNotFoundError(2, "No such file", str(path)) from None
        raise StoreError(f"cannot read {path} ({str(exc).strip().splitlines()[-1]}); run `qvlsearch optimize` "
                         "(it drops what cannot be read), then `qvlsearch index` to embed those files again") from None


class StoredVectors:
    """The full-width float16 vectors of a snapshot's live items, memory-mapped, to read a few by id."""

    def __init__(self, snapshot: Snapshot):
        self.path = snapshot.path
        self.segments = snapshot.segments
        ids = np.concatenate([s.ok_ids for s in self.segments]) if self.segments else np.zeros(0, np.int64)
        which = np.concatenate([np.full(len(s.ok_ids), k) for k, s in enumerate(self.segments)]) if self.segments \
            else np.zeros(0, np.int64)
        rows = np.concatenate([np.arange(len(s.ok_ids)) for s in self.segments]) if self.segments \
            else np.zeros(0, np.int64)
        order = np.argsort(ids, kind="stable")
        self.ids, self.which, self.rows = ids[order], which[order], rows[order]

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Vectors of `ids`, one row each, as float32; StoreError when one has none."""
        ids = np.asarray(ids, dtype=np.int64)
        positions = np.minimum(np.searchsorted(self.ids, ids), max(len(self.ids) - 1, 0))
        if len(ids) and not (len(self.ids) and np.array_equal(self.ids[positions], ids)):
            raise StoreError(f"the index at {self.path} lacks stored vectors for some of its items; "
                             "delete that folder and index the files again")
        dim = self.segments[0].vectors.shape[1] if self.segments else 0
        out = np.empty((len(ids), dim), dtype=np.float32)
        for k, segment in enumerate(self.segments):
            mine = np.flatnonzero(self.which[positions] == k)
            if len(mine):
                out[mine] = segment.vectors[self.rows[positions[mine]]]
        return out
