"""Two-stage retrieval over an index: the embedder finds candidates with FAISS and the words
index (SQLite FTS5, BM25) finds them by their words, the two fused by reciprocal rank; the
reranker (optional) re-scores the best of them.

    index = qvlsearch.open_index("~/.local/share/qvlsearch/index")
    for hit in index.search("dog on a beach", k=10, kind="image", rerank=True):
        print(hit.rank, hit.rerank_score, hit.path)

Filters (kind, folder, date taken, place, camera) apply before the top-k cut.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, SettingError
from .fs import KindError, file_item
from .moments import MOMENT_FRAMES
from .pages import PdfPage
from .store import Snapshot, StoreError, commit_key, normalized, read_manifest
from .words import check_mode, query_expression, reciprocal_rank_fusion

QUERY_INSTRUCTION = "Retrieve images or text relevant to the user's query."
KINDS = ("image", "video", "text", "pdf")
RESULT_COLUMNS = ["id", "path", "path_bytes", "kind", "duration_s", "status", "page", "start_s", "end_s"]
METADATA_COLUMNS = ["taken_at", "mtime_ns", "lat", "lon", "camera",  # read on first use, not at open
                    "live_video", "raw_file", "description", "keywords"]
SORTS = ("score", "date")
EARTH_RADIUS_KM = 6371.0088
NO_ROWS = np.zeros(0, dtype=np.int64)


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
    page: int | None = None  # a PDF page's number, from 1
    start_s: float | None = None  # a video moment's window, in seconds
    end_s: float | None = None
    taken_at: dt.datetime | None = None  # UTC
    lat: float | None = None
    lon: float | None = None
    camera: str | None = None
    modified_at: dt.datetime | None = None  # the file's mtime, for --sort date when taken_at is unknown; not in JSON
    matched: list[str] | None = None  # found by its words: those that matched, as the file writes them
    words_score: float | None = None  # found by its words: their BM25 score (higher is better)
    live_video: str | None = None  # a Live Photo's motion part
    raw_file: str | None = None  # the RAW beside this JPEG
    description: str | None = None  # from a sidecar
    keywords: list[str] | None = None  # from an XMP sidecar

    def to_json(self) -> dict[str, Any]:
        """The stable --json/--jsonl record: rank, path, kind, score (null in words mode), rerank_score (when
        reranked), id, then duration_s, page, start_s/end_s, taken_at (ISO 8601, UTC), lat, lon, camera,
        live_video, raw_file, description and keywords, and matched and words_score (for a hit found by its
        words), each only when known."""
        record = {"rank": self.rank, "path": self.path, "kind": self.kind, "score": rounded(self.score)}
        if self.reranked:
            record["rerank_score"] = rounded(self.rerank_score)
        record["id"] = self.id
        if self.duration_s is not None:
            record["duration_s"] = round(self.duration_s, 3)
        if self.page is not None:
            record["page"] = self.page
        if self.start_s is not None:
            record["start_s"], record["end_s"] = round(self.start_s, 3), round(self.end_s, 3)
        if self.taken_at is not None:
            record["taken_at"] = self.taken_at.isoformat()
        if self.lat is not None and self.lon is not None:
            record["lat"], record["lon"] = round(self.lat, 6), round(self.lon, 6)
        if self.camera is not None:
            record["camera"] = self.camera
        for name in ("live_video", "raw_file", "description", "keywords"):
            if getattr(self, name):
                record[name] = getattr(self, name)
        if self.matched is not None:
            record["matched"], record["words_score"] = self.matched, rounded(self.words_score)
        return record

    @property
    def date(self) -> dt.datetime | None:
        """When the file was taken, else when it was last modified."""
        return self.taken_at or self.modified_at


def rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def search_params(index: Any, fetch: int, deleted_rows: np.ndarray = NO_ROWS, exhaustive: bool = False
                  ) -> tuple[Any, Any]:
    """FAISS search parameters for `fetch` results that skip `deleted_rows`: (params, objects to keep alive).

    HNSW searches with efSearch 256 (at 100k×2048, 64 found 86% of the true top 10, 256 found 95% in
    3 ms a query); IVF probes a quarter of its lists, or all of them when the search must be exhaustive
    (a filter that has widened the search to every item).
    """
    import faiss

    selector = faiss.IDSelectorNot(batch := faiss.IDSelectorBatch(deleted_rows)) if len(deleted_rows) else None
    keep_alive = (selector, batch) if selector is not None else None
    if hasattr(index, "hnsw"):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=max(256, fetch)), keep_alive
    if hasattr(index, "nprobe"):
        nprobe = index.nlist if exhaustive else min(index.nlist, max(16, index.nlist // 4))
        return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe), keep_alive
    return (faiss.SearchParameters(sel=selector) if selector is not None else None), keep_alive


@cache
def segment_threads() -> ThreadPoolExecutor:
    """Threads that search one segment each, FAISS on one OpenMP thread in each.

    FAISS spreads a search over its queries, not over the vectors, so one query runs on one core
    whatever its thread count, and waiting for idle OpenMP threads costs milliseconds a call on a
    busy machine. Searching the segments side by side puts every core to work on one query.
    """
    import faiss

    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="qvlsearch-segment",
                              initializer=faiss.omp_set_num_threads, initargs=(1,))


@cache
def words_threads() -> ThreadPoolExecutor:
    """Threads that run a query's words lookup beside its embedding and vector search (one a query in flight)."""
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="qvlsearch-words")


# int8 searches take this many times the results asked for from FAISS and keep the best by cosine with
# the stored float16 vectors (as FAISS's IndexRefineFlat does): SQ8 codes alone found 98.9% of the true
# top 10 at 1M × 2048 (benchmarks/bench_store.py).
INT8_REFINE = 4


def binary_candidates(fetch: int) -> int:
    """How many Hamming neighbours a binary index re-scores for `fetch` results."""
    return max(1024, 16 * fetch)


def kinds_of(kind: str | Iterable[str] | None) -> set[str]:
    """The kinds a `kind` filter names (none: every kind); raises InputError for an unknown one."""
    names = [kind] if isinstance(kind, str) else list(kind or ())
    kinds = {k.strip() for name in names for k in name.split(",") if k.strip()}  # "image,video" too
    if kinds - set(KINDS):
        raise InputError(f"kind must be one of {', '.join(KINDS)}, got {sorted(kinds - set(KINDS))}")
    return kinds


def as_utc(value: str | dt.date | None, option: str) -> dt.datetime | None:
    """An ISO date or date-time (a date is its midnight; no zone is UTC; an instant before year 1 or after
    9999 in UTC is the first or last there is); raises InputError for anything else."""
    if value is None or isinstance(value, dt.datetime):
        when = value
    elif isinstance(value, dt.date):
        when = dt.datetime(value.year, value.month, value.day)
    else:
        try:
            when = dt.datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
        except ValueError:
            raise InputError(f"{option}: {value!r} is not a date; give an ISO date such as 2024-05-31 "
                             "or 2024-05-31T18:30") from None
    if when is None:
        return None
    if not when.tzinfo:
        return when.replace(tzinfo=dt.timezone.utc)
    try:
        return when.astimezone(dt.timezone.utc)
    except OverflowError:  # within a day of year 1 or 9999: the earliest or latest instant there is
        earliest = when.replace(tzinfo=None) - dt.datetime.min < when.utcoffset()
        return (dt.datetime.min if earliest else dt.datetime.max).replace(tzinfo=dt.timezone.utc)


def as_text(value: str | None, option: str) -> str | None:
    """`value` if it can be written as UTF-8; InputError for a lone surrogate (a JSON escape such as
    \\ud800, or a byte of a command line that is not UTF-8)."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"{option}: {value!r} is not valid text (it holds a lone surrogate); "
                             "give UTF-8 text") from None
    return value


def as_near(value: str | Sequence[float] | None) -> tuple[float, float, float] | None:
    """LAT,LON,KM as three numbers; raises InputError with an example for anything else."""
    if value is None:
        return None
    try:
        lat, lon, km = (float(part) for part in (value.split(",") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        lat = lon = km = float("nan")
    if not (-90 <= lat <= 90 and -180 <= lon <= 180 and km >= 0):
        raise InputError(f"--near: {value!r} is not LAT,LON,KM; give degrees and a radius such as "
                         "48.8584,2.2945,5 (latitude -90..90, longitude -180..180, km >= 0)")
    return lat, lon, km


def check_sort(sort: str) -> None:
    if sort not in SORTS:
        raise SettingError("sort", f"one of {', '.join(SORTS)}", sort)


def check_under(under: str | os.PathLike | None) -> None:
    """An --under that is no folder here is a mistyped one: say so, rather than find nothing."""
    if under is not None and not (folder := Path(under).expanduser()).is_dir():
        raise InputError(f"--under {os.fspath(under)}: {'not a folder' if folder.exists() else 'no such folder'}")


def check_filters(*, kind: str | Iterable[str] | None = None, under: str | os.PathLike | None = None,
                  after: str | dt.date | None = None, before: str | dt.date | None = None,
                  near: str | Sequence[float] | None = None, camera: str | None = None, sort: str = "score") -> None:
    """Check a search's options at once, before any index is read or model loaded (a command line's; a
    search checks them again): an InputError naming the option at fault."""
    kinds_of(kind)
    as_utc(after, "--after"), as_utc(before, "--before"), as_near(near), as_text(camera, "--camera")
    check_under(under)
    check_sort(sort)


def with_dates(records: list[dict], fs_paths: list[str]) -> list[dict]:
    """The records with the date that `--sort date` orders by, for tables: when taken, else when modified."""

    def modified(path: str) -> str:
        try:
            return dt.datetime.fromtimestamp(os.stat(path).st_mtime, dt.timezone.utc).isoformat()
        except OSError:
            return ""

    return [{**r, "date": (r.get("taken_at") or modified(path))[:19]} for r, path in zip(records, fs_paths,
                                                                                       strict=True)]


def distance_km(lat: np.ndarray, lon: np.ndarray, lat0: float, lon0: float) -> np.ndarray:
    """Great-circle (haversine) distances from (lat0, lon0), in km."""
    lat, lon, lat0, lon0 = map(np.radians, (lat, lon, lat0, lon0))
    h = np.sin((lat - lat0) / 2) ** 2 + np.cos(lat) * np.cos(lat0) * np.sin((lon - lon0) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0, 1)))


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
        """Open the newest committed generation (the columns stay in Arrow: only hits become Python objects)."""
        self.snapshot = Snapshot(self.path, RESULT_COLUMNS)
        self.manifest = self.snapshot.manifest
        self.items = self.snapshot.items
        self.ids = self.items["id"].to_numpy()  # ascending
        for cached in ("stored_vectors", "metadata"):  # read from the generation before, on first use
            self.__dict__.pop(cached, None)

    def refresh(self) -> bool:
        """Follow the writer: reopen when another commit is the newest (also of a rebuilt index); True if it did."""
        if commit_key(read_manifest(self.path)) == commit_key(self.manifest):
            return False
        self.read_index()
        return True

    @cached_property
    def metadata(self):
        """The items' date taken, mtime, place and camera (an Arrow table in the order of `items`)."""
        return self.item_columns(METADATA_COLUMNS)

    def item_columns(self, names: list[str]):
        """Some columns of the item table (an Arrow table, rows in the order of `items`), read now."""
        return self.snapshot.columns(names)

    @cached_property
    def stored_vectors(self):
        """The float vectors by id, memory-mapped from the segments."""
        from .store import StoredVectors

        return StoredVectors(self.snapshot)

    def __len__(self) -> int:
        return len(self.snapshot)

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

    def load_embedder(self, **options: Any):
        """The index's embedder, with its media settings; `options` are more `Embedder` arguments."""
        from .embedder import Embedder

        m = self.manifest
        return Embedder(m["model"], device=self.device, min_pixels=m["min_pixels"], max_pixels=m["max_pixels"],
                        total_pixels=m["total_pixels"], fps=m["fps"], max_frames=m["max_frames"], **options)

    def load_reranker(self):
        from .reranker import DEFAULT_RERANKER, Reranker

        return Reranker(self.reranker_model or DEFAULT_RERANKER, device=self.device)

    def query_vector(self, query: Mapping, instruction: str | None) -> np.ndarray:
        item = {**query, "instruction": instruction or QUERY_INSTRUCTION}
        return self.embedder.embed([item], dim=self.manifest["dim"])

    def search(self, query: str | Mapping, k: int = 10, *, kind: str | Iterable[str] | None = None,
               under: str | os.PathLike | None = None, min_score: float | None = None, rerank: bool = False,
               rerank_top: int = 50, reranker: str | None = None, instruction: str | None = None,
               after: str | dt.date | None = None, before: str | dt.date | None = None,
               near: str | Sequence[float] | None = None, camera: str | None = None, sort: str = "score",
               mode: str = "hybrid") -> list[SearchResult]:
        """The `k` best files for `query`; filters apply before the cut, so `k` hits come back when there are `k`.

        `mode`: "semantic" (the embedding's nearest), "words" (the query text's words, BM25; no model) or
        "hybrid" (both, fused by reciprocal rank; a query without text is semantic). `after`/`before`: ISO
        dates or datetimes, on the date taken or else the file's mtime (`after` keeps that instant and later,
        `before` what is earlier); `near`: (lat, lon, km) or "LAT,LON,KM"; `camera`: text found in the camera
        name, any case. `sort="date"` gives the same hits newest first.
        """
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        check_sort(sort)
        check_mode(mode)
        query = query_item(query)
        expression = query_expression(query["text"]) if mode != "semantic" and isinstance(query.get("text"),
                                                                                           str) else None
        if mode == "words":
            check_words_query(query, expression, min_score, self.path, self.snapshot.segments)
        keep = self.filter(kind, under, after=after, before=before, near=near, camera=camera)
        if len(self) == 0:
            return []
        wanted = max(k, rerank_top if rerank else k)
        # the words are looked up while the query is embedded and the vectors searched (SQLite, the model and
        # FAISS let go of Python's lock): hybrid costs the slower of the two, not their sum
        words = words_threads().submit(self.word_results, expression, wanted, keep) if expression else None
        vector = self.query_vector(query, instruction) if mode != "words" else None
        semantic = self.semantic_results(vector, wanted, keep, min_score) if vector is not None else []
        found = words.result() if words is not None else []
        results = semantic if expression is None else found if vector is None else self.fused(
            semantic, found, vector, wanted, min_score)
        results = results[:wanted]
        if rerank and results:
            results = self.rerank_results(query, results, reranker)
        results = results[:k]
        if sort == "date":
            results.sort(key=lambda r: r.date.timestamp() if r.date else float("-inf"), reverse=True)
            for rank, r in enumerate(results, 1):
                r.rank = rank
        return results

    def semantic_results(self, vector: np.ndarray, wanted: int, keep: Callable[[int], bool],
                         min_score: float | None) -> list[SearchResult]:
        """The `wanted` nearest hits by the embedding (a video's adjacent moments that match alike are one hit)."""
        fetch = wanted
        while True:  # adjacent moments merge into one hit: fetch more until `wanted` hits remain
            hits = self.nearest(vector, fetch, keep, min_score)
            results = merge_moments([self.result(rank, item_id, score) for rank, (item_id, score) in
                                     enumerate(hits, 1)])
            if len(results) >= wanted or len(hits) < fetch:
                return results[:wanted]
            fetch *= 2

    def word_results(self, expression: str, wanted: int, keep: Callable[[int], bool]) -> list[SearchResult]:
        """The `wanted` best hits by their words (BM25 over each segment, the filters applied), each with the words
        it matched."""
        segments = [segment for segment in self.snapshot.segments if segment.words is not None and segment.live]
        fetch = max(4 * wanted, 64)
        while True:  # widened until `wanted` hits pass the filters (deleted rows fail them), or none are left
            # side by side, as the vectors are searched: SQLite lets go of Python's lock while it works
            per_segment = list(segment_threads().map(lambda segment, fetch=fetch: segment.words.search(
                expression, fetch), segments))
            hits = sorted(((item_id, score, segment) for segment, found in zip(segments, per_segment, strict=True)
                           for item_id, score in found if keep(item_id)), key=lambda hit: -hit[1])[:wanted]
            if len(hits) >= wanted or all(len(found) < fetch for found in per_segment):
                break
            fetch *= 4
        matched: dict[int, list[str]] = {}
        for segment in {id(segment): segment for _, _, segment in hits}.values():
            matched.update(segment.words.matched(expression, [i for i, _, s in hits if s is segment]))
        results = []
        for rank, (item_id, score, _) in enumerate(hits, 1):
            result = self.result(rank, item_id, None)
            result.matched, result.words_score = matched.get(item_id, []), score
            results.append(result)
        return results

    def fused(self, semantic: list[SearchResult], found: list[SearchResult], vector: np.ndarray, wanted: int,
              min_score: float | None) -> list[SearchResult]:
        """Semantic and word hits fused by reciprocal rank; a hit found only by its words gets its embedding
        score too (from its stored vector), and `min_score` applies to it as to the others."""
        by_id = {r.id: r for r in semantic}
        for r in found:
            if r.id in by_id:
                by_id[r.id].matched, by_id[r.id].words_score = r.matched, r.words_score
        only_words = [r for r in found if r.id not in by_id]
        if only_words:
            stored = self.stored_vectors.get(np.array([r.id for r in only_words]))
            scores = normalized(stored, self.manifest["dim"]) @ np.asarray(vector, dtype=np.float32)[0]
            for r, score in zip(only_words, scores, strict=True):
                r.score = float(score)
                if min_score is None or r.score >= min_score:
                    by_id[r.id] = r
        order = reciprocal_rank_fusion([[r.id for r in semantic], [r.id for r in found if r.id in by_id]])
        results = [by_id[item_id] for item_id, _ in order[:wanted]]
        for rank, r in enumerate(results, 1):
            r.rank = rank
        return results

    def filter(self, kind: str | Iterable[str] | None, under: str | os.PathLike | None, *,
               after: str | dt.date | None = None, before: str | dt.date | None = None,
               near: str | Sequence[float] | None = None, camera: str | None = None) -> Callable[[int], bool]:
        """Which item ids pass the kind, folder, date, place and camera filters (see `search`)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        kinds = kinds_of(kind)
        after, before, near = as_utc(after, "--after"), as_utc(before, "--before"), as_near(near)
        camera = as_text(camera, "--camera")
        allowed = np.ones(len(self.ids), dtype=bool)
        if kinds:
            in_kinds = pc.is_in(self.items["kind"], value_set=pa.array(sorted(kinds)))
            allowed &= pc.fill_null(in_kinds, False).to_numpy(zero_copy_only=False)
        if under is not None:  # in Arrow: no path becomes a Python object
            prefix = under_prefix(under)
            starts = pc.binary_slice(self.items["path_bytes"], 0, len(prefix))
            below = pc.equal(starts, pa.scalar(prefix, pa.binary()))
            allowed &= pc.fill_null(below, False).to_numpy(zero_copy_only=False)
        if after is not None or before is not None:
            taken_us = self.metadata["taken_at"].cast(pa.int64())
            mtime_us = pc.divide(self.metadata["mtime_ns"], 1000)
            when_us = pc.coalesce(taken_us, mtime_us, pa.scalar(np.iinfo(np.int64).min)).to_numpy()
            if after is not None:
                allowed &= when_us >= epoch_us(after)
            if before is not None:
                allowed &= when_us < epoch_us(before)
        if near is not None:
            lat = pc.fill_null(self.metadata["lat"], np.nan).to_numpy(zero_copy_only=False)
            lon = pc.fill_null(self.metadata["lon"], np.nan).to_numpy(zero_copy_only=False)
            with np.errstate(invalid="ignore"):
                allowed &= distance_km(lat, lon, near[0], near[1]) <= near[2]  # NaN (no position) is never near
        if camera is not None:
            found = pc.match_substring(self.metadata["camera"], camera, ignore_case=True)
            allowed &= pc.fill_null(found, False).to_numpy(zero_copy_only=False)

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
        """The `fetch` nearest live items over every segment: (scores, item ids), best first."""
        query = np.ascontiguousarray(vector, dtype=np.float32)
        exhaustive = fetch >= len(self)
        live = [segment for segment in self.snapshot.segments if segment.live]
        found = list(segment_threads().map(lambda segment: self.segment_search(segment, query, fetch, exhaustive),
                                           live))
        scores = np.concatenate([f[0] for f in found]) if found else np.zeros(0, np.float32)
        ids = np.concatenate([f[1] for f in found]) if found else np.zeros(0, np.int64)
        best = np.argsort(-scores, kind="stable")[:fetch]
        return scores[best], ids[best]

    def segment_search(self, segment, query: np.ndarray, fetch: int, exhaustive: bool) -> tuple[np.ndarray, np.ndarray]:
        """One segment's best `fetch`, deleted items left out inside FAISS (an ID selector)."""
        quantize = self.manifest["quantize"]
        if quantize == "binary":
            return self.binary_search(segment, query, fetch)
        wanted = min(segment.live, fetch * INT8_REFINE if quantize == "int8" else fetch)
        params, keep_alive = search_params(segment.index, wanted, segment.deleted_rows, exhaustive)
        scores, rows = segment.index.search(query, wanted, params=params)
        del keep_alive
        hit = rows[0] >= 0
        found = rows[0][hit]
        if quantize == "int8":  # every hit's score is the cosine, in a segment of any size
            if segment.answers_ids:  # item ids: their rows
                order = np.argsort(segment.ok_ids, kind="stable")
                found = order[np.searchsorted(segment.ok_ids, found, sorter=order)]
            return self.rescored(segment, found, query, fetch)
        return scores[0][hit], found if segment.answers_ids else segment.ok_ids[found]

    def binary_search(self, segment, query: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """The best of 16 times as many Hamming neighbours (at least 1024), by cosine with their stored vectors.

        Hamming distance alone is a coarse ranking (recall@10 0.75 at 100k×2048 in
        benchmarks/bench_search.py); re-scoring a thousand float16 vectors read from the
        memory-mapped segment takes a few milliseconds.
        """
        from .quantize import binary_encode

        wanted = min(len(segment.ok_ids), binary_candidates(fetch) + len(segment.deleted_rows))
        _, rows = segment.index.search(binary_encode(query), wanted)
        rows = rows[0][rows[0] >= 0]
        return self.rescored(segment, rows[~np.isin(rows, segment.deleted_rows)], query, fetch)

    def rescored(self, segment, rows: np.ndarray, query: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """The best `fetch` of a segment's `rows` by cosine with their stored float16 vectors: (scores, item ids)."""
        rows = np.sort(rows)
        scores = normalized(segment.vectors[rows], self.manifest["dim"]) @ query[0]
        best = np.argsort(-scores, kind="stable")[:fetch]
        return scores[best], segment.ok_ids[rows[best]]

    def result(self, rank: int, item_id: int, score: float) -> SearchResult:
        position = self.position(item_id)
        row = self.items.slice(position, 1).to_pylist()[0]
        meta = self.metadata.slice(position, 1).to_pylist()[0]
        modified = dt.datetime.fromtimestamp(meta["mtime_ns"] / 1e9, dt.timezone.utc) if meta["mtime_ns"] else None
        return SearchResult(rank=rank, id=item_id, path=row["path"], kind=row["kind"], score=score,
                            duration_s=row["duration_s"], fs_path=os.fsdecode(row["path_bytes"]), page=row["page"],
                            start_s=row["start_s"], end_s=row["end_s"], taken_at=meta["taken_at"], lat=meta["lat"],
                            lon=meta["lon"], camera=meta["camera"], modified_at=modified,
                            live_video=meta["live_video"], raw_file=meta["raw_file"],
                            description=meta["description"], keywords=meta["keywords"])

    def rerank_results(self, query: Mapping, results: list[SearchResult], model: str | None) -> list[SearchResult]:
        """Order candidates by reranker score; a candidate that cannot be read goes last, unscored."""
        if model is not None and model != self.reranker_model:  # another reranker than the one (pre)loaded
            self.reranker_model, self._reranker = model, None
            self._loading.pop("reranker", None)
        scores = self.reranker.rerank(query, [document_item(r) for r in results], on_error="skip")
        return ranked_by_rerank(results, scores)


def check_words_query(query: Mapping, expression: str | None, min_score: float | None, path: Path,
                      segments: Sequence[Any]) -> None:
    """A words-mode search needs words to look for, an index that has words, and no embedding score."""
    if expression is None:
        raise InputError("--mode words needs query text with a word in it (images and videos have none); "
                         "use --mode semantic or hybrid")
    if min_score is not None:
        raise InputError("--min-score is an embedding score; it does not go with --mode words")
    if segments and all(segment.words is None for segment in segments):
        raise StoreError(f"the index at {path} has no words yet (it was made before words were indexed); run "
                         "`qvlsearch index` on its folders once to add them (nothing is embedded again)")


def under_prefix(under: str | os.PathLike) -> bytes:
    """The bytes every path below the folder `under` starts with; InputError when it cannot be a path."""
    folder = os.path.abspath(os.path.expanduser(os.fspath(under))).rstrip(os.sep) + os.sep
    try:
        return os.fsencode(folder)
    except UnicodeEncodeError:  # not one of the surrogates os.fsdecode makes of a byte that is not UTF-8
        raise InputError(f"--under: {os.fspath(under)!r} is not a folder path (it holds a lone surrogate); "
                         "give the path as UTF-8") from None


def epoch_us(when: dt.datetime) -> int:
    return int((when - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) / dt.timedelta(microseconds=1))


def document_item(result: SearchResult) -> dict[str, Any]:
    """A result as reranker input: the file, or its page or moment; an unreadable one yields an item that fails,
    reported per item."""
    path = result.fs_path or result.path
    if result.page is not None or result.kind == "pdf":
        return {"image": PdfPage(path, result.page or 1)}
    if result.start_s is not None:
        return {"video": path, "video_start": result.start_s, "video_end": result.end_s, "max_frames": MOMENT_FRAMES}
    try:
        return file_item(path, result.kind if result.kind in KINDS else None)
    except (OSError, KindError):
        return {"image": path} if result.kind != "video" else {"video": path}


MOMENT_MERGE_MARGIN = 0.03  # an adjacent moment scoring within this of a hit's best extends that hit


def merge_moments(results: list[SearchResult]) -> list[SearchResult]:
    """Hits on adjacent (or overlapping) moments of one video that match alike (scores within
    MOMENT_MERGE_MARGIN of the best) become one hit: the best score, the union of the windows.
    `results` are best first; the ranks are numbered again."""
    merged: list[SearchResult] = []
    by_path: dict[str, list[SearchResult]] = {}
    for r in results:
        if r.start_s is None:
            merged.append(r)
            continue
        group = by_path.setdefault(r.path, [])
        touching = [m for m in group if m.start_s <= r.end_s + 1e-6 and r.start_s <= m.end_s + 1e-6
                    and (r.score or 0.0) >= (m.score or 0.0) - MOMENT_MERGE_MARGIN]
        if not touching:
            group.append(r)
            merged.append(r)
            continue
        best = touching[0]
        best.start_s = min(m.start_s for m in (*touching, r))
        best.end_s = max(m.end_s for m in (*touching, r))
        for other in touching[1:]:
            group.remove(other)
            merged.remove(other)
    for rank, r in enumerate(merged, 1):
        r.rank = rank
    return merged


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
