"""Duplicate files in an index, from the stored vectors: no model runs, nothing is deleted.

Exact duplicates share a content hash; near duplicates (a re-encoded, resized or lightly
edited copy) have cosine similarity >= a threshold. Candidates are each vector's nearest
neighbours (at most 63) in a FAISS search over a Matryoshka prefix of the vectors (the first
256 values, renormalized) down to a margin below the threshold, in an inverted-file index when
there are many vectors; each candidate pair is then confirmed at full width. A file with more
than 63 near duplicates still joins their group through them. Only files of the same kind pair up, and two
videos whose lengths differ are never duplicates. A PDF is compared page by page: two PDFs are near
duplicates when they have the same pages and each page of one is within the threshold of the same page
of the other (their similarity is the least of those); sharing a cover page is not enough. A file whose
vectors do not cover all of it (a text cut at the model's MAX_TEXT_TOKENS tokens, a PDF with as many
pages as the index's --max-pages) is a duplicate only of a byte-identical copy (the same content hash).
In each group the suggested keeper is the largest file (pixels, then bytes), then the oldest (date
taken, else mtime).

Alike is not the same: burst frames and a series of shots of one scene are as close as a re-encoded
copy, but each was taken at its own instant. Files alike by their vectors are split by their EXIF date
taken: those taken at the same instant (or with no date; such a file joins the shot it is most like)
are copies, an `exact` or `near` group; the shots apart, each by its keeper, form a `similar` group,
which suggests keeping them all (`qvlsearch dupes --paths` leaves them out unless `--similar`).

    groups = find_duplicates(open_index("~/.local/share/qvlsearch/index"), threshold=0.95)
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError
from .pages import MAX_PAGES
from .store import is_file_row

DEFAULT_THRESHOLD = 0.95
GROUP_TYPES = ("exact", "near", "similar")
PREFIX_DIM = 256  # candidates are searched on this many leading values of each vector
PREFIX_MARGIN = 0.05  # ... down to this much below the threshold
FLAT_BELOW = 20_000  # fewer vectors: the candidate search is exhaustive; more: an IVF index
IVF_NPROBE = 4  # inverted lists (4·sqrt(n) of them) visited per vector
IVF_TRAINING_PER_LIST = 32  # k-means trains on this many vectors per list (at most)
NEIGHBOURS = 64  # candidates per vector, itself included: memory stays n × 64 at any threshold
DURATION_TOLERANCE_S, DURATION_TOLERANCE = 0.5, 0.02  # videos: lengths within the larger of these
MAX_TEXT_TOKENS = 8192  # the embedder's max_length while indexing: a text of this many tokens was cut there
COLUMNS = ["id", "path", "path_bytes", "kind", "status", "size", "width", "height", "duration_s", "content_hash",
           "taken_at", "mtime_ns", "page", "start_s", "tokens"]


@dataclass
class Member:
    """One file of a duplicate group; `similarity` is its cosine with the group's keeper."""

    id: int
    path: str
    kind: str
    size: int | None
    width: int | None
    height: int | None
    duration_s: float | None
    taken_at: dt.datetime | None
    modified_at: dt.datetime | None
    content_hash: str | None
    similarity: float = 1.0
    keep: bool = False
    fs_path: str = ""  # the path as the OS needs it; not in JSON

    def keeper_order(self) -> tuple:
        """Sort key: the largest first (pixels, then bytes), then the oldest, then by path."""
        when = self.taken_at or self.modified_at
        return (-(self.width or 0) * (self.height or 0), -(self.size or 0),
                when.timestamp() if when else float("inf"), self.path)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "id": self.id, "keep": self.keep, "similarity": round(self.similarity, 6),
                "size": self.size, "width": self.width, "height": self.height,
                "duration_s": None if self.duration_s is None else round(self.duration_s, 3),
                "taken_at": self.taken_at.isoformat() if self.taken_at else None,
                "modified_at": self.modified_at.isoformat() if self.modified_at else None}


@dataclass
class Group:
    """Files with the same content ("exact"), copies of one picture ("near"), or different shots alike
    ("similar": a burst, a series; nothing to remove); the keeper (the best shot) first."""

    type: str
    kind: str
    members: list[Member] = field(default_factory=list)

    @property
    def keeper(self) -> Member:
        return self.members[0]

    @property
    def copies(self) -> bool:
        """Whether the members are copies of one picture, all but the keeper suggested for removal."""
        return self.type != "similar"

    def to_json(self, number: int) -> dict[str, Any]:
        return {"group": number, "type": self.type, "kind": self.kind, "keep": self.keeper.path,
                "members": [m.to_json() for m in self.members]}


def find_duplicates(index: Any, threshold: float = DEFAULT_THRESHOLD, *, kind: str | Iterable[str] | None = None,
                    under: str | os.PathLike | None = None) -> list[Group]:
    """Groups of duplicates among an index's ok files (optionally of some kinds, under a folder):
    exact groups first, then near ones, then similar ones, each ordered by its keeper's path."""
    if not -1.0 <= threshold <= 1.0:
        raise InputError(f"threshold must be a cosine similarity between -1 and 1, got {threshold}")
    keep = index.filter(kind, under)
    table = index.item_columns(COLUMNS)
    # one row a file: its whole-file row (a PDF: its first page), not the pages and moments that share its hash
    ok = np.array([s == "ok" and is_file_row(r) for s, r in zip(table["status"].to_pylist(),
                                                                 table.select(["page", "start_s"]).to_pylist(),
                                                                 strict=True)], dtype=bool)
    ok &= np.fromiter((keep(int(i)) for i in table["id"].to_numpy()), dtype=bool, count=len(table))
    rows = table.filter(ok).to_pylist()
    if len(rows) < 2:
        return []
    vectors = unit(index.stored_vectors.get(np.array([r["id"] for r in rows], dtype=np.int64)))
    documents = Documents(index, table, index.manifest.get("max_pages") or MAX_PAGES)
    first, second, _ = near_pairs(vectors, threshold)  # PDFs by their first pages: alike as wholes, alike there
    by_hash: dict[str, int] = {}
    links = [(by_hash.setdefault(r["content_hash"], i), i) for i, r in enumerate(rows) if r["content_hash"]]
    links += [(int(a), int(b)) for a, b in zip(first, second, strict=True)
              if comparable(rows[a], rows[b]) and documents.alike(rows[a], rows[b], threshold)]
    groups = []
    for positions in components(links):
        apart = shots(positions, rows, vectors)
        keepers = []
        for shot in apart:
            members = group_members(shot, rows, vectors, documents)
            keepers.append(next(p for p in shot if rows[p]["id"] == members[0].id))
            if len(members) > 1:
                same = len({m.content_hash for m in members}) == 1 and members[0].content_hash is not None
                groups.append(Group("exact" if same else "near", members[0].kind, members))
        if len(apart) > 1:
            members = group_members(keepers, rows, vectors, documents)
            groups.append(Group("similar", members[0].kind, members))
    return sorted(groups, key=lambda g: (GROUP_TYPES.index(g.type), g.keeper.path))


def shots(positions: list[int], rows: list[dict], vectors: np.ndarray) -> list[list[int]]:
    """The files of a group of alike ones, by the instant each was taken: one list a date taken; a file with
    no date joins the shot of the dated file it is most like (all one shot when fewer than two dates)."""
    by_time: dict[dt.datetime, list[int]] = {}
    for p in positions:
        if rows[p]["taken_at"] is not None:
            by_time.setdefault(rows[p]["taken_at"], []).append(p)
    if len(by_time) < 2:
        return [positions]
    dated = [p for shot in by_time.values() for p in shot]
    for p in positions:
        if rows[p]["taken_at"] is None:
            closest = dated[int(np.argmax(vectors[dated] @ vectors[p]))]
            by_time[rows[closest]["taken_at"]].append(p)
    return [sorted(shot) for shot in by_time.values()]


def group_members(positions: list[int], rows: list[dict], vectors: np.ndarray, documents: Documents) -> list[Member]:
    """The files at `positions`, the suggested keeper first (marked), each with its similarity to it."""
    ordered = sorted(((p, member(rows[p])) for p in positions), key=lambda pm: pm[1].keeper_order())
    keeper = ordered[0][0]
    for p, m in ordered:
        whole = documents.page_similarity(rows[p], rows[keeper]) if rows[p]["kind"] == "pdf" else None
        m.similarity = float(vectors[p] @ vectors[keeper]) if whole is None else whole
    ordered[0][1].keep = True
    return [m for _, m in ordered]


class Documents:
    """What a file's first row does not show: a PDF's other pages, and whether its vectors cover all of it."""

    def __init__(self, index: Any, table: Any, max_pages: int):
        import pyarrow.compute as pc

        self.index, self.max_pages = index, max_pages
        self.pages: dict[bytes, list[tuple[int, int | None]]] = {}  # path -> [(page, id when ok)], in page order
        pdf = table.filter(pc.fill_null(pc.equal(table["kind"], "pdf"), False)).select(["path_bytes", "page", "id",
                                                                                        "status"])
        for row in pdf.to_pylist():
            if row["page"] is not None:
                self.pages.setdefault(row["path_bytes"], []).append((row["page"], row["id"] if row["status"] == "ok"
                                                                     else None))
        for pages in self.pages.values():
            pages.sort()
        self.page_vectors: dict[bytes, np.ndarray] = {}

    def covered(self, row: dict) -> bool:
        """Whether the file's vectors saw all of it (a cut text or PDF can only match its exact copies)."""
        if row["kind"] == "text":
            return (row["tokens"] or 0) < MAX_TEXT_TOKENS
        if row["kind"] == "pdf":
            pages = self.pages.get(row["path_bytes"], [])
            return len(pages) < self.max_pages and all(item_id is not None for _, item_id in pages)
        return True

    def alike(self, a: dict, b: dict, threshold: float) -> bool:
        """Whether two files whose first rows are alike are alike as wholes: both covered, and two PDFs
        with the same pages, each within `threshold` of the same page of the other."""
        if not (self.covered(a) and self.covered(b)):
            return False
        least = self.page_similarity(a, b) if a["kind"] == "pdf" else threshold
        return least is not None and least >= threshold

    def page_similarity(self, a: dict, b: dict) -> float | None:
        """The least cosine of a PDF's pages with the same pages of another; None when their pages differ
        (or one failed)."""
        pages_a, pages_b = self.pages.get(a["path_bytes"], []), self.pages.get(b["path_bytes"], [])
        if [page for page, _ in pages_a] != [page for page, _ in pages_b] or not pages_a or any(
                item_id is None for _, item_id in pages_a + pages_b):
            return None
        return float(np.min(np.einsum("ij,ij->i", self.vectors(a), self.vectors(b))))

    def vectors(self, row: dict) -> np.ndarray:
        """A PDF's page vectors, unit length, in page order."""
        path = row["path_bytes"]
        if path not in self.page_vectors:
            ids = np.array([item_id for _, item_id in self.pages[path]], dtype=np.int64)
            self.page_vectors[path] = unit(self.index.stored_vectors.get(ids))
        return self.page_vectors[path]


def unit(vectors: np.ndarray) -> np.ndarray:
    """`vectors` scaled to length 1, in place."""
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


def near_pairs(vectors: np.ndarray, threshold: float, prefix_dim: int = PREFIX_DIM, margin: float = PREFIX_MARGIN,
               nprobe: int = IVF_NPROBE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row pairs (i < j) of unit `vectors` whose cosine is >= `threshold`, and that cosine.

    The NEIGHBOURS nearest of each vector by the renormalized first `prefix_dim` values, kept down to
    `threshold - margin` (exhaustive below FLAT_BELOW rows, else IVF with 4·sqrt(n) lists and `nprobe`
    probes), are the candidates, found in both directions; each pair is confirmed with the full vectors.
    """
    import faiss

    n = len(vectors)
    prefix = np.ascontiguousarray(vectors[:, :prefix_dim], dtype=np.float32)
    prefix /= np.maximum(np.linalg.norm(prefix, axis=1, keepdims=True), 1e-12)
    if n < FLAT_BELOW:
        candidates = faiss.IndexFlatIP(prefix.shape[1])
    else:
        lists = int(4 * n ** 0.5)
        candidates = faiss.index_factory(prefix.shape[1], f"IVF{lists},Flat", faiss.METRIC_INNER_PRODUCT)
        candidates.cp.max_points_per_centroid = IVF_TRAINING_PER_LIST
        candidates.train(prefix)
        candidates.nprobe = nprobe
    candidates.add(prefix)
    scores, found = candidates.search(prefix, min(n, NEIGHBOURS))
    query = np.repeat(np.arange(n, dtype=np.int64), found.shape[1]).reshape(found.shape)
    close = (scores >= threshold - margin) & (found >= 0)
    query, found = query[close], found[close]
    pairs = np.unique(np.minimum(query, found) * n + np.maximum(query, found))  # each pair once, either way found
    first, second = pairs // n, pairs % n
    other = first != second
    first, second = first[other], second[other]
    similarity = np.empty(len(first), dtype=np.float32)
    for start in range(0, len(first), 65536):
        a, b = first[start:start + 65536], second[start:start + 65536]
        similarity[start:start + 65536] = np.einsum("ij,ij->i", vectors[a], vectors[b])
    confirmed = similarity >= threshold
    return first[confirmed], second[confirmed], similarity[confirmed]


def comparable(a: dict, b: dict) -> bool:
    """Files of one kind; for videos, also of the same length (within the tolerance)."""
    if a["kind"] != b["kind"]:
        return False
    if a["kind"] != "video":
        return True
    da, db = a["duration_s"], b["duration_s"]
    if da is None or db is None:
        return da is db
    return abs(da - db) <= max(DURATION_TOLERANCE_S, DURATION_TOLERANCE * max(da, db))


def components(links: list[tuple[int, int]]) -> list[list[int]]:
    """The connected groups (two or more nodes) of an undirected graph given by its edges (union-find)."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in links:
        parent[root(a)] = root(b)
    groups: dict[int, list[int]] = {}
    for x in parent:
        groups.setdefault(root(x), []).append(x)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def member(row: dict) -> Member:
    modified = dt.datetime.fromtimestamp(row["mtime_ns"] / 1e9, dt.timezone.utc) if row["mtime_ns"] else None
    return Member(id=row["id"], path=row["path"], kind=row["kind"], size=row["size"], width=row["width"],
                  height=row["height"], duration_s=row["duration_s"], taken_at=row["taken_at"],
                  modified_at=modified, content_hash=row["content_hash"], fs_path=os.fsdecode(row["path_bytes"]))
