"""Search quality on a user's own labelled queries, for choosing `--dim`, `--quantize` and `--rerank-top`.

For each (dim, quantize) setting, an in-memory flat FAISS index is built from the index's stored
float16 vectors (documents are not embedded again) and every query, embedded once at full width
and cut, is searched as `qvlsearch search` searches; reported: recall@1/5/10, nDCG@10, MRR@10 and
the mean search time per query, and with reranking the same after the reranker re-orders the
best max(k, rerank_top) candidates (as `qvlsearch search --rerank` does). Each setting is reported
in the three search modes side by side: semantic (the vectors), words (the words index, the same
at every setting) and hybrid (the two fused by reciprocal rank, as `search --mode hybrid` does).

Files are judged, not rows: a file with several rows (a PDF's pages, a video's moments) is found at
the rank of its best row, and counts once; the ranking is the files in the order of their best rows.

With media settings (`--max-pixels`, `--fps`, `--max-frames`), the labelled files (those the qrels name
that the index holds) are embedded again at each setting, and only they: the other files keep the
index's vectors, so each row shows what that setting would change in this library's rankings, beside
the seconds it takes per item (a photo, a PDF page, a video or one of its moments). The vectors are
cached per model, setting and file (size and mtime) in the index's cache/eval/ folder: a second run
embeds nothing again.

Queries are JSON lines: {"id": "q1", "text": "a cat on a sofa"} (also "image", "video",
"instruction"). Qrels are BEIR-style TSV: query-id, corpus-id, score, one judgement a line (a
header line is allowed); corpus-id is a file path, absolute or relative to the qrels file's
folder; score > 0 is relevant, and its value is the gain in nDCG.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .errors import QvlsearchError, SettingError
from .fs import display_path
from .indexer import MIN_DIM
from .limits import VisionOptions
from .quantize import binary_encode
from .search import INT8_REFINE, QUERY_INSTRUCTION, SearchIndex, binary_candidates, document_item
from .store import QUANTIZATIONS, build_faiss, faiss_factory, normalized
from .words import query_expression, reciprocal_rank_fusion

log = logging.getLogger("qvlsearch")
QUERY_EXAMPLE = '{"id": "q1", "text": "a cat asleep on a chair"}'
QRELS_EXAMPLE = "q1<TAB>photos/cat.jpg<TAB>1"


class EvalInputError(QvlsearchError):
    """A queries or qrels file, or a setting, that eval cannot use."""


@dataclass
class Query:
    id: str
    item: dict[str, Any]  # Embedder/Reranker input, with its instruction


@dataclass
class Setting:
    """The figures of one (dim, quantize) setting, without or with reranking."""

    dim: int
    quantize: str
    rerank_top: int | None
    metrics: dict[str, float]
    latency_ms: float  # mean search time per query (no query embedding, no reranking)
    mode: str = "semantic"  # semantic, words or hybrid

    def to_json(self) -> dict[str, Any]:
        return {"dim": self.dim, "quantize": self.quantize, "mode": self.mode, "rerank_top": self.rerank_top,
                **{k: round(v, 4) for k, v in self.metrics.items()}, "latency_ms": round(self.latency_ms, 3)}


@dataclass
class MediaSetting:
    """The figures at one media setting: search at the index's dim and quantization, with the labelled files
    embedded at this setting (the index's own: its stored vectors)."""

    options: VisionOptions
    own: bool  # the index's own setting
    metrics: dict[str, float]
    seconds_per_item: float | None  # mean embedding time of a labelled item at this setting (None: none embedded)
    embedded: int  # items embedded in this run (the rest came from the cache)
    cached: int

    def to_json(self) -> dict[str, Any]:
        o = self.options
        return {"max_pixels": o.max_pixels, "fps": o.fps, "max_frames": o.max_frames, "index_setting": self.own,
                **{k: round(v, 4) for k, v in self.metrics.items()},
                "seconds_per_item": None if self.seconds_per_item is None else round(self.seconds_per_item, 3),
                "embedded": self.embedded, "cached": self.cached}


@dataclass
class Report:
    settings: list[Setting]
    queries: int  # in the queries file
    evaluated: int  # with at least one relevant file in the index
    judgements: int  # qrels lines
    missing_files: list[str]  # qrels paths not among the index's ok files
    unknown_queries: list[str]  # qrels query ids not in the queries file
    failed_queries: list[tuple[str, str]] = field(default_factory=list)  # (id, error)
    embed_ms: float = 0.0  # mean query embedding time
    rerank_ms: float | None = None  # mean reranker time for one query's max(k, rerank_top) candidates
    media_settings: list[MediaSetting] = field(default_factory=list)
    failed_items: list[tuple[str, str]] = field(default_factory=list)  # (file, error) at a media setting

    def to_json(self) -> dict[str, Any]:
        return {"queries": self.queries, "evaluated": self.evaluated, "judgements": self.judgements,
                "missing_files": self.missing_files, "unknown_queries": self.unknown_queries,
                "failed_queries": [{"id": i, "error": e} for i, e in self.failed_queries],
                "query_embedding_ms": round(self.embed_ms, 3),
                "rerank_ms": None if self.rerank_ms is None else round(self.rerank_ms, 3),
                "settings": [s.to_json() for s in self.settings],
                "media_settings": [s.to_json() for s in self.media_settings],
                "failed_items": [{"path": p, "error": e} for p, e in self.failed_items]}


def read_queries(path: Path) -> list[Query]:
    """The queries file; raises EvalInputError naming the line and showing the right form."""
    queries: dict[str, Query] = {}
    for number, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalInputError(f"{path}:{number}: not JSON ({exc.msg}); each line is a query such as "
                                 f"{QUERY_EXAMPLE}") from None
        if not (isinstance(record, dict) and isinstance(record.get("id"), (str, int))
                and any(record.get(key) for key in ("text", "image", "video"))):
            raise EvalInputError(f"{path}:{number}: a query needs an \"id\" and a \"text\", \"image\" or \"video\", "
                                 f"such as {QUERY_EXAMPLE}")
        query_id = str(record["id"])
        if query_id in queries:
            raise EvalInputError(f"{path}:{number}: query id {query_id!r} is used twice")
        item = {k: record[k] for k in ("text", "image", "video") if record.get(k)}
        queries[query_id] = Query(query_id, {**item, "instruction": record.get("instruction") or QUERY_INSTRUCTION})
    return list(queries.values())


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """query id -> {absolute display path: relevance}; raises EvalInputError naming a malformed line."""
    qrels: dict[str, dict[str, int]] = {}
    base = os.path.dirname(os.path.abspath(path))
    for number, line in enumerate(read_lines(path), 1):
        if not line.strip() or (number == 1 and line.lower().startswith("query-id")):
            continue
        fields = line.rstrip("\r\n").split("\t")
        try:
            query_id, corpus_id, score = fields
            relevance = int(score)
        except ValueError:
            raise EvalInputError(f"{path}:{number}: expected query-id, corpus-id and an integer score separated "
                                 f"by tabs, such as {QRELS_EXAMPLE}") from None
        if not (query_id and corpus_id):
            raise EvalInputError(f"{path}:{number}: empty query-id or corpus-id; expected e.g. {QRELS_EXAMPLE}")
        file = display_path(os.path.normpath(os.path.join(base, os.path.expanduser(corpus_id))))
        qrels.setdefault(query_id, {})[file] = relevance
    return qrels


def read_lines(path: Path) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalInputError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def parse_settings(dims: str | Sequence[int | str] | None, quantize: str | Sequence[str] | None,
                   manifest: dict[str, Any]) -> list[tuple[int, str]]:
    """(dim, quantize) pairs from '128,256,full' and 'none,int8,binary' (default: the index's own)."""
    def items(value: Any) -> list[str]:
        return [str(v).strip() for v in (value.split(",") if isinstance(value, str) else value)]

    full = manifest["full_dim"]
    dim_list = []
    for value in items(dims) if dims is not None else [str(manifest["dim"])]:
        dim = full if value == "full" else int(value) if value.isdigit() else 0
        if not MIN_DIM <= dim <= full:
            raise EvalInputError(f"--dims: {value!r} is not a dimension qvlsearch searches at; give numbers from "
                                 f"{MIN_DIM} to {full} or 'full', such as 128,256,full")
        dim_list.append(dim)
    quantizations = items(quantize) if quantize is not None else [manifest["quantize"]]
    for value in quantizations:
        if value not in QUANTIZATIONS:
            raise EvalInputError(f"--quantize: {value!r} is not one of {', '.join(QUANTIZATIONS)}; "
                                 "such as none,int8,binary")
    for dim in dim_list:
        if "binary" in quantizations and dim % 8:
            raise EvalInputError(f"--dims: binary vectors need a dimension that is a multiple of 8, got {dim}")
    return [(d, q) for d in dict.fromkeys(dim_list) for q in dict.fromkeys(quantizations)]


def parse_media_settings(max_pixels: str | None, fps: str | None, max_frames: str | None,
                         manifest: dict[str, Any]) -> list[VisionOptions]:
    """The index's own media setting, then each combination of the values given ('1843200,401408' for
    --max-pixels; the index's value where an option is not given); an empty list when none is given."""
    if max_pixels is None and fps is None and max_frames is None:
        return []

    def values(option: str, given: str | None, kind: type) -> list:
        if given is None:
            return [manifest[option.replace("-", "_")]]
        try:
            return [kind(v.strip()) for v in given.split(",")]
        except ValueError:
            raise EvalInputError(f"--{option}: {given!r} is not a list of numbers; give e.g. "
                                 f"{'1843200,401408,200704' if option == 'max-pixels' else '0.5,1'}") from None

    own = VisionOptions(manifest["min_pixels"], manifest["max_pixels"], manifest["total_pixels"], manifest["fps"],
                        manifest["max_frames"])
    settings = [own]
    for pixels in values("max-pixels", max_pixels, int):
        for rate in values("fps", fps, float):
            for frames in values("max-frames", max_frames, int):
                try:
                    option = VisionOptions(min(own.min_pixels, pixels), pixels, own.total_pixels, rate, frames)
                except SettingError as exc:
                    raise EvalInputError(str(exc)) from None
                if option not in settings:
                    settings.append(option)
    return settings


def metrics(ranked: Sequence[Hashable], relevant: dict[Hashable, int], k: int) -> dict[str, float]:
    """recall@1, @5, @10 (and @k), nDCG@k (linear gains) and MRR@k of one ranked list of distinct files."""
    hits = [relevant.get(item, 0) for item in ranked[:k]]
    total = sum(1 for grade in relevant.values() if grade > 0)
    cuts = sorted({c for c in (1, 5, 10, k) if c <= k})
    figures = {f"recall@{c}": sum(1 for grade in hits[:c] if grade > 0) / total for c in cuts}
    ideal = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    dcg = sum(grade / math.log2(rank + 2) for rank, grade in enumerate(hits))
    figures[f"ndcg@{k}"] = dcg / sum(grade / math.log2(rank + 2) for rank, grade in enumerate(ideal))
    figures[f"mrr@{k}"] = next((1 / (rank + 1) for rank, grade in enumerate(hits) if grade > 0), 0.0)
    return figures


def evaluate(index: SearchIndex, queries: list[Query], qrels: dict[str, dict[str, int]], *, k: int = 10,
             settings: Iterable[tuple[int, str]] = (), rerank: bool = False, rerank_top: int = 50,
             modes: Sequence[str] = ("semantic", "words", "hybrid"), media_settings: Sequence[VisionOptions] = ()
             ) -> Report:
    """Figures for each (dim, quantize) setting and search mode over the queries that have a relevant file in the
    index (an index without words yet: semantic only), and for each media setting (the first: the index's own;
    see `parse_media_settings`)."""
    if k < 1 or rerank_top < 1:
        raise EvalInputError(f"-k and --rerank-top must be at least 1, got {k} and {rerank_top}")
    if not any(segment.words is not None for segment in index.snapshot.segments):
        modes = [mode for mode in modes if mode == "semantic"]
    ok = index.items["status"].to_numpy(zero_copy_only=False) == "ok"
    ids = index.ids[ok]
    file_of = dict(zip(ids.tolist(), index.items["path"].filter(ok).to_pylist(), strict=True))  # row id -> file
    indexed = set(file_of.values())
    known = {q.id for q in queries}
    missing = sorted({path for judged in qrels.values() for path in judged if path not in indexed})
    relevant = {q.id: {p: g for p, g in qrels.get(q.id, {}).items() if p in indexed} for q in queries}
    scored = [q for q in queries if any(g > 0 for g in relevant[q.id].values())]
    report = Report([], len(queries), 0, sum(len(j) for j in qrels.values()), missing,
                    sorted(set(qrels) - known))
    started = time.perf_counter()
    vectors_of: dict[str, np.ndarray] = {}
    for result in index.embedder.embed_iter([q.item for q in scored]):
        if result.error is None:
            vectors_of[scored[result.index].id] = result.vector
        else:
            report.failed_queries.append((scored[result.index].id, str(result.error)))
    report.embed_ms = 1000 * (time.perf_counter() - started) / max(len(scored), 1)
    scored = [q for q in scored if q.id in vectors_of]
    report.evaluated = len(scored)
    if not scored or not len(ids):
        return report
    documents = index.stored_vectors.get(ids)
    depth = max(k, 10, rerank_top if rerank else 0)
    rerank_cache: dict[tuple[str, int], float | None] = {}
    rerank_seconds, reranked_docs = 0.0, 0
    word_rows, words_latency = word_rankings(index, scored, file_of, depth) if set(modes) - {"semantic"} else ({}, 0)
    for dim, quantize in settings:
        semantic_rows, semantic_latency = search_all(Searcher(documents, ids, dim, quantize), scored, vectors_of,
                                                     file_of, depth)
        for mode in modes:
            rows = (semantic_rows if mode == "semantic" else word_rows if mode == "words" else
                    {q.id: [i for i, _ in reciprocal_rank_fusion([semantic_rows[q.id], word_rows[q.id]])]
                     for q in scored})
            latency = {"semantic": semantic_latency, "words": words_latency}.get(mode, semantic_latency + words_latency)
            ranked = {q_id: files_of(found, file_of) for q_id, found in rows.items()}
            report.settings.append(Setting(dim, quantize, None, mean_metrics(ranked, relevant, k), latency, mode))
            if not rerank:
                continue
            for q in scored:
                candidates = rows[q.id][:max(k, rerank_top)]  # what `search -k K --rerank-top R` reranks
                fresh = [i for i in candidates if (q.id, i) not in rerank_cache]
                if fresh:
                    started = time.perf_counter()
                    scores = index.reranker.rerank(q.item, [document_item(index.result(0, i, 0.0)) for i in fresh],
                                                   on_error="skip")
                    rerank_seconds += time.perf_counter() - started
                    reranked_docs += len(fresh)
                    rerank_cache.update({(q.id, i): s for i, s in zip(fresh, scores, strict=True)})
                ranked[q.id] = files_of(sorted(candidates, key=lambda i, q=q: (rerank_cache[(q.id, i)] is None,
                                                                               -(rerank_cache[(q.id, i)] or 0.0))),
                                        file_of)
            report.settings.append(Setting(dim, quantize, rerank_top, mean_metrics(ranked, relevant, k), latency,
                                           mode))
    if reranked_docs:
        report.rerank_ms = 1000 * rerank_seconds / reranked_docs * max(k, rerank_top)
    if media_settings:
        labelled = {path for judged in qrels.values() for path in judged if path in indexed}
        compare_media(index, report, media_settings, documents, ids, file_of, labelled,
                      partial(search_all, scored=scored, vectors_of=vectors_of, file_of=file_of, depth=depth),
                      relevant, k)
    return report


def word_rankings(index: SearchIndex, queries: list[Query], file_of: dict[int, str], depth: int
                  ) -> tuple[dict[str, list[int]], float]:
    """Each query's best rows by its words (none for a query without text), and the mean time a query."""
    ranked, started = {}, time.perf_counter()
    for q in queries:
        text = q.item.get("text")
        expression = query_expression(text) if isinstance(text, str) else None
        ranked[q.id] = [] if expression is None else rows_for_files(
            lambda n, expression=expression: [r.id for r in index.word_results(expression, n, file_of.__contains__)],
            file_of, depth)
    return ranked, 1000 * (time.perf_counter() - started) / max(len(queries), 1)


def search_all(searcher: Searcher, scored: list[Query], vectors_of: dict[str, np.ndarray], file_of: dict[int, str],
               depth: int) -> tuple[dict[str, list[int]], float]:
    """Each query's best rows (as many as hold `depth` files) and the mean search time in ms."""
    searcher.search(vectors_of[scored[0].id], depth)  # untimed: FAISS's first call sets up threads
    rows, seconds = {}, 0.0
    for q in scored:
        started = time.perf_counter()
        rows[q.id] = rows_for_files(partial(searcher.search, vectors_of[q.id]), file_of, depth)
        seconds += time.perf_counter() - started
    return rows, 1000 * seconds / len(scored)


def compare_media(index: SearchIndex, report: Report, media_settings: list[VisionOptions], documents: np.ndarray,
                  ids: np.ndarray, file_of: dict[int, str], labelled: set[str],
                  search: Callable[[Searcher], tuple[dict[str, list[int]], float]],
                  relevant: dict[str, dict[str, int]], k: int) -> None:
    """A MediaSetting for each of `media_settings`: the labelled files' rows embedded again at it (or read from
    the cache), put in place of their stored vectors, and every query searched at the index's dim and
    quantization."""
    m = index.manifest
    position = {item_id: n for n, item_id in enumerate(ids.tolist())}
    rows_of: dict[str, list[int]] = {}
    for item_id, path in file_of.items():
        if path in labelled:
            rows_of.setdefault(path, []).append(item_id)
    cache = EvalCache(Path(index.path) / "cache" / "eval")
    for options in media_settings:
        own = options == media_settings[0]
        embedder = index.embedder.with_options(options)
        at_setting = documents.copy()
        seconds, timed, embedded, cached = 0.0, 0, 0, 0
        for path, item_ids in sorted(rows_of.items()):
            results = [index.result(0, i, 0.0) for i in item_ids]
            key = cache.key(m, options, results)
            entry = cache.get(key) if key else None
            if entry is None:
                items = [{**document_item(r), "instruction": m["instruction"]} for r in results]
                started = time.perf_counter()
                vectors = np.full((len(items), embedder.dim), np.nan, dtype=np.float32)
                for result in embedder.embed_iter(items):
                    if result.error is None:
                        vectors[result.index] = result.vector
                    else:
                        report.failed_items.append((path, f"at max_pixels {options.max_pixels}: {result.error}"))
                entry = (vectors, time.perf_counter() - started)
                embedded += len(items)
                if key and not np.isnan(vectors).any():
                    cache.put(key, *entry)
            else:
                cached += len(item_ids)
            vectors, spent = entry
            seconds, timed = seconds + spent, timed + len(item_ids)
            if not own:  # the index's own setting searches its stored vectors, as `search` does
                for item_id, vector in zip(item_ids, vectors, strict=True):
                    if not np.isnan(vector).any():
                        at_setting[position[item_id]] = vector[: at_setting.shape[1]]
        rows, _ = search(Searcher(at_setting, ids, m["dim"], m["quantize"]))
        ranked = {q_id: files_of(found, file_of) for q_id, found in rows.items()}
        report.media_settings.append(MediaSetting(options, own, mean_metrics(ranked, relevant, k),
                                                  seconds / timed if timed else None, embedded, cached))


class EvalCache:
    """Vectors of labelled files at a media setting, with the seconds they took, one .npz file each; keyed by
    the model, the setting and the file (path, size, mtime). A cache that cannot be written is only slower."""

    def __init__(self, folder: Path):
        self.folder = folder

    def key(self, manifest: dict[str, Any], options: VisionOptions, results: list[Any]) -> str | None:
        """The entry's name for these rows of one file; None when the file cannot be read (its rows then fail)."""
        try:
            stat = os.stat(results[0].fs_path or results[0].path)
        except OSError:
            return None
        identity = [manifest["model"], manifest.get("model_revision"), manifest["instruction"],
                    dataclasses.asdict(options), results[0].fs_path, stat.st_size, stat.st_mtime_ns,
                    [(r.page, r.start_s, r.end_s) for r in results]]
        return hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()[:32]

    def get(self, key: str) -> tuple[np.ndarray, float] | None:
        try:
            with np.load(self.folder / f"{key}.npz") as entry:
                return entry["vectors"], float(entry["seconds"])
        except (OSError, ValueError, KeyError):
            return None

    def put(self, key: str, vectors: np.ndarray, seconds: float) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            temporary = self.folder / f".{key}.{os.getpid()}.npz"
            np.savez(temporary, vectors=vectors, seconds=seconds)
            os.replace(temporary, self.folder / f"{key}.npz")
        except OSError as exc:
            log.debug("eval cache not written: %s", exc)


def rows_for_files(search: Callable[[int], list[int]], file_of: dict[int, str], files: int) -> list[int]:
    """The best rows (item ids) from `search(n)`, as many as it takes to hold `files` distinct files (or all)."""
    fetch = files
    while True:
        found = search(fetch)
        if len(found) < fetch or len(set(map(file_of.get, found))) >= files:
            return found
        fetch *= 2


def files_of(rows: Iterable[int], file_of: dict[int, str]) -> list[str]:
    """Ranked rows as ranked files: each file once, at the rank of its best row."""
    return list(dict.fromkeys(file_of[i] for i in rows))


def mean_metrics(ranked: dict[str, list[str]], relevant: dict[str, dict[str, int]], k: int) -> dict[str, float]:
    per_query = [metrics(ranking, relevant[query_id], k) for query_id, ranking in ranked.items()]
    return {name: float(np.mean([m[name] for m in per_query])) for name in per_query[0]}


class Searcher:
    """An in-memory flat index of the documents at one (dim, quantize) setting, searched as `search` does:
    int8 and binary codes give candidates (binary by Hamming distance), the best re-scored by cosine."""

    def __init__(self, documents: np.ndarray, ids: np.ndarray, dim: int, quantize: str):
        self.ids, self.dim, self.quantize = ids, dim, quantize
        self.index = build_faiss(documents, dim, quantize, faiss_factory("flat", quantize, len(documents)))
        if quantize != "none":
            self.rescore = normalized(documents, dim)

    def search(self, vector: np.ndarray, depth: int) -> list[int]:
        query = np.array(vector[: self.dim], dtype=np.float32)[None]  # a copy: the caller's vector stays
        query /= max(float(np.linalg.norm(query)), 1e-12)
        depth = min(depth, len(self.ids))
        if self.quantize == "binary":
            _, rows = self.index.search(binary_encode(query), min(len(self.ids), binary_candidates(depth)))
        else:
            wanted = depth * INT8_REFINE if self.quantize == "int8" else depth
            _, rows = self.index.search(query, min(len(self.ids), wanted))
        rows = rows[0][rows[0] >= 0]
        if self.quantize != "none":
            scores = self.rescore[rows] @ query[0]
            rows = rows[np.argsort(-scores, kind="stable")[:depth]]
        return self.ids[rows].tolist()
