"""`qvlsearch serve`: the models stay loaded behind an HTTP API (FastAPI on uvicorn).

    POST /v1/embeddings   OpenAI's embeddings API: the `openai` client works unchanged
    POST /v1/rerank       the rerank API that Cohere (v1) and Jina share; /v2/rerank: Cohere's v2 client;
                          /rerank: text-embeddings-inference's
    POST /v1/search       what `qvlsearch search --json` prints, over the served index
    GET  /health          models, index path and generation;  GET /v1/models
    GET  /                the web page (qvlsearch/web): search, thumbnails, a viewer, duplicates

One thread runs the models. Embedding requests that wait together go through the
Embedder's token batching as one stream, so concurrent clients share forward passes.
Every search first follows the index to its newest committed generation.
"""

from __future__ import annotations

import base64
import ctypes
import functools
import hmac
import json
import logging
import ntpath
import os
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.responses import Response

from . import DEFAULT_EMBEDDER, DEFAULT_RERANKER, __version__, web
from .client import discovery_path, model_id, untrusted, write_discovery
from .decoders import Decoders
from .embedder import Embedder, Embedding
from .errors import InputError, MediaError, ModelLoadError, QvlsearchError
from .media import VisionOptions, check_item, content_parts, is_data_uri
from .search import SearchIndex, SearchResult, document_item, open_index, query_item
from .store import Snapshot, StoreError, commit_key, read_manifest

log = logging.getLogger("qvlsearch")

# What one request may ask for; beyond each, a 400 that names the limit (the README's "Server" section lists them).
MAX_BODY_BYTES = 64 * 2**20  # room for several photos, or a short clip, sent as data: URIs
MAX_INPUTS = 256  # items per /v1/embeddings request
MAX_DOCUMENTS = 1000  # documents per /v1/rerank request (and its top_n)
MAX_TEXT_CHARS = 100_000  # characters per text or instruction
MAX_MEDIA_PER_ITEM = 8  # images and videos in one item (a frame list is one video)
# Vision tokens one item may take at most, counted from the server's settings before anything is decoded: an image
# as max_pixels / 32² (1800 by default), a video as total_pixels / (2 · 32²) (3840). 5640: three full-size images, or
# a video and an image. An item's forward pass alone grows memory by about 72 KiB a token, and one of four 8000x8000
# PNGs (7200 tokens, each image decoded whole before it is resized) grew the server by 1409 MiB.
MAX_ITEM_VISION_TOKENS = 5640
TOKEN_PIXELS = 32 * 32  # pixels of one vision token: 16-pixel patches, merged 2 × 2 (and video frames in pairs)
MAX_K = 1000  # /v1/search results
MAX_RERANK_TOP = 200  # /v1/search candidates that the reranker reads
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
Item = str | dict[str, Any]


class ApiError(Exception):
    """An answer other than 200: status, OpenAI-style error type and message, and more fields for the body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", **extra: Any):
        super().__init__(message)
        self.status, self.kind, self.extra = status, kind, extra

    def response(self) -> JSONResponse:
        return error_response(self.status, str(self), self.kind, **self.extra)


def error_response(status: int, message: str, kind: str, **extra: Any) -> JSONResponse:
    failed = extra.pop("failed", None)
    error = {"message": message, "type": kind, **({"failed": failed} if failed is not None else {})}
    return JSONResponse({"error": error, **extra}, status_code=status)


@dataclass
class EmbedJob:
    items: list[Any]
    future: Future = field(default_factory=Future)


class ModelThread:
    """The one thread that runs the models.

    It takes every embedding request waiting in its queue and runs all their items through
    one `Embedder.embed_iter` (unnormalized, full dimension; each request then cuts and
    normalizes its own). Other work (the reranker, loaded on first use) runs alone. It also
    stands in for the models of a `SearchIndex` (`embed`, `rerank`), so searches share the batching.
    """

    def __init__(self, embedder: Embedder, reranker_name: str, device: str | None, decoders: Decoders | None = None):
        self.embedder = embedder
        self.decoders = decoders  # the reranker's too
        self.reranker_name = reranker_name
        self.device = device
        self.loaded_reranker = None
        self.rerank_options = VisionOptions()  # the settings `reranker()` builds the Reranker with
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self.run, name="qvlsearch-model", daemon=True).start()

    def embeddings(self, items: list[Any]) -> list[Embedding]:
        """Raw embeddings of `items`, in order; an item's error keeps its own index in the list."""
        job = EmbedJob(items)
        self.jobs.put(job)
        return job.future.result()

    def call(self, work: Callable[[], Any]) -> Any:
        future: Future = Future()
        self.jobs.put((work, future))
        return future.result()

    def run(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            while not self.jobs.empty():
                jobs.append(self.jobs.get())
            embeds = [j for j in jobs if isinstance(j, EmbedJob)]
            if embeds:
                self.run_embeddings(embeds)
            for work, future in (j for j in jobs if not isinstance(j, EmbedJob)):
                try:
                    future.set_result(work())
                except BaseException as exc:  # the request that asked gets it
                    future.set_exception(exc)

    def run_embeddings(self, jobs: list[EmbedJob]) -> None:
        """Every waiting request's items through the Embedder, in chunks of bounded pixels (see `chunks`)."""
        owners = [(job, n) for job in jobs for n in range(len(job.items))]
        log.info("embedding %d items of %d requests together", len(owners), len(jobs))
        results: dict[int, list[Embedding | None]] = {id(job): [None] * len(job.items) for job in jobs}
        try:
            for chunk in chunks([job.items[n] for job, n in owners], self.embedder.options):
                for e in self.embedder.embed_iter((owners[i][0].items[owners[i][1]] for i in chunk), normalize=False):
                    job, n = owners[chunk[e.index]]
                    results[id(job)][n] = Embedding(n, e.vector, e.error, e.facts)
                trim_heap()
        except Exception as exc:
            for job in jobs:
                job.future.set_exception(exc)
            return
        for job in jobs:
            job.future.set_result(results[id(job)])

    def reranker(self):
        """The reranker, loaded on first use (call in this thread only)."""
        if self.loaded_reranker is None:
            from .reranker import Reranker

            self.loaded_reranker = Reranker(self.reranker_name, device=self.device, decoders=self.decoders)
        return self.loaded_reranker

    # What a SearchIndex asks of its embedder and reranker:
    def embed(self, items: list[Any], *, dim: int | None = None) -> np.ndarray:
        out = []
        for e in self.embeddings(list(items)):
            if e.error is not None:
                raise e.error
            out.append(finished(e.vector, dim))
        return np.stack(out)

    def rerank(self, query: Any, documents: list[Any], **options: Any) -> list[float | None]:
        return self.call(lambda: self.reranker().rerank(query, documents, **options))


def finished(vector: np.ndarray, dim: int | None) -> np.ndarray:
    """Cut to `dim` (Matryoshka) and L2-normalize with the Embedder's own operation (the same float32 bits)."""
    cut = torch.from_numpy(np.ascontiguousarray(vector[:dim] if dim else vector))
    return torch.nn.functional.normalize(cut[None], p=2, dim=-1)[0].numpy()


class ServedIndex:
    """The served index: every search sees the newest committed generation, and sees it whole.

    Searches share the index; re-reading it waits for the searches under way to end.
    """

    def __init__(self, index: SearchIndex):
        self.index = index
        self.changed = threading.Condition()
        self.readers = 0
        self.refreshing = False
        self.roots_of: tuple[tuple | None, list[str]] = (None, [])

    def refresh(self) -> None:
        if commit_key(read_manifest(self.index.path)) == commit_key(self.index.manifest):
            return
        with self.changed:
            self.changed.wait_for(lambda: not self.refreshing)
            self.refreshing = True
            self.changed.wait_for(lambda: self.readers == 0)
        try:
            if self.index.refresh():
                log.info("serving generation %s of %s", self.index.manifest.get("generation"), self.index.path)
        finally:
            with self.changed:
                self.refreshing = False
                self.changed.notify_all()

    @contextmanager
    def newest(self) -> Iterator[SearchIndex]:
        self.refresh()
        with self.changed:
            self.changed.wait_for(lambda: not self.refreshing)
            self.readers += 1
        try:
            yield self.index
        finally:
            with self.changed:
                self.readers -= 1
                self.changed.notify_all()

    def roots(self) -> list[str]:
        """The folders and files the index was built from (re-read when another commit is the newest)."""
        key = commit_key(read_manifest(self.index.path))
        if self.roots_of[0] != key:
            roots = Snapshot(self.index.path, ["root"], with_index=False).items["root"].unique().to_pylist()
            self.roots_of = (key, sorted(root for root in roots if root))
        return self.roots_of[1]


class Sources:
    """Which images and videos a request may name: files inside the index's roots and the
    --allow-path folders, URLs with --allow-urls, data: URIs always."""

    def __init__(self, served: ServedIndex | None, allow_paths: list[Path], allow_urls: bool):
        self.served, self.allow_urls = served, allow_urls
        self.allow_paths = [os.path.realpath(p) for p in allow_paths]

    def check(self, item: Any, where: str) -> None:
        """Raise a 403 ApiError when `item` names a source outside the rules (wrong types are check_item's)."""
        if not isinstance(item, Mapping):
            return
        for key in ("image", "video"):
            for source in flattened(item.get(key)):
                if not isinstance(source, str) or is_data_uri(source):
                    continue
                if source.startswith(("http://", "https://")):
                    if not self.allow_urls:
                        raise ApiError(403, f"{where}: {source} is a URL, and this server fetches URLs only "
                                            "when started with --allow-urls", "permission_error")
                    continue
                path = os.path.realpath(source[7:] if source.startswith("file://") else source)
                if not any(path == d or path.startswith(d.rstrip(os.sep) + os.sep) for d in self.folders()):
                    raise ApiError(403, f"{where}: {source} is outside the folders this server may read (the "
                                        "index's roots and --allow-path); send it as a data: URI, or start the "
                                        "server with --allow-path", "permission_error")

    def folders(self) -> list[str]:
        roots = [os.path.realpath(r) for r in self.served.roots()] if self.served else []
        return roots + self.allow_paths


def flattened(value: Any) -> Iterator[Any]:
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from flattened(v)
    elif value is not None:
        yield value


def within_limits(item: Any, where: str, options: VisionOptions) -> None:
    """Raise a 400 ApiError when `item` asks for more than the caps allow, or for more than the server's
    own media settings (`options`): a request may lower `fps` and `max_frames`, never raise them.
    An item of the wrong shape is left to `check_item`."""
    if not isinstance(item, Mapping):
        return
    for key in ("text", "instruction"):
        for text in flattened(item.get(key)):
            if isinstance(text, str) and len(text) > MAX_TEXT_CHARS:
                raise ApiError(400, f"{where}: {key} of {len(text)} characters, over the limit of {MAX_TEXT_CHARS}")
    for key, limit, least in (("fps", options.fps, 0), ("max_frames", options.max_frames, 1)):
        value = item.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int if key == "max_frames" else (int, float)) or not (
                value > least):  # (NaN too)
            kind = "a whole number over 1" if key == "max_frames" else "a positive number"
            raise ApiError(400, f"{where}: {key} must be {kind}, got {value!r}")
        if value > limit:
            raise ApiError(400, f"{where}: {key} {value} is over this server's limit of {limit}; a request may "
                                f"lower {key}, not raise it")
    try:
        check_item(item)
    except InputError:
        return
    media = sum(part["type"] != "text" for part in content_parts(item, options))
    if media > MAX_MEDIA_PER_ITEM:
        raise ApiError(400, f"{where}: {media} images and videos in one item, over the limit of "
                            f"{MAX_MEDIA_PER_ITEM}; send them as separate items")
    tokens = vision_tokens(item, options)
    if tokens > MAX_ITEM_VISION_TOKENS:
        raise ApiError(400, f"{where}: its images and videos may take {tokens} vision tokens at this server's "
                            f"max_pixels and total_pixels, over the limit of {MAX_ITEM_VISION_TOKENS} an item (three "
                            "full-size images, or a video and an image); send them as separate items")


def trim_heap() -> None:
    """Give the memory that the C heap holds free back to the system (glibc's malloc_trim; elsewhere nothing).

    Pixels freed by one chunk's worker threads otherwise stay resident in their malloc arenas, and the next
    chunk's come on top: 60 items of four full-size images grew the server by 1.19 GiB without this."""
    trim = getattr(libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def libc() -> Any:
    return ctypes.CDLL(None)


def vision_tokens(item: Any, options: VisionOptions) -> int:
    """The most vision tokens `item` can take under `options`, whatever the sizes of its media (0 for text)."""
    if not isinstance(item, Mapping):
        return 0
    return sum(options.max_pixels // TOKEN_PIXELS if part["type"] == "image"
               else options.total_pixels // (2 * TOKEN_PIXELS) if part["type"] == "video" else 0
               for part in content_parts(item, options))


def chunks(items: list[Any], options: VisionOptions) -> Iterator[list[int]]:
    """The positions of `items` in runs of at most MAX_ITEM_VISION_TOKENS vision tokens (at least one item
    each): what one `embed_iter` may hold decoded at once, whatever its look-ahead and batch queue."""
    run: list[int] = []
    tokens = 0
    for n, item in enumerate(items):
        cost = vision_tokens(item, options)
        if run and tokens + cost > MAX_ITEM_VISION_TOKENS:
            yield run
            run, tokens = [], 0
        run.append(n)
        tokens += cost
    if run:
        yield run


def lowest(a: VisionOptions, b: VisionOptions) -> VisionOptions:
    """The settings that both `a` and `b` allow (for a query that goes to the embedder and the reranker)."""
    return replace(a, fps=min(a.fps, b.fps), max_frames=min(a.max_frames, b.max_frames))


class EmbeddingsRequest(BaseModel):
    model: str
    input: str | list[Item]
    dimensions: int | None = None
    encoding_format: Literal["float", "base64"] = "float"


class RerankRequest(BaseModel):
    model: str | None = None
    query: Item
    documents: list[Item] = Field(max_length=MAX_DOCUMENTS)
    top_n: int | None = Field(default=None, ge=1, le=MAX_DOCUMENTS)
    instruction: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)


class TeiRerankRequest(BaseModel):
    query: Item
    texts: list[Item] = Field(max_length=MAX_DOCUMENTS)
    return_text: bool = False
    raw_scores: bool = False  # accepted; the scores are the reranker's probabilities either way
    truncate: bool | None = None


class SearchRequest(BaseModel):
    query: Item | None = None
    like: int | None = None  # an item id of the index: search with that file (or page, or moment) as the query
    k: int = Field(default=10, ge=1, le=MAX_K)
    kind: str | list[str] | None = None
    under: str | None = None
    min_score: float | None = None
    rerank: bool = False
    rerank_top: int = Field(default=50, ge=1, le=MAX_RERANK_TOP)
    instruction: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    after: str | None = None
    before: str | None = None
    near: str | None = None
    camera: str | None = None
    sort: str = "score"
    mode: str = "hybrid"


def named(requested: str | None, served: str, what: str) -> None:
    """404 unless `requested` names the served model (its id or path, or the last part of it)."""
    if requested is None or requested in (served, ntpath.basename(served.rstrip("/\\"))):  # / or \ (Windows)
        return
    raise ApiError(404, f"this server has no {what} model {requested!r}; it serves {served!r}", "model_not_found")


def as_item(value: Item) -> Any:
    return {"text": value} if isinstance(value, str) else value


def encoded(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()


def create_app(models: ModelThread, served: ServedIndex | None, *, model_name: str, api_key: str | None,
               sources: Sources, hosts: frozenset[str] | None = frozenset(LOOPBACK_HOSTS)) -> FastAPI:
    """The ASGI app; `served` is None for a server without an index (no /v1/search); `hosts`: the names a
    request's Host header may carry (None: any)."""
    app = FastAPI(title="qvlsearch", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.last_request = time.monotonic()
    app.state.in_flight = 0

    @app.middleware("http")
    async def guard(request: Request, call_next):
        app.state.last_request = time.monotonic()
        refused = refusal(request, hosts)
        if refused is not None:
            return with_headers(refused)
        if api_key is not None and not signed_in(request, api_key) and request.url.path not in web.OPEN_PATHS:
            if request.method == "GET" and request.url.path in web.PAGES:
                return with_headers(RedirectResponse("/signin", status_code=303))
            return with_headers(error_response(401, "missing or wrong API key: send `Authorization: Bearer KEY` "
                                                    "(a browser: sign in at /signin)", "authentication_error"))
        if request.method == "POST":
            if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                return with_headers(error_response(415, "send the body as JSON, with `Content-Type: "
                                                        "application/json`", "invalid_request_error"))
            length = request.headers.get("content-length")
            if length is None:
                return with_headers(error_response(411, "send the body with a Content-Length",
                                                   "invalid_request_error"))
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                return with_headers(error_response(413, f"request body over {MAX_BODY_BYTES // 2**20} MiB; send "
                                                        "fewer or smaller items", "request_too_large"))
        app.state.in_flight += 1
        try:
            return with_headers(await call_next(request))
        finally:
            app.state.in_flight -= 1
            app.state.last_request = time.monotonic()

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})"
        else:
            where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
            message = f"{where}: {first.get('msg', 'invalid')}"
        return error_response(400, message, "invalid_request_error")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def unknown_route(request: Request, exc: HTTPException) -> JSONResponse:
        """Unknown routes (404) and methods (405) answer in the same error shape as the rest of the API."""
        response = error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}; this "
                                  "server answers /v1/embeddings, /v1/rerank, /v2/rerank, /rerank, /v1/search, "
                                  "/v1/models, /health and the web page at /", "invalid_request_error")
        response.headers.update(exc.headers or {})  # 405: Allow
        return response

    @app.exception_handler(QvlsearchError)
    async def qvlsearch_error(request: Request, exc: QvlsearchError) -> JSONResponse:
        if isinstance(exc, InputError):
            return error_response(400, str(exc), "invalid_request_error")
        if isinstance(exc, MediaError):
            return error_response(422, str(exc), "invalid_request_error")
        if isinstance(exc, (ModelLoadError, StoreError)):
            return error_response(503, str(exc), "server_error")
        return error_response(400, str(exc), "invalid_request_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        index = served.index if served else None
        return {"status": "ok", "version": __version__, "pid": os.getpid(), "model": model_name,
                "reranker": models.reranker_name, "reranker_loaded": models.loaded_reranker is not None,
                "index": str(index.path) if index else None,
                "generation": read_manifest(index.path).get("generation") if index else None}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "qvlsearch"}
                                           for name in (model_name, models.reranker_name)]}

    @app.post("/v1/embeddings")
    def embeddings(request: EmbeddingsRequest) -> dict[str, Any]:
        named(request.model, model_name, "embedding")
        inputs = [request.input] if isinstance(request.input, str) else request.input
        if not inputs:
            raise ApiError(400, "input: give at least one text or item")
        if len(inputs) > MAX_INPUTS:
            raise ApiError(400, f"input: {len(inputs)} items, over the limit of {MAX_INPUTS}; send them in "
                                "several requests")
        models.embedder.check_dim(request.dimensions)
        failed: dict[int, str] = {}
        items: list[tuple[int, Any]] = []
        for i, value in enumerate(inputs):
            item = as_item(value)
            sources.check(item, f"input[{i}]")
            within_limits(item, f"input[{i}]", models.embedder.options)
            try:
                items.append((i, check_item(item, i)))
            except InputError as exc:
                failed[i] = str(exc)
        data, tokens = [], 0
        for (i, _), e in zip(items, models.embeddings([item for _, item in items]) if items else [], strict=True):
            if e.error is not None:
                e.error.index = i
                failed[i] = str(e.error)
                continue
            data.append({"object": "embedding", "index": i,
                         "embedding": encoded(finished(e.vector, request.dimensions), request.encoding_format)})
            tokens += e.facts.get("tokens", 0)
        body = {"object": "list", "data": data, "model": model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        if failed:
            raise ApiError(422, "; ".join(failed[i] for i in sorted(failed)),
                           failed=[{"index": i, "message": failed[i]} for i in sorted(failed)], **body)
        return body

    def reranked(query: Item, documents: list[Item], instruction: str | None,
                 top_n: int | None) -> tuple[list[tuple[int, float]], dict[int, Exception]]:
        """(document index, score) best first, at most `top_n`, and the documents that failed (every rerank shape)."""
        query = as_item(query)
        sources.check(query, "query")
        within_limits(query, "query", models.rerank_options)
        documents = [as_item(d) for d in documents]
        for i, document in enumerate(documents):
            sources.check(document, f"documents[{i}]")
            within_limits(document, f"documents[{i}]", models.rerank_options)
        scores, errors = models.call(lambda: models.reranker().scores_and_errors(
            query, documents, instruction=instruction))
        order = sorted((i for i, s in enumerate(scores) if s is not None), key=lambda i: -scores[i])
        return [(i, scores[i]) for i in order[:top_n]], errors

    def failed_documents(errors: dict[int, Exception], **body: Any) -> ApiError:
        return ApiError(422, "; ".join(str(e) for e in errors.values()),
                        failed=[{"index": i, "message": str(e)} for i, e in errors.items()], **body)

    @app.post("/v1/rerank")
    def rerank(request: RerankRequest) -> dict[str, Any]:
        named(request.model, models.reranker_name, "rerank")
        ranked, errors = reranked(request.query, request.documents, request.instruction, request.top_n)
        body = {"model": models.reranker_name, "results": [{"index": i, "relevance_score": s} for i, s in ranked]}
        if errors:
            raise failed_documents(errors, **body)
        return body

    @app.post("/v2/rerank")
    def rerank_v2(request: RerankRequest) -> dict[str, Any]:
        """Cohere's v2 shape (`cohere.ClientV2.rerank`): v1's, with an `id` and `meta`."""
        named(request.model, models.reranker_name, "rerank")
        ranked, errors = reranked(request.query, request.documents, request.instruction, request.top_n)
        body = {"id": str(uuid.uuid4()), "results": [{"index": i, "relevance_score": s} for i, s in ranked],
                "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}}
        if errors:
            raise failed_documents(errors, **body)
        return body

    @app.post("/rerank")
    def rerank_tei(request: TeiRerankRequest) -> list[dict[str, Any]]:
        """text-embeddings-inference's shape: `{query, texts}` in, `[{index, score}]` out, best first."""
        ranked, errors = reranked(request.query, request.texts, None, None)
        if errors:
            raise failed_documents(errors)
        return [{"index": i, "score": s, **({"text": request.texts[i]} if request.return_text else {})}
                for i, s in ranked]

    def searched(request: SearchRequest) -> list[SearchResult]:
        """The results of a /v1/search (or the web page's) request over the newest generation."""
        if served is None:
            raise ApiError(404, "this server has no index; start it with `qvlsearch serve --index DIR`",
                           "index_not_found")
        with served.newest() as index:
            if request.like is not None:
                example = web.indexed(index, request.like)
                if example is None:
                    raise ApiError(404, f"like: {request.like} is not an item id of this index", "not_found")
                query = document_item(example)
            else:
                if request.query is None:
                    raise ApiError(400, "query: give a text or an item (or `like`, an item id)")
                query = query_item(request.query)
                sources.check(query, "query")
            within_limits(query, "query", lowest(models.embedder.options, models.rerank_options)
                          if request.rerank else models.embedder.options)
            if len(index) == 0:
                raise ApiError(404, f"index {index.path} is empty; add files with `qvlsearch index PATH`",
                               "empty_index")
            return index.search(query, request.k, kind=request.kind, under=request.under,
                                min_score=request.min_score, rerank=request.rerank,
                                rerank_top=request.rerank_top, instruction=request.instruction,
                                after=request.after, before=request.before, near=request.near,
                                camera=request.camera, sort=request.sort, mode=request.mode)

    @app.post("/v1/search")
    def search(request: SearchRequest) -> list[dict[str, Any]]:
        return [search_record(r) for r in searched(request)]

    if served is not None:
        web.add_routes(app, served, searched, api_key=api_key, decoders=models.decoders)

    return app


def refusal(request: Request, hosts: frozenset[str] | None) -> JSONResponse | None:
    """The answer to a request from where no request may come (None: go on).

    A Host that is not one of the server's own names is DNS rebinding: a web page whose name now
    points at this machine (400). A browser's request from a page of another origin is refused
    (403), and no answer carries CORS headers, so no other page can read one.
    """
    host = request.headers.get("host")
    if hosts is not None and host is not None and host_name(host).lower() not in hosts:
        return error_response(400, f"Host {host!r} is not a name of this server; use one of "
                                   f"{', '.join(sorted(hosts))}", "invalid_request_error")
    origin = request.headers.get("origin")
    own = f"{request.url.scheme}://{host}".lower()
    if (origin is not None and origin.lower() != own) or request.headers.get("sec-fetch-site") not in (
            None, "same-origin", "none"):
        return error_response(403, "requests from web pages of other origins are refused", "permission_error")
    return None


def signed_in(request: Request, api_key: str) -> bool:
    """Whether the request carries the key: `Authorization: Bearer KEY`, or the web page's sign-in cookie."""
    given = request.headers.get("authorization", "")
    if hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        return True
    cookie = request.cookies.get(web.SESSION_COOKIE, "")
    return hmac.compare_digest(cookie.encode(), web.session_token(api_key).encode())


def with_headers(response: Response) -> Response:
    """Every answer: a strict Content-Security-Policy (the page's own files only, no inline script) and no sniffing."""
    response.headers.update(web.SECURITY_HEADERS)
    return response


def host_name(host: str) -> str:
    """The name in a Host header, without its port: `[::1]:8765` is `::1`, `localhost:8765` is `localhost`."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def served_hosts(host: str) -> frozenset[str] | None:
    """The Host names a server bound to `host` answers: the loopback names and `host` (None: any name, for a
    server on every address, which needs an API key)."""
    if host in ("0.0.0.0", "::"):
        return None
    return frozenset({*LOOPBACK_HOSTS, host.lower().strip("[]")})


def search_record(result: SearchResult) -> dict[str, Any]:
    """`search --json`'s record, and where the file's name is not UTF-8 (the record's `path` shows it with
    \\xNN escapes), its exact bytes in base64 as `path_bytes`, so that a client can open it."""
    record = result.to_json()
    name = os.fsencode(result.fs_path or result.path)
    if name != record["path"].encode():
        record["path_bytes"] = base64.b64encode(name).decode()
    return record


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise QvlsearchError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port "
                             "(or --host)") from None


def run_server(index_dir: Path | None, *, host: str, port: int, api_key: str | None, idle_timeout: float | None,
               model: str | None, reranker: str | None, device: str | None, allow_paths: list[Path],
               allow_urls: bool) -> None:
    """Load the embedder, listen, announce the server in the index folder, and serve until stopped."""
    import signal

    import uvicorn

    index_dir = Path(index_dir).expanduser().absolute() if index_dir is not None else None
    index = open_index(index_dir, device=device) if index_dir is not None else None
    if index is not None and model and model_id(model) != index.manifest["model"]:
        raise StoreError(f"index {index_dir} was built with model {index.manifest['model']!r}, not {model!r}; "
                         "serve it with that model, or leave out --model")
    # Request media are decoded in worker processes: a decoder that crashes on one is that item's 422. At most
    # 4, started as requests need them: each holds 0.5-1.2 GB once it has decoded a photo and a video.
    decoders = Decoders(min(4, os.cpu_count() or 1))
    embedder = (index.load_embedder(decoders=decoders) if index is not None
                else Embedder(model or DEFAULT_EMBEDDER, device=device, decoders=decoders))
    model_name = index.manifest["model"] if index is not None else model_id(embedder.model_name_or_path)
    models = ModelThread(embedder, model_id(reranker or DEFAULT_RERANKER), device, decoders)
    served = None
    if index is not None:
        served = ServedIndex(SearchIndex(index_dir, device=device, embedder=models, reranker=models))
    app = create_app(models, served, model_name=model_name, api_key=api_key,
                     sources=Sources(served, allow_paths, allow_urls), hosts=served_hosts(host))
    sock = listening_socket(host, port)
    bound = sock.getsockname()[1]
    client_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    url = f"http://{f'[{client_host}]' if ':' in client_host else client_host}:{bound}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=5))
    announced = announce(index_dir, url, api_key is not None) if index_dir is not None else None
    print(f"qvlsearch: serving {model_name} on {url}" + (f" for {index_dir}" if index_dir else ""),
          file=sys.stderr, flush=True)
    if idle_timeout:
        def stop_when_idle() -> None:
            while not server.should_exit:
                time.sleep(min(1.0, idle_timeout))
                if app.state.in_flight == 0 and time.monotonic() - app.state.last_request > idle_timeout:
                    log.warning("no request for %ss: stopping", idle_timeout)
                    server.should_exit = True

        threading.Thread(target=stop_when_idle, daemon=True).start()
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again: SIGTERM ends with 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.run(sockets=[sock])
    finally:
        if announced is not None:
            remove_discovery(announced)


def announce(index_dir: Path, url: str, keyed: bool) -> Path | None:
    """Write the discovery file that lets commands find this server (None: it could not be written,
    and a line on stderr says so); warn when clients would not trust it."""
    try:
        path = write_discovery(index_dir, url, keyed)
    except OSError as exc:
        print(f"qvlsearch: cannot write {discovery_path(index_dir)} ({exc.strerror or exc}): serving without "
              f"it; commands find this server only with QVLSEARCH_SERVER={url}", file=sys.stderr, flush=True)
        return None
    distrust = untrusted(path)
    if distrust:
        print(f"qvlsearch: {distrust}, so commands will not use this server unless QVLSEARCH_SERVER={url} "
              "names it", file=sys.stderr, flush=True)
    return path


def remove_discovery(path: Path) -> None:
    """Remove this server's discovery file (not one that a newer server wrote over it)."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass
