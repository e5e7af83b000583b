"""The index folder: immutable segments, tombstones and merging, switched in by one manifest.

Layout of an index folder (schema 2):

    manifest.json               settings, counts, the live segments and tombstone files (written last, atomically)
    segments/seg-<n>.parquet    a segment's item rows (one row per file)
    segments/seg-<n>.npy        the full-width float16 vectors of its ok rows, in row order
    segments/seg-<n>.faiss      a FAISS index over them (row i = the i-th ok row)
    segments/seg-<n>.words      the ok rows' words (SQLite FTS5, rowid = item id; see qvlsearch.words)
    segments/del-<gen>.parquet  ids deleted by generation <gen> (tombstones)
    segments/trained-<gen>.faiss  IVF lists shared by large segments (ivf, ivfpq)
    items/, deleted/            links to the live item tables and tombstone files, for outside tools
    lock, lock.pid              held by the one writer
    watch.json                  while `index --watch` runs: its pid, roots and mode

A reader (or a run killed at any moment) sees one generation: the old one or the new one.
"""

from .files import (
                    ITEM_SCHEMA,
                    SCHEMA_VERSION,
                    SETTINGS_KEYS,
                    StoreError,
                    check_index_folder,
                    commit_key,
                    folder_bytes,
                    now,
                    read_manifest,
                    write_atomically,
)
from .reader import OpenSegment, Snapshot, StoredVectors
from .segments import (
    INDEX_TYPES,
    QUANTIZATIONS,
    SEAL_ROWS,
    build_faiss,
    check_factory,
    faiss_factory,
    normalized,
    read_faiss,
)
from .writer import Store, is_file_row

__all__ = ["ITEM_SCHEMA", "SCHEMA_VERSION", "check_index_folder", "commit_key", "SETTINGS_KEYS", "StoreError",
           "folder_bytes", "now", "read_manifest", "write_atomically", "OpenSegment", "Snapshot", "StoredVectors",
           "INDEX_TYPES", "QUANTIZATIONS", "SEAL_ROWS", "build_faiss", "check_factory", "faiss_factory", "normalized",
           "read_faiss", "Store", "is_file_row"]
