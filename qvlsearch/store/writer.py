"""The one writer of an index folder: new rows become a new segment, deletes become tombstones, and a
size-tiered policy merges segments, all switched in by one atomic manifest write per commit.

A commit costs what changed: it writes the new rows' segment, a small file of deleted ids and the
manifest, and at most one merge. Merging keeps the number of segments and the work per vector
O(log N): segments within a factor of 10 in size form a tier, and ten segments of a tier merge into
one of the next (as Lucene's TieredMergePolicy does); a segment with more than 20% deleted rows is
rewritten without them. Files that a commit supersedes stay for `GRACE_SECONDS`, so that a reader
that has just read the previous manifest still finds them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..words import copy_words, indexed_text, name_words, words_rows, write_words
from .files import (
    DELETED_SCHEMA,
    DELETED_VIEW,
    ITEM_SCHEMA,
    ITEMS_VIEW,
    SCHEMA_VERSION,
    SEGMENTS,
    SETTINGS_KEYS,
    StoreError,
    check_index_folder,
    interrupts_held,
    now,
    read_manifest,
    remove_store_files,
    sync_view,
    write_atomically,
    write_manifest,
)
from .segments import (
    faiss_factory,
    faiss_rows,
    npy_rows,
    ok_positions,
    parquet_rows,
    read_deleted,
    read_faiss,
    read_items,
    read_vectors,
    save_npy_parts,
    segment_files,
    write_faiss,
    write_segment,
)

log = logging.getLogger("qvlsearch")

GRACE_SECONDS = 60.0
SEGMENTS_PER_TIER = 10
DELETED_REWRITE = 0.2  # a segment with more deleted rows than this is rewritten without them
MAX_DELETE_FILES = 16  # more than this many tombstone files are rewritten into one


def tier(live_rows: int) -> int:
    return int(math.log10(max(live_rows, 1)))


class Store:
    """An index folder as its one writer sees it: the committed segments plus what is pending."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        self.first_new_id = manifest["next_id"]
        self.pending_rows: dict[int, dict[str, Any]] = {}
        self.pending_vectors: dict[int, np.ndarray] = {}
        self.pending_words: dict[int, str] = {}  # the text words of pending rows (their names come from their paths)
        self.words_known = True  # False while pending rows come without their words (a schema-1 upgrade's)
        self.pending_deletes: set[int] = set()  # committed ids to tombstone at the next commit
        self.deleted_now: set[int] = set()  # tombstoned by this writer: merges keep their rows, a reuse may read them
        self.deleted = np.zeros(0, dtype=np.int64)  # every committed tombstone, sorted
        self.deleted_before = self.deleted  # the committed tombstones when this writer opened
        self.segment_ids: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (all ids, ok ids in vector order)
        self.segment_vectors: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # see `vector`
        self._committed: tuple[np.ndarray, pa.Table] | None = None  # see `committed_table`
        self._rows: dict[int, dict[str, Any]] | None = None
        self.issued: set[int] = set()  # ids from new_id() not yet put
        self.dirty = False

    @classmethod
    def create(cls, path: Path, settings: dict[str, Any], full_dim: int) -> Store:
        """A new, empty index (written at the first commit); refuses a non-empty folder that holds no index."""
        check_index_folder(Path(path))
        created = now().isoformat()
        manifest = {"schema_version": SCHEMA_VERSION, **settings, "full_dim": full_dim, "generation": 0,
                    "next_id": 1, "next_segment": 1, "segments": [], "deletes": [], "trained": None,
                    "superseded": [], "counts": {}, "created": created, "updated": created}
        return cls(Path(path), manifest)

    @classmethod
    def open(cls, path: Path, write: bool = True) -> Store:
        """The committed generation, for writing; an index of schema 1 is upgraded (one commit) first, or with
        `write=False` (a dry run) held as pending rows that are never committed."""
        path = Path(path)
        manifest = read_manifest(path)
        if manifest["schema_version"] == 1:
            return cls.upgrade(path, manifest, write)
        store = cls(path, manifest)
        for name in manifest["deletes"]:
            store.deleted = np.union1d(store.deleted, read_deleted(path / SEGMENTS / name))
        store.deleted_before = store.deleted
        return store

    @classmethod
    def upgrade(cls, path: Path, old: dict[str, Any], write: bool = True) -> Store:
        """Rewrite a schema-1 index (one item table, npz vector files) as one segment; nothing is re-embedded."""
        from .legacy import legacy_files, legacy_rows_and_vectors

        # a setting schema 1 did not have (moments, pages) stays unset: the next run sets it (its own or the default)
        manifest = {"schema_version": SCHEMA_VERSION, **{k: old[k] for k in SETTINGS_KEYS if old.get(k) is not None},
                    "full_dim": old["full_dim"], "generation": old["generation"], "next_id": old["next_id"],
                    "next_segment": 1, "segments": [], "deletes": [], "trained": None,
                    "superseded": [{"at": time.time(), "files": legacy_files(old)}], "counts": old.get("counts", {}),
                    "created": old.get("created"), "updated": old.get("updated")}
        store = cls(path, manifest)
        store.manifest["counts"] = {}
        rows, vectors = legacy_rows_and_vectors(path, old)
        for row in rows:
            store.pending_rows[row["id"]] = row
            if row["id"] in vectors:
                store.pending_vectors[row["id"]] = vectors[row["id"]]
        store.dirty = True
        store.words_known = False  # its segment gets no words: the next `index` run reads them (`add_words`)
        if write:
            store.commit()
        store.words_known = True
        return store

    @property
    def settings(self) -> dict[str, Any]:
        return {k: self.manifest.get(k) for k in SETTINGS_KEYS}

    # --- reading what is stored -------------------------------------------------------------------

    def committed_items(self, columns: list[str] | None = None) -> pa.Table:
        """The live committed rows (tombstoned ones left out), in segment order."""
        tables = [read_items(self.path / SEGMENTS / f"{s['name']}.parquet", columns) for s in self.manifest["segments"]]
        table = pa.concat_tables(tables) if tables else ITEM_SCHEMA.empty_table().select(columns or ITEM_SCHEMA.names)
        if len(self.deleted):
            table = table.filter(pc.invert(pc.is_in(table["id"], value_set=pa.array(self.deleted))))
        return table

    def committed_table(self) -> tuple[np.ndarray, pa.Table]:
        """The live committed rows, every column, ascending id, and their ids: read once a generation."""
        if self._committed is None:
            table = self.committed_items().sort_by("id")
            self._committed = (table["id"].to_numpy(), table)
        return self._committed

    def pending_table(self) -> pa.Table:
        """The rows put since the last commit, ascending id, as Arrow columns."""
        return pa.Table.from_pylist(sorted(self.pending_rows.values(), key=lambda r: r["id"]), ITEM_SCHEMA)

    def live_table(self, pending: pa.Table | None = None) -> pa.Table:
        """Every live row, committed and pending, ascending id, as Arrow columns: what a run compares files with
        (pending rows have fresh ids, above every committed one). `pending`: `pending_table()`, if made already."""
        _, table = self.committed_table()
        if self.pending_deletes:
            table = table.filter(pc.invert(pc.is_in(table["id"], value_set=pa.array(list(self.pending_deletes)))))
        if self.pending_rows:
            table = pa.concat_tables([table, self.pending_table() if pending is None else pending])
        return table

    @property
    def rows(self) -> dict[int, dict[str, Any]]:
        """Every live row by id as Python dicts (read from disk on first use, then kept in step); for tests and
        small indexes: a run over a large one reads `live_table` instead."""
        if self._rows is None:
            self._rows = {row["id"]: row for row in self.live_table().to_pylist()}
        return self._rows

    def committed_rows(self, ids: list[int]) -> list[dict[str, Any]]:
        """The committed rows among `ids` (also those pending deletion), in one read of the table."""
        if not ids:
            return []
        all_ids, table = self.committed_table()
        wanted = np.array(ids, dtype=np.int64)
        at = np.minimum(np.searchsorted(all_ids, wanted), max(len(all_ids) - 1, 0))
        found = at[all_ids[at] == wanted] if len(all_ids) else at[:0]
        return table.take(pa.array(found)).to_pylist()

    def is_committed(self, item_id: int) -> bool:
        """Whether `item_id` is a live row of the committed generation (whatever is pending)."""
        all_ids, _ = self.committed_table()
        at = int(np.searchsorted(all_ids, item_id))
        return at < len(all_ids) and all_ids[at] == item_id

    def is_live(self, item_id: int) -> bool:
        """Whether `item_id` is a live row now, pending changes included."""
        return item_id in self.pending_rows or (item_id not in self.pending_deletes and self.is_committed(item_id))

    def ids_of(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A segment's ids, and its ok rows' ids in vector order."""
        if name not in self.segment_ids:
            table = read_items(self.path / SEGMENTS / f"{name}.parquet", ["id", "status"])
            ids = table["id"].to_numpy()
            self.segment_ids[name] = (ids, ids[ok_positions(table)])
        return self.segment_ids[name]

    def segment_rows(self, name: str) -> list[dict[str, Any]]:
        """A committed segment's live rows, as Python dicts."""
        rows = read_items(self.path / SEGMENTS / f"{name}.parquet").to_pylist()
        return [row for row in rows if row["id"] not in self.pending_deletes and self.is_committed(row["id"])]

    def vector(self, item_id: int) -> np.ndarray | None:
        """The stored float16 vector of `item_id`, also of one deleted by this writer; None if there is none."""
        if item_id in self.pending_vectors:
            return self.pending_vectors[item_id]
        for segment in self.manifest["segments"]:
            sorted_ids, order, vectors = self.vectors_of(segment["name"])
            at = int(np.searchsorted(sorted_ids, item_id))
            if at < len(sorted_ids) and sorted_ids[at] == item_id:
                return np.array(vectors[order[at]])
        return None

    def vectors_of(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A segment's ok ids sorted, where each is in its vectors, and those vectors (memory-mapped)."""
        if name not in self.segment_vectors:
            _, ok_ids = self.ids_of(name)
            order = np.argsort(ok_ids, kind="stable")
            self.segment_vectors[name] = (ok_ids[order], order, read_vectors(self.path / SEGMENTS / f"{name}.npy"))
        return self.segment_vectors[name]

    # --- changing it ----------------------------------------------------------------------------

    def new_id(self) -> int:
        item_id = self.manifest["next_id"]
        self.manifest["next_id"] += 1
        self.issued.add(item_id)
        return item_id

    def put(self, row: dict[str, Any], vector: np.ndarray | None = None) -> int:
        """Add a row (an `ok` row with its full-width vector); returns the id it is stored under.

        Stored rows never change: a row put under any id but a fresh one from `new_id()` replaces the
        live row of that id (if any) under a new id, and the old id is tombstoned. A row's `words` (its text,
        its text layer, its description) go to its segment's words database, not to the item table.
        """
        row = dict(row)
        words = row.pop("words", None)
        if row["id"] in self.issued:
            self.issued.discard(row["id"])
        else:
            self.remove([row["id"]])
            row = {**row, "id": self.new_id()}
            self.issued.discard(row["id"])
        self.pending_rows[row["id"]] = row
        if vector is not None:
            self.pending_vectors[row["id"]] = np.asarray(vector, dtype=np.float16)
        if words:
            self.pending_words[row["id"]] = words
        if self._rows is not None:
            self._rows[row["id"]] = row
        self.dirty = True
        return row["id"]

    def remove(self, ids) -> None:
        """Delete live rows by id (a committed one gets a tombstone); other ids are ignored."""
        for item_id in map(int, ids):
            if item_id in self.pending_rows:
                self.pending_rows.pop(item_id)
                self.pending_vectors.pop(item_id, None)
                self.pending_words.pop(item_id, None)
            elif self.is_live(item_id):
                self.pending_deletes.add(item_id)
                self.deleted_now.add(item_id)
            else:
                continue
            if self._rows is not None:
                self._rows.pop(item_id, None)
            self.dirty = True

    def counts(self) -> dict[str, Any]:
        """Counts by status and kind after the pending changes."""
        old = self.manifest.get("counts") or {}
        by_kind = dict(old.get("by_kind", {}))
        by_status = {"ok": old.get("ok", 0), "error": old.get("error", 0)}
        files = old.get("files", old.get("items", 0))
        deleted = self.committed_rows(list(self.pending_deletes))
        for sign, rows in ((1, self.pending_rows.values()), (-1, deleted)):
            for row in rows:
                by_kind[row["kind"]] = by_kind.get(row["kind"], 0) + sign
                by_status[row["status"]] = by_status.get(row["status"], 0) + sign
                files += sign * is_file_row(row)
        by_kind = {k: v for k, v in by_kind.items() if v}
        return {"items": by_status["ok"] + by_status["error"], "files": files, **by_status, "by_kind": by_kind}

    # --- committing -----------------------------------------------------------------------------

    def commit(self, merge: bool = True) -> None:
        """Write what is pending as a new generation (and at most one merge); no-op when nothing changed.

        On a write error (a full disk) nothing is switched: StoreError says the index is at its last commit.
        """
        if not self.dirty and self.manifest["generation"] > 0:
            return
        new_rows = self.pending_table()
        # the committed table after this commit, kept (one chunk: takes stay fast), not read again
        committed_after = self.live_table(new_rows).combine_chunks() if self._committed is not None else None
        manifest = {**self.manifest, "generation": self.manifest["generation"] + 1,
                    "segments": [dict(s) for s in self.manifest["segments"]], "deletes": list(self.manifest["deletes"])}
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / SEGMENTS).mkdir(exist_ok=True)
            deleted = self.write_pending(manifest, new_rows)
            if merge:
                self.merge_step(manifest, deleted)
            if len(manifest["deletes"]) > MAX_DELETE_FILES:
                self.compact_deletes(manifest, deleted)
            manifest.update(counts=self.counts(), updated=now().isoformat(),
                            superseded=self.superseded(manifest))
        except OSError as exc:
            raise self.write_error(exc) from None
        with interrupts_held():  # the manifest, this writer's state and the view switch together
            self.switch(manifest)
            self.manifest, self.deleted = manifest, deleted
            self._committed = None if committed_after is None else (committed_after["id"].to_numpy(),
                                                                     committed_after)
            self.pending_rows, self.pending_vectors, self.pending_deletes, self.pending_words = {}, {}, set(), {}
            self.dirty = False
            self.tidy()

    def switch(self, manifest: dict[str, Any]) -> None:
        """Write `manifest`: readers see the new generation from now on."""
        try:
            write_manifest(self.path, manifest)
        except OSError as exc:
            raise self.write_error(exc) from None

    def write_pending(self, manifest: dict[str, Any], new_rows: pa.Table) -> np.ndarray:
        """The new rows' segment (`new_rows`: `pending_table()`) and the new tombstones; returns every tombstone
        after this commit."""
        if new_rows.num_rows:
            ok = new_rows["id"].filter(pc.equal(new_rows["status"], "ok")).to_pylist()
            vectors = (np.stack([self.pending_vectors[i] for i in ok]) if ok
                       else np.zeros((0, manifest["full_dim"]), dtype=np.float16))
            texts = self.pending_words
            manifest["segments"].append(self.write_new_segment(
                manifest, new_rows, vectors,
                words=(lambda tmp: write_words(tmp, segment_words(new_rows, texts))) if self.words_known else None))
        deleted = self.deleted
        if self.pending_deletes:
            ids = np.array(sorted(self.pending_deletes), dtype=np.int64)
            name = f"del-{manifest['generation']:06d}.parquet"
            table = pa.Table.from_arrays([pa.array(ids)], schema=DELETED_SCHEMA)
            write_atomically(self.path / SEGMENTS / name, lambda tmp: pq.write_table(table, tmp), parquet_rows,
                             len(ids))
            manifest["deletes"].append(name)
            deleted = np.union1d(deleted, ids)
            for segment in manifest["segments"]:
                if segment["name"] in {s["name"] for s in self.manifest["segments"]}:
                    segment["deleted"] += int(np.isin(self.ids_of(segment["name"])[0], ids).sum())
        return deleted

    def write_new_segment(self, manifest: dict[str, Any], table: pa.Table, vectors: np.ndarray,
                          vectors_written: bool = False, name: str | None = None,
                          words: Callable[[Path], None] | None = None) -> dict[str, Any]:
        name = name or self.next_segment_name(manifest)
        trained = self.trained_index(manifest, vectors)
        factory = (manifest["trained"]["factory"] if trained is not None
                   else faiss_factory(manifest["index_type"], manifest["quantize"], len(vectors)))
        return write_segment(self.path, name, table, vectors, manifest, factory, trained, vectors_written, words)

    def add_words(self, name: str, texts: dict[int, str]) -> None:
        """Give a segment written before words were indexed its words database (names from its rows' paths,
        `texts` by id); the next commit lists it. Nothing else of the segment changes."""
        segment = next(s for s in self.manifest["segments"] if s["name"] == name)
        table = read_items(self.path / SEGMENTS / f"{name}.parquet", ["id", "path", "root", "status", "page",
                                                                      "start_s"])
        try:
            write_atomically(self.path / SEGMENTS / f"{name}.words",
                             lambda tmp: write_words(tmp, segment_words(table, texts)), words_rows, segment["ok"])
        except OSError as exc:
            raise self.write_error(exc) from None
        segment["words"] = True
        segment["bytes"] = segment.get("bytes", 0) + (self.path / SEGMENTS / f"{name}.words").stat().st_size
        self.dirty = True

    @staticmethod
    def next_segment_name(manifest: dict[str, Any]) -> str:
        name = f"seg-{manifest['next_segment']:06d}"
        manifest["next_segment"] += 1
        return name

    def trained_index(self, manifest: dict[str, Any], vectors: np.ndarray) -> Any:
        """The IVF lists that every large segment shares (trained once, on the first one), else None."""
        factory = faiss_factory(manifest["index_type"], manifest["quantize"], len(vectors))
        if "IVF" not in factory:
            return None
        trained = manifest.get("trained")
        if trained:
            return read_faiss(self.path / SEGMENTS / trained["file"], manifest["quantize"])
        import faiss

        from .segments import training_sample

        index = faiss.index_factory(manifest["dim"], factory, faiss.METRIC_INNER_PRODUCT)
        index.train(training_sample(vectors, manifest["dim"]))
        name = f"trained-{manifest['generation']:06d}.faiss"
        write_atomically(self.path / SEGMENTS / name, lambda tmp: write_faiss(index, tmp),
                         faiss_rows(manifest["quantize"]), 0)
        manifest["trained"] = {"file": name, "factory": factory}
        return index

    def purgeable(self, deleted: np.ndarray) -> np.ndarray:
        """Tombstones whose rows a merge may drop: not those of this writer (a reuse may still read them)."""
        if not self.deleted_now:
            return deleted
        # `deleted` less `deleted_now` is what was tombstoned before this writer opened (ids it removed were
        # live then); those no segment holds any more do not matter to a merge
        return self.deleted_before

    def plan_merge(self, manifest: dict[str, Any], deleted: np.ndarray) -> list[dict[str, Any]]:
        """The segments to merge now: one with too many deleted rows, else ten of the smallest full tier."""
        # Only a segment with enough tombstones can have enough purgeable ones (those are a part of them).
        candidates = [s for s in manifest["segments"] if s["rows"] and s["deleted"] > DELETED_REWRITE * s["rows"]]
        purgeable = self.purgeable(deleted) if candidates else deleted
        for segment in candidates:
            dropped = int(np.isin(self.ids_of(segment["name"])[0], purgeable).sum())
            if dropped > DELETED_REWRITE * segment["rows"]:
                return [segment]
        tiers: dict[int, list[dict[str, Any]]] = {}
        for segment in manifest["segments"]:
            tiers.setdefault(tier(segment["rows"] - segment["deleted"]), []).append(segment)
        for level in sorted(tiers):
            if len(tiers[level]) >= SEGMENTS_PER_TIER:
                return sorted(tiers[level], key=lambda s: s["rows"])[:SEGMENTS_PER_TIER]
        return []

    def merge_step(self, manifest: dict[str, Any], deleted: np.ndarray) -> None:
        merging = self.plan_merge(manifest, deleted)
        if merging:
            self.merge(manifest, merging, deleted, self.purgeable(deleted))

    def merge(self, manifest: dict[str, Any], merging: list[dict[str, Any]], deleted: np.ndarray,
              purge: np.ndarray) -> None:
        """Replace `merging` by one segment of their rows less those in `purge` (`deleted`: every tombstone);
        vectors stream from file to file."""
        drop = pa.array(purge)
        tables, keep_ok, words_sources = [], [], []
        for segment in merging:
            table = read_items(self.path / SEGMENTS / f"{segment['name']}.parquet")
            keep = pc.invert(pc.is_in(table["id"], value_set=drop)).to_numpy(zero_copy_only=False)
            keep_ok.append(keep[ok_positions(table)])
            tables.append(table.filter(pa.array(keep)))
            words_sources.append((self.path / SEGMENTS / f"{segment['name']}.words", table["id"].to_numpy()[~keep]))
        name = self.next_segment_name(manifest)
        final = self.path / SEGMENTS / f"{name}.npy"
        shape = (int(sum(k.sum() for k in keep_ok)), manifest["full_dim"])

        def kept_vectors() -> Iterator[np.ndarray]:
            for segment, keep in zip(merging, keep_ok, strict=True):
                source = read_vectors(self.path / SEGMENTS / f"{segment['name']}.npy")
                for start in range(0, len(source), 65536):
                    yield source[start:start + 65536][keep[start:start + 65536]]

        write_atomically(final, lambda tmp: save_npy_parts(tmp, shape, kept_vectors()), npy_rows, shape[0])
        # a segment from before words were indexed has none: the merged one has none either, until `add_words`
        words = ((lambda tmp: copy_words(tmp, words_sources)) if all(s.get("words") for s in merging) else None)
        entry = self.write_new_segment(manifest, pa.concat_tables(tables), read_vectors(final),
                                       vectors_written=True, name=name, words=words)
        entry["deleted"] = int(pc.sum(pc.is_in(pa.concat_tables(tables)["id"],
                                               value_set=pa.array(deleted))).as_py() or 0) if len(deleted) else 0
        names = {s["name"] for s in merging}
        manifest["segments"] = [s for s in manifest["segments"] if s["name"] not in names] + [entry]

    def write_error(self, exc: OSError) -> StoreError:
        """A failed commit, in one line: nothing was switched."""
        return StoreError(f"cannot write to {self.path}: {exc.strerror or exc}"
                          f"{' (' + exc.filename + ')' if getattr(exc, 'filename', None) else ''}; the index is "
                          f"intact at its last commit (generation {self.manifest['generation']})")

    def compact_deletes(self, manifest: dict[str, Any], deleted: np.ndarray) -> None:
        """Rewrite the tombstone files into one, keeping only ids that live segments still hold."""
        held = [self.ids_of(s["name"])[0] for s in manifest["segments"]]
        ids = np.intersect1d(deleted, np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
        name = f"del-{manifest['generation']:06d}.parquet"
        table = pa.Table.from_arrays([pa.array(ids)], schema=DELETED_SCHEMA)
        write_atomically(self.path / SEGMENTS / name, lambda tmp: pq.write_table(table, tmp), parquet_rows, len(ids))
        manifest["deletes"] = [name]

    def superseded(self, manifest: dict[str, Any]) -> list[dict[str, Any]]:
        """The files the old manifest used and the new one does not, with when they were let go."""
        old, new = live_files(self.manifest), live_files(manifest)
        groups = [g for g in self.manifest.get("superseded", []) if g["files"]]
        gone = sorted(old - new)
        return groups + ([{"at": time.time(), "files": gone}] if gone else [])

    def optimize(self) -> list[str]:
        """Merge every segment into one, without any deleted row (`qvlsearch optimize`, `reindex`).

        A segment that cannot be read is dropped (its files are embedded again by the next `index` run);
        returns the names of the files at fault.
        """
        self.commit()
        readable, damaged = self.readable_segments()
        manifest = {**self.manifest, "generation": self.manifest["generation"] + 1,
                    "segments": [dict(s) for s in readable], "deletes": []}
        try:
            if manifest["segments"]:  # every deleted row goes, also those this writer deleted (no tombstone stays)
                self.merge(manifest, manifest["segments"], self.deleted, self.deleted)
            manifest.update(updated=now().isoformat(), superseded=self.superseded(manifest),
                            counts=self.counted(manifest))
        except OSError as exc:
            raise self.write_error(exc) from None
        with interrupts_held():
            self.switch(manifest)
            self.manifest, self.deleted = manifest, np.zeros(0, dtype=np.int64)
            self.segment_ids, self._rows = {}, None
            self.deleted_before, self.deleted_now = self.deleted, set()
            self.segment_vectors, self._committed = {}, None
            self.tidy()
        return damaged

    def readable_segments(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The segments whose three files read back, and the files of those that do not."""
        readable, damaged = [], []
        for segment in self.manifest["segments"]:
            stem = self.path / SEGMENTS / segment["name"]
            try:
                ids = read_items(stem.with_suffix(".parquet"), ["id"])
                vectors = read_vectors(stem.with_suffix(".npy"))
                if ids.num_rows != segment["rows"] or len(vectors) != segment["ok"]:
                    raise StoreError(f"{stem} does not match the manifest")
                read_faiss(stem.with_suffix(".faiss"), "binary" if segment["index"] == "BinaryFlat" else "none")
                readable.append(segment)
            except (StoreError, OSError, RuntimeError):
                damaged.append(segment["name"])
        return readable, damaged

    def counted(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Counts read from the segments' rows (after an optimize: it drops deleted rows and damaged segments)."""
        tables = [read_items(self.path / SEGMENTS / f"{s['name']}.parquet", ["kind", "status", "page", "start_s"])
                  for s in manifest["segments"]]
        if not tables:
            return {"items": 0, "files": 0, "ok": 0, "error": 0, "by_kind": {}}
        table = pa.concat_tables(tables)
        files = sum(is_file_row(row) for row in table.select(["page", "start_s"]).to_pylist())
        by_status = {r["values"]: r["counts"] for r in pc.value_counts(table["status"]).to_pylist()}
        by_kind = {r["values"]: r["counts"] for r in pc.value_counts(table["kind"]).to_pylist()}
        return {"items": table.num_rows, "files": files, "ok": by_status.get("ok", 0),
                "error": by_status.get("error", 0), "by_kind": by_kind}

    def rebuild(self, **settings: Any) -> list[str]:
        """Change dim, quantization or index type: every segment is rebuilt from the stored vectors.

        Returns the damaged segments dropped, as `optimize` does.
        """
        self.commit()
        self.manifest.update({k: v for k, v in settings.items() if v is not None}, trained=None)
        return self.optimize()

    # --- housekeeping ---------------------------------------------------------------------------

    def tidy(self) -> None:
        """Delete superseded files past their grace period and files no generation refers to; sync the view.

        Housekeeping only: where it fails (a full disk where the view is copies), the commit stands, a warning
        says so, and the next writer tidies.
        """
        try:
            self.tidy_now()
        except OSError as exc:
            log.warning("could not tidy %s: %s%s; the index is fine at generation %s, the next run tidies it",
                        self.path, exc.strerror or exc, f" ({exc.filename})" if exc.filename else "",
                        self.manifest["generation"])

    def tidy_now(self) -> None:
        if not (self.path / "manifest.json").exists():
            return
        keep = live_files(self.manifest)
        expired = [g for g in self.manifest.get("superseded", []) if time.time() - g["at"] >= GRACE_SECONDS]
        waiting = {f for g in self.manifest.get("superseded", []) if g not in expired for f in g["files"]}
        for name in (f for g in expired for f in g["files"]):  # exactly the files the store let go, nothing else
            target = self.path / name
            if target.is_file() and not target.is_symlink():
                target.unlink()
        remove_store_files(self.path / SEGMENTS, {Path(f).name for f in keep | waiting})  # a killed writer's
        (self.path / ".manifest.json.tmp").unlink(missing_ok=True)
        if expired:
            self.manifest["superseded"] = [g for g in self.manifest["superseded"] if g not in expired]
        (self.path / DELETED_VIEW).mkdir(exist_ok=True)
        if not (self.path / DELETED_VIEW / "none.parquet").exists():  # first, so that reading the folder never fails
            write_atomically(self.path / DELETED_VIEW / "none.parquet",
                             lambda tmp: pq.write_table(DELETED_SCHEMA.empty_table(), tmp))
        sync_view(self.path, {s["name"] + ".parquet" for s in self.manifest["segments"]}, ITEMS_VIEW)
        sync_view(self.path, set(self.manifest["deletes"]), DELETED_VIEW)


def is_file_row(row: dict[str, Any]) -> bool:
    """Each file has one row that stands for it: the whole-file row, or a PDF's first page."""
    return row.get("start_s") is None and row.get("page") in (None, 1)


def segment_words(table: pa.Table, texts: dict[int, str]) -> list[tuple[int, str, str]]:
    """The words rows of a segment's ok rows (`table`: its item rows): id, name words (for the row that stands for
    its file), text words (from `texts`, by id)."""
    ok = table.take(pa.array(ok_positions(table))).select(["id", "path", "root", "page", "start_s"]).to_pylist()
    return [(row["id"], name_words(row["path"], row["root"]) if is_file_row(row) else "",
             indexed_text(texts.get(row["id"]))) for row in ok]


def live_files(manifest: dict[str, Any]) -> set[str]:
    """The files a manifest refers to, relative to the index folder."""
    files = {f"{SEGMENTS}/{s['name']}.{ext}" for s in manifest.get("segments", [])
             for ext in segment_files(bool(s.get("words")))}
    files |= {f"{SEGMENTS}/{name}" for name in manifest.get("deletes", [])}
    if manifest.get("trained"):
        files.add(f"{SEGMENTS}/{manifest['trained']['file']}")
    return files
