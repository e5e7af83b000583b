"""Two-stage retrieval over an index: the embedder finds candidates with FAISS, the
reranker (optional) re-scores the best of them.

    index = qvlsearch.open_index("~/.local/share/qvlsearch/index")
    for hit in index.search("dog on a beach", k=10, kind="image", rerank=True):
        print(hit.rank, hit.rerank_score, hit.path)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .fs import KindError, file_item
from .store import ITEM_SCHEMA, StoreError, read_faiss, read_items, read_manifest

QUERY_INSTRUCTION = "Retrieve images or text relevant to the user's query."
KINDS = ("image", "video", "text")
RESULT_COLUMNS = ["id", "path", "path_bytes", "kind", "duration_s", "status"]


@dataclass
class SearchResult:
    """One hit: `score` is the embedding similarity, `rerank_score` the reranker's P(yes) when reranked."""

    rank: int
    id: int | None
    path: str
    kind: str
    score: float | None
    rerank_score: float | None = None
    duration_s: float | None = None
    reranked: bool = False
    fs_path: str | None = None  # the path as the OS needs it (`path` is for display); not in JSON

    def to_json(self) -> dict[str, Any]:
        """The stable --json/--jsonl record: rank, path, kind, score, rerank_score (when reranked), id."""
        record = {"rank": self.rank, "path": self.path, "kind": self.kind, "score": rounded(self.score)}
        if self.reranked:
            record["rerank_score"] = rounded(self.rerank_score)
        record["id"] = self.id
        if self.duration_s is not None:
            record["duration_s"] = round(self.duration_s, 3)
        return record


def rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def set_search_knobs(index: Any, fetch: int) -> None:
    """Set an HNSW or IVF index's search-time knobs for `fetch` results (no-op for other indexes).

    A fetch of the whole index makes the search exhaustive (every IVF list probed), so that
    a filtered search that has widened to everything finds every item that passes the filter.
    """
    if hasattr(index, "hnsw"):
        # At 100k×2048, efSearch 64 found 86% of the true top 10, 256 found 95% in 3 ms a query.
        index.hnsw.efSearch = max(256, fetch)
    if hasattr(index, "nprobe"):
        everything = fetch >= index.ntotal
        index.nprobe = index.nlist if everything else min(index.nlist, max(16, index.nlist // 4))


def binary_candidates(fetch: int) -> int:
    """How many Hamming neighbours a binary index re-scores for `fetch` results."""
    return max(1024, 16 * fetch)


def kinds_of(kind: str | Iterable[str] | None) -> set[str]:
    """The kinds a `kind` filter names (none: every kind); raises InputError for an unknown one."""
    kinds = {kind} if isinstance(kind, str) else set(kind or ())
    if kinds - set(KINDS):
        raise InputError(f"kind must be one of {', '.join(KINDS)}, got {sorted(kinds - set(KINDS))}")
    return kinds


def query_item(query: str | Mapping | None, images: Iterable[str] = (), video: str | None = None) -> dict[str, Any]:
    """A query as an Embedder/Reranker item: text, images, a video, or a mix."""
    item: dict[str, Any] = dict(query) if isinstance(query, Mapping) else ({"text": query} if query else {})
    if images:
        item["image"] = list(images)
    if video:
        item["video"] = video
    if not item:
        raise InputError("a query needs text, an image or a video")
    return item


class SearchIndex:
    """A read-only view of an index directory, with the models loaded on first use.

    `preload` ("embedder", "reranker") starts loading those models in the background
    at once, so that they load while the index is read (what the CLI does);
    `reranker_model` names the reranker (default: Qwen3-VL-Reranker-2B).
    """

    def __init__(self, path: str | os.PathLike, *, device: str | None = None, embedder: Any = None,
                 reranker: Any = None, preload: Iterable[str] = (), reranker_model: str | None = None):
        self.path = Path(path).expanduser()
        self.manifest = read_manifest(self.path)
        self.device = device
        self.reranker_model = reranker_model
        self._embedder = embedder
        self._reranker = reranker
        loaders = {"embedder": self.load_embedder, "reranker": self.load_reranker}
        # One thread: transformers' lazy imports are not safe to run from two threads at once.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qvlsearch-model") as pool:
            self._loading: dict[str, Future] = {name: pool.submit(loaders[name]) for name in preload}
            self.read_index()

    def read_index(self) -> None:
        files = self.manifest.get("files", {})
        # Columns stay in Arrow: only the hits' rows ever become Python objects.
        self.items = (read_items(self.path / files["items"], columns=RESULT_COLUMNS) if files.get("items")
                      else ITEM_SCHEMA.empty_table().select(RESULT_COLUMNS))
        self.ids = self.items["id"].to_numpy()  # ascending: the store writes rows by id
        self.index = read_faiss(self.path / files["faiss"], self.manifest["quantize"]) if files.get("faiss") else None
        # FAISS row i holds the i-th ok item in id order (older indexes keep item ids in an IDMap2).
        in_faiss = self.items["status"].to_numpy(zero_copy_only=False) == "ok"
        self.row_ids = None if hasattr(self.index, "id_map") else self.ids[in_faiss]

    @cached_property
    def stored_vectors(self):
        """The float vectors, memory-mapped on the first binary search."""
        from .store import StoredVectors

        return StoredVectors(self.path, self.manifest)

    def __len__(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    @property
    def embedder(self):
        if self._embedder is None:
            self._embedder = self.loaded("embedder", self.load_embedder)
        return self._embedder

    @property
    def reranker(self):
        if self._reranker is None:
            self._reranker = self.loaded("reranker", self.load_reranker)
        return self._reranker

    def loaded(self, name: str, load: Callable[[], Any]) -> Any:
        """The model `name` from its preload (raising its error, if any), or loaded now."""
        loading = self._loading.pop(name, None)
        return loading.result() if loading else load()

    def load_embedder(self):
        from .embedder import Embedder

        m = self.manifest
        return Embedder(m["model"], device=self.device, min_pixels=m["min_pixels"], max_pixels=m["max_pixels"],
                        total_pixels=m["total_pixels"], fps=m["fps"], max_frames=m["max_frames"])

    def load_reranker(self):
        from .reranker import DEFAULT_RERANKER, Reranker

        return Reranker(self.reranker_model or DEFAULT_RERANKER, device=self.device)

    def query_vector(self, query: Mapping, instruction: str | None) -> np.ndarray:
        item = {**query, "instruction": instruction or QUERY_INSTRUCTION}
        return self.embedder.embed([item], dim=self.manifest["dim"])

    def search(self, query: str | Mapping, k: int = 10, *, kind: str | Iterable[str] | None = None,
               under: str | os.PathLike | None = None, min_score: float | None = None, rerank: bool = False,
               rerank_top: int = 50, reranker: str | None = None, instruction: str | None = None
               ) -> list[SearchResult]:
        """The `k` best files for `query`; filters apply before the cut, so `k` hits come back when there are `k`."""
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        query = query_item(query)
        keep = self.filter(kind, under)
        if len(self) == 0:
            return []
        hits = self.nearest(self.query_vector(query, instruction), max(k, rerank_top if rerank else k), keep,
                            min_score)
        results = [self.result(rank, item_id, score) for rank, (item_id, score) in enumerate(hits, 1)]
        if rerank and results:
            results = self.rerank_results(query, results, reranker)
        return results[:k]

    def filter(self, kind: str | Iterable[str] | None, under: str | os.PathLike | None) -> Callable[[int], bool]:
        """Which item ids pass the kind and folder filters."""
        import pyarrow as pa
        import pyarrow.compute as pc

        kinds = kinds_of(kind)
        allowed = np.ones(len(self.ids), dtype=bool)
        if kinds:
            in_kinds = pc.is_in(self.items["kind"], value_set=pa.array(sorted(kinds)))
            allowed &= pc.fill_null(in_kinds, False).to_numpy(zero_copy_only=False)
        if under is not None:  # in Arrow: no path becomes a Python object
            prefix = os.fsencode(os.path.abspath(os.path.expanduser(os.fspath(under))).rstrip(os.sep) + os.sep)
            starts = pc.binary_slice(self.items["path_bytes"], 0, len(prefix))
            below = pc.equal(starts, pa.scalar(prefix, pa.binary()))
            allowed &= pc.fill_null(below, False).to_numpy(zero_copy_only=False)

        def keep(item_id: int) -> bool:
            position = self.position(item_id)
            return position is not None and bool(allowed[position])

        return keep

    def position(self, item_id: int) -> int | None:
        """The row of `item_id` in `self.items`, or None."""
        position = int(np.searchsorted(self.ids, item_id))
        return position if position < len(self.ids) and self.ids[position] == item_id else None

    def nearest(self, vector: np.ndarray, k: int, keep: Callable[[int], bool],
                min_score: float | None) -> list[tuple[int, float]]:
        """FAISS search, widened until `k` hits pass the filter (or the index is exhausted)."""
        total, fetch = len(self), min(len(self), max(4 * k, 64))
        while True:
            scores, ids = self.raw_search(vector, fetch)
            hits = [(int(i), float(s)) for i, s in zip(ids, scores, strict=True) if i >= 0 and keep(int(i))]
            if min_score is not None:
                hits = [(i, s) for i, s in hits if s >= min_score]
            exhausted = fetch >= total or (min_score is not None and len(scores) and scores[-1] < min_score)
            if len(hits) >= k or exhausted:
                return hits[:k]
            fetch = min(total, fetch * 4)

    def raw_search(self, vector: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """The `fetch` nearest: (scores, item ids), ids -1 past the end."""
        import faiss

        if self.manifest["quantize"] == "binary":
            return self.binary_search(vector, fetch)
        set_search_knobs(faiss.downcast_index(self.index.index) if self.row_ids is None else self.index, fetch)
        scores, rows = self.index.search(np.ascontiguousarray(vector, dtype=np.float32), fetch)
        return scores[0], self.item_ids(rows[0])

    def binary_search(self, vector: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """The best of 16 times as many Hamming neighbours (at least 1024), by cosine with their stored vectors.

        Hamming distance alone is a coarse ranking (recall@10 0.75 at 100k×2048 in
        benchmarks/bench_search.py); re-scoring a thousand float16 vectors read from the
        memory-mapped segments takes a few milliseconds.
        """
        from .quantize import binary_encode

        _, rows = self.index.search(binary_encode(vector), min(len(self), binary_candidates(fetch)))
        ids = self.item_ids(rows[0])
        ids = ids[ids >= 0]
        candidates = self.stored_vectors.get(ids)[:, : self.manifest["dim"]]
        candidates /= np.maximum(np.linalg.norm(candidates, axis=1, keepdims=True), 1e-12)
        scores = candidates @ np.asarray(vector, dtype=np.float32)[0]
        best = np.argsort(-scores, kind="stable")[:fetch]
        return scores[best], ids[best]

    def item_ids(self, rows: np.ndarray) -> np.ndarray:
        if self.row_ids is None:
            return rows
        return np.where(rows >= 0, self.row_ids[np.maximum(rows, 0)], -1)

    def result(self, rank: int, item_id: int, score: float) -> SearchResult:
        row = self.items.slice(self.position(item_id), 1).to_pylist()[0]
        return SearchResult(rank=rank, id=item_id, path=row["path"], kind=row["kind"], score=score,
                            duration_s=row["duration_s"], fs_path=os.fsdecode(row["path_bytes"]))

    def rerank_results(self, query: Mapping, results: list[SearchResult], model: str | None) -> list[SearchResult]:
        """Order candidates by reranker score; a candidate that cannot be read goes last, unscored."""
        if model is not None and model != self.reranker_model:  # another reranker than the one (pre)loaded
            self.reranker_model, self._reranker = model, None
            self._loading.pop("reranker", None)
        scores = self.reranker.rerank(query, [document_item(r) for r in results], on_error="skip")
        return ranked_by_rerank(results, scores)


def document_item(result: SearchResult) -> dict[str, Any]:
    """A result's file as reranker input; an unreadable one yields an item that fails, reported per item."""
    path = result.fs_path or result.path
    try:
        return file_item(path, result.kind if result.kind in KINDS else None)
    except (OSError, KindError):
        return {"image": path} if result.kind != "video" else {"video": path}


def ranked_by_rerank(results: list[SearchResult], scores: list[float | None]) -> list[SearchResult]:
    """Sort by reranker score (unscored last, stable), then number the ranks again."""
    for r, s in zip(results, scores, strict=True):
        r.rerank_score, r.reranked = s, True
    ordered = sorted(results, key=lambda r: (r.rerank_score is None, -(r.rerank_score or 0.0)))
    for rank, r in enumerate(ordered, 1):
        r.rank = rank
    return ordered


def open_index(path: str | os.PathLike, *, device: str | None = None, preload: Iterable[str] = (),
               reranker_model: str | None = None) -> SearchIndex:
    """Open an index directory for searching (raises StoreError when there is none); see `SearchIndex`."""
    if not Path(path).expanduser().is_dir():
        raise StoreError(f"no index at {path}; create one with `qvlsearch index PATH --index {path}`")
    return SearchIndex(path, device=device, preload=preload, reranker_model=reranker_model)
