"""Readers: one committed generation of an index, opened whole, whatever the writer does meanwhile.

A reader reads the manifest, then its segments. Files a commit supersedes stay for a grace period,
and a reader that still finds one gone (a very slow open) reads the new manifest and starts again.
Once open, a snapshot holds its files (item tables and words databases open, vectors and FAISS indexes
mapped), so that it reads its generation whole however long it lives, whatever merges delete meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..words import SegmentWords
from .files import ITEM_SCHEMA, SEGMENTS, StoreError, commit_key, read_manifest
from .segments import ok_positions, open_items, read_deleted, read_faiss, read_items, read_vectors

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
    words: SegmentWords | None = None  # its words database; None for a segment from before words were indexed

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
                if commit_key(read_manifest(self.path)) == commit_key(self.manifest):
                    raise StoreError(f"{exc.filename} is missing from the index at {self.path}; run `qvlsearch "
                                     "optimize` (it drops what cannot be read), then `qvlsearch index` to embed those "
                                     "files again") from None
        raise StoreError(f"the index at {self.path} changed {OPEN_TRIES} times while it was being opened; try again")

    def load(self, columns: list[str], with_index: bool) -> None:
        m = self.manifest
        wanted = list(dict.fromkeys(["id", "status", *columns]))
        self.deleted = np.zeros(0, dtype=np.int64)
        self.item_files: list[tuple[Path, pq.ParquetFile]] = []  # held open, for `columns`
        if m["schema_version"] == 1:
            from .legacy import legacy_segment

            if not m.get("files", {}).get("items"):
                self.segments, self.items = [], ITEM_SCHEMA.empty_table().select(columns)
                return
            items = self.path / m["files"]["items"]
            self.item_files = [(items, open_items(items))]
            table, ok_ids, vectors, index, id_map = legacy_segment(self.path, m, wanted, with_index,
                                                                   self.item_files[0][1])
            self.segments = [OpenSegment("legacy", ok_ids, vectors, index, np.zeros(0, dtype=np.int64), id_map)]
            self.items = table.select(columns)
            return
        for name in m["deletes"]:
            self.deleted = np.union1d(self.deleted, read_deleted(self.path / SEGMENTS / name))
        tables, self.segments = [], []
        for segment in m["segments"]:
            stem = self.path / SEGMENTS / segment["name"]
            items = stem.with_suffix(".parquet")
            self.item_files.append((items, open_items(items)))
            table = read_items(items, wanted, self.item_files[-1][1])
            ok_ids = table["id"].to_numpy()[ok_positions(table)]
            deleted_rows = (np.flatnonzero(np.isin(ok_ids, self.deleted)) if segment["deleted"]
                            else np.zeros(0, np.int64))
            index = read_segment_index(stem.with_suffix(".faiss"), m["quantize"]) if with_index else None
            words = SegmentWords(stem.with_suffix(".words")) if with_index and segment.get("words") else None
            self.segments.append(OpenSegment(segment["name"], ok_ids, read_vectors(stem.with_suffix(".npy")), index,
                                             deleted_rows, words=words))
            tables.append(table)
        self.items = self.live(tables, wanted).select(columns)

    def live(self, tables: list[pa.Table], columns: list[str]) -> pa.Table:
        """The rows of `tables` (one per segment) that are not deleted, ascending id."""
        items = pa.concat_tables(tables) if tables else ITEM_SCHEMA.empty_table().select(columns)
        if len(self.deleted):
            items = items.filter(pc.invert(pc.is_in(items["id"], value_set=pa.array(self.deleted))))
        return items.sort_by("id")

    def columns(self, names: list[str]) -> pa.Table:
        """More columns of this generation's live rows, read now (from the files held open), in the order of
        `items`."""
        wanted = list(dict.fromkeys(["id", *names]))
        tables = [read_items(path, wanted, file) for path, file in self.item_files]
        if self.manifest["schema_version"] == 1:
            return tables[0].sort_by("id").select(names) if tables else ITEM_SCHEMA.empty_table().select(names)
        return self.live(tables, wanted).select(names)

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
