"""The page's routes: its files, its searches, and the pictures and files of indexed items, by item id only.

    GET  /, /dupes, /signin     the pages (static/*.html), and /static/* their script and style
    POST /web/search            /v1/search's records, each with the date that `--sort date` orders by
    GET  /web/thumb/{id}        a thumbnail (JPEG), made once and kept in the index's cache folder
    GET  /web/view/{id}         for the viewer: a photo or PDF page at screen size, a video (Range requests),
                                a text's first lines
    GET  /web/dupes             `qvlsearch dupes --json`'s groups (nothing is deleted)
    POST /web/signin            {"key"}: sets the HttpOnly, SameSite=Strict cookie that stands for the key

An id that is not an item of the served index, or whose file is no longer inside the index's roots
(a symlink swapped since), gets 404: no route takes a path.
"""

import hmac
import mimetypes
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from ..decoders import Decoders
from ..search import SearchIndex, SearchResult
from .thumbnails import Thumbnails, text_lines

STATIC = Path(__file__).parent / "static"
VIEW_PIXELS = 2048  # the longest side of a photo or page in the viewer
SESSION_DAYS = 30


class SignIn(BaseModel):
    key: str


def indexed(index: SearchIndex, item_id: int) -> SearchResult | None:
    """The item `item_id` of `index` as a search result (score None), or None when the index has no such item."""
    if item_id < 0 or index.position(item_id) is None:
        return None
    return index.result(0, item_id, None)


def not_found(what: str) -> JSONResponse:
    return JSONResponse({"error": {"message": f"{what}: no such item in this index", "type": "not_found"}},
                        status_code=404)


def add_routes(app: FastAPI, served: Any, searched: Callable[[Any], list[SearchResult]], *,
               api_key: str | None, decoders: Decoders | None = None) -> None:
    """Add the page and its routes to the API's `app`, over the ServedIndex `served`; `searched` runs a
    SearchRequest as /v1/search does (the same checks and caps)."""
    from ..dupes import DEFAULT_THRESHOLD, find_duplicates
    from ..server import SearchRequest  # (here: server.py imports this package) and not postponed: FastAPI reads it
    from . import SESSION_COOKIE, session_token

    thumbnails = Thumbnails(Path(served.index.path) / "cache" / "thumbnails", decoders)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    for route, page in (("/", "index.html"), ("/dupes", "dupes.html"), ("/signin", "signin.html")):
        app.add_api_route(route, lambda page=page: FileResponse(STATIC / page), methods=["GET"],
                          include_in_schema=False)

    def item(text_id: str) -> tuple[SearchResult, str] | None:
        """The item and its status, when `text_id` is an item of the index whose file lies inside its roots."""
        if not text_id.isdigit():
            return None
        with served.newest() as index:
            result = indexed(index, int(text_id))
            if result is None:
                return None
            status = index.items["status"][index.position(result.id)].as_py()
        file = os.path.realpath(result.fs_path or result.path)
        roots = [os.path.realpath(root) for root in served.roots()]
        if not any(file == root or file.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
            return None
        return result, status

    @app.post("/web/search")
    def search(request: SearchRequest) -> list[dict[str, Any]]:
        from ..server import search_record

        return [{**search_record(r), "date": r.date.isoformat() if r.date else None} for r in searched(request)]

    @app.get("/web/thumb/{item_id}")
    def thumbnail(item_id: str) -> Response:
        found = item(item_id)
        if found is None:
            return not_found(f"thumbnail {item_id}")
        return Response(thumbnails.jpeg(*found), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/web/view/{item_id}")
    def view(item_id: str) -> Response:
        found = item(item_id)
        if found is None:
            return not_found(f"item {item_id}")
        result, status = found
        if result.kind == "video" and status == "ok":
            media_type = mimetypes.guess_type(result.path)[0] or "video/mp4"
            return FileResponse(result.fs_path or result.path, media_type=media_type)  # answers Range requests
        if result.kind == "text" and status == "ok":
            return PlainTextResponse(text_lines(result))
        return Response(thumbnails.viewer(result, status, VIEW_PIXELS), media_type="image/jpeg")

    @app.get("/web/dupes")
    def dupes(threshold: float = DEFAULT_THRESHOLD, kind: str | None = None) -> list[dict[str, Any]]:
        with served.newest() as index:
            groups = find_duplicates(index, threshold, kind=kind or None)
        return [group.to_json(number) for number, group in enumerate(groups, 1)]

    @app.post("/web/signin")
    def sign_in(request: SignIn, http: Request) -> Response:
        if api_key is None:
            return Response(status_code=204)
        if not hmac.compare_digest(request.key.encode(), api_key.encode()):
            return JSONResponse({"error": {"message": "wrong key", "type": "authentication_error"}},
                                status_code=401)
        response = Response(status_code=204)
        response.set_cookie(SESSION_COOKIE, session_token(api_key), max_age=SESSION_DAYS * 86400, httponly=True,
                            samesite="strict", secure=http.url.scheme == "https")
        return response
