"""Find a running `qvlsearch serve` and send it work.

Standard library only, so that a command that hands its work to a server starts in a
fraction of a second (no torch, transformers or FAISS). `qvlsearch serve` writes
`server.json` into its index folder; `QVLSEARCH_SERVER=URL` names a server directly.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import os
import socket
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import QvlsearchError

log = logging.getLogger("qvlsearch")

DISCOVERY_FILE = "server.json"
HEALTH_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 600.0


class ServerError(QvlsearchError):
    """The server refused a request; the message is the server's own (the one the library would raise)."""

    def __init__(self, message: str, status: int, body: dict[str, Any]):
        super().__init__(message)
        self.status = status
        self.body = body
        self.kind = (body.get("error") or {}).get("type")


@dataclass
class Server:
    """A server that answered its health check."""

    url: str
    health: dict[str, Any]
    api_key: str | None = None

    def request(self, path: str, body: Any = None, timeout: float = REQUEST_TIMEOUT_S) -> Any:
        """POST `body` as JSON (GET when None) and return the decoded answer; raises ServerError for an error."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url.rstrip("/") + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                answer = json.loads(exc.read())
            except ValueError:
                answer = {}
            message = (answer.get("error") or {}).get("message") or f"HTTP {exc.code} {exc.reason}"
            raise ServerError(message, exc.code, answer) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise QvlsearchError(f"the qvlsearch server at {self.url} stopped answering ({reason}); "
                                 "run the command again, or with --no-server") from None

    # Each call below answers None when the server may not read one of the files named (403): the
    # command then does that work in its own process. Other refusals raise ServerError naming the
    # files as the user gave them.

    def embed(self, items: list[dict], dim: int | None) -> tuple[dict[int, Any], dict[int, str]] | None:
        """(vectors, errors) by item index, as `qvlsearch embed` gives them."""
        import array
        import base64

        sent = [absolute_sources(item) for item in items]
        body = {"model": self.health["model"], "input": [item for item, _ in sent], "encoding_format": "base64"}
        try:
            answer = self.request("/v1/embeddings", {**body, **({"dimensions": dim} if dim else {})})
        except ServerError as exc:
            if exc.status == 403:
                log.info("the server may not read this: %s; embedding here", exc)
                return None
            if exc.status != 422 or "data" not in exc.body:
                raise
            answer = exc.body
        failed = answer.get("error", {}).get("failed", [])  # a 200 answer has no error block
        errors = {f["index"]: given_names(f["message"], sent[f["index"]][1]) for f in failed}
        vectors = {d["index"]: array.array("f", base64.b64decode(d["embedding"])) for d in answer["data"]}
        return vectors, errors

    def search(self, item: dict, options: dict[str, Any]) -> tuple[list[dict], list[str]] | None:
        """The `--json` records of `qvlsearch search` for one query (`options`: the search's keyword arguments),
        and each result's file name as the OS needs it (from `path_bytes` where the name is not UTF-8)."""
        import base64

        sent, names = absolute_sources(item)
        under = options.get("under")
        body = {**options, "query": sent, "under": os.path.abspath(os.path.expanduser(under)) if under else None}
        try:
            records = self.request("/v1/search", body)
            return records, [os.fsdecode(base64.b64decode(r.pop("path_bytes"))) if "path_bytes" in r else r["path"]
                             for r in records]
        except ServerError as exc:
            if exc.status == 403:
                log.info("the server may not read this: %s; searching here", exc)
                return None
            raise ServerError(given_names(str(exc), names), exc.status, exc.body) from None

    def rerank(self, query: dict, documents: list[dict], instruction: str | None) -> list[float | None] | None:
        """Each document's score (None: it could not be read, and a warning says why), in their order."""
        query, names = absolute_sources(query)
        sent = []
        for document in documents:
            fixed, more = absolute_sources(document)
            sent.append(fixed)
            names.update(more)
        body = {"model": self.health["reranker"], "query": query, "documents": sent, "instruction": instruction}
        try:
            answer = self.request("/v1/rerank", body)
        except ServerError as exc:
            if exc.status == 403:
                log.info("the server may not read this: %s; reranking here", exc)
                return None
            if exc.status != 422 or "results" not in exc.body:
                raise ServerError(given_names(str(exc), names), exc.status, exc.body) from None
            answer = exc.body
            for failed in answer["error"]["failed"]:
                log.warning("skipped document %s", given_names(failed["message"], names))
        scores: list[float | None] = [None] * len(documents)
        for result in answer["results"]:
            scores[result["index"]] = result["relevance_score"]
        return scores


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def discovery_path(index_dir: str | os.PathLike) -> Path:
    return Path(index_dir).expanduser() / DISCOVERY_FILE


def write_discovery(index_dir: str | os.PathLike, url: str, api_key: bool) -> Path:
    """Announce a server in its index folder (no secret in it: clients take the key from QVLSEARCH_API_KEY).

    Written as a new file of a random name (O_EXCL, never through a planted link), mode 0600, then
    renamed over `server.json`."""
    path = discovery_path(index_dir)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{DISCOVERY_FILE}.")
    try:
        with os.fdopen(fd, "w") as file:
            json.dump({"url": url, "pid": os.getpid(), "host": socket.gethostname(), "api_key": api_key}, file)
            file.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def untrusted(path: Path, status: os.stat_result | None = None) -> str | None:
    """Why the discovery file `path` (whose `os.fstat` is `status`, else its `lstat`) could have been
    written by someone else (None: only by this user): it and its folder must be this user's and
    writable by nobody else."""
    folder = path.parent
    for name, st in ((path, status or os.lstat(path)), (folder, os.stat(folder))):
        if name == path and not stat.S_ISREG(st.st_mode):
            return f"{name} is not a regular file"
        if st.st_uid != os.getuid():
            return f"{name} belongs to another user (uid {st.st_uid})"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{name} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def loopback_url(url: str) -> bool:
    """Whether `url` is plain HTTP to this machine only (http://127.x, [::1] or localhost)."""
    try:
        parts = urllib.parse.urlsplit(url)
        return parts.scheme == "http" and is_loopback(parts.hostname or "")
    except ValueError:
        return False


def read_discovery(index_dir: str | os.PathLike) -> tuple[dict[str, Any] | None, str | None]:
    """The server that the index folder's `server.json` announces, if it can be trusted; else None and
    why not (None too when there is no file)."""
    path = discovery_path(index_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        reason = "a symbolic link" if exc.errno == errno.ELOOP else f"unreadable ({exc.strerror})"
        return None, f"{path} is {reason}"
    with os.fdopen(fd) as file:
        try:
            why = untrusted(path, os.fstat(file.fileno()))
            announced = None if why else json.loads(file.read())
        except (OSError, ValueError) as exc:
            return None, f"{path} cannot be read ({exc})"
    if why:
        return None, why
    if not isinstance(announced, dict) or not isinstance(announced.get("url"), str):
        return None, f"{path} names no server URL"
    if not loopback_url(announced["url"]):
        return None, f"{path} names {announced['url']}, which is not a loopback http:// address"
    return announced, None


def model_id(name: str) -> str:
    """How a model is named between client and server: a local folder by its resolved path, else the Hub id."""
    return os.path.realpath(name) if os.path.isdir(name) else name


def process_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def same_folder(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.realpath(os.path.expanduser(os.fspath(a))) == os.path.realpath(os.path.expanduser(os.fspath(b)))


def find_server(index_dir: str | os.PathLike, *, model: str | None = None, reranker: str | None = None,
                search: bool = False) -> Server | None:
    """A live server for this index folder and these models (None: work locally; with --verbose a line says why).

    `QVLSEARCH_SERVER=URL` names one: then a server that does not answer, or serves
    another index or model, is an error. Otherwise the index folder's `server.json` is
    read, and used only when this user alone can have written it (`read_discovery`) and it names
    a loopback URL: only then does the API key (QVLSEARCH_API_KEY) go there. A file whose process
    is gone, or a server that does not answer within a couple of seconds, is ignored.
    `search`: the server must serve this index folder.
    """
    api_key = os.environ.get("QVLSEARCH_API_KEY") or None
    named = os.environ.get("QVLSEARCH_SERVER")
    if named:
        url = named
    else:
        announced, why = read_discovery(index_dir)
        if announced is None:
            if why:
                log.info("not using a server: %s; working here", why)
            return None
        url = announced["url"]
        if announced.get("host") == socket.gethostname() and not process_alive(announced.get("pid")):
            log.info("not using a server: %s names a server (pid %s) that is gone; working here",
                     discovery_path(index_dir), announced.get("pid"))
            return None
        if announced.get("api_key") and not api_key:
            log.warning("the server at %s needs an API key: set QVLSEARCH_API_KEY to use it; working here", url)
            return None
    server = Server(url, {}, api_key)
    try:
        server.health = server.request("/health", timeout=HEALTH_TIMEOUT_S)
    except QvlsearchError as exc:
        if named:
            raise QvlsearchError(f"QVLSEARCH_SERVER={named}: no qvlsearch server answers there ({exc}); "
                                 "start one with `qvlsearch serve`, or unset QVLSEARCH_SERVER") from None
        if isinstance(exc, ServerError) and exc.status == 401:
            log.warning("the server at %s refuses QVLSEARCH_API_KEY; working here", url)
        else:
            log.info("not using the server at %s: %s; working here", url, exc)
        return None
    mismatch = mismatch_of(server.health, index_dir if search else None, model, reranker)
    if mismatch and named:
        raise QvlsearchError(f"QVLSEARCH_SERVER={named} serves {mismatch}; unset QVLSEARCH_SERVER to work locally")
    if mismatch:
        log.info("not using the server at %s: it serves %s; working here", url, mismatch)
        return None
    log.info("using the server at %s", url)
    return server


def mismatch_of(health: dict[str, Any], index_dir: str | os.PathLike | None, model: str | None,
                reranker: str | None) -> str | None:
    """What the server serves that differs from what the command asks for (None: it fits)."""
    if index_dir is not None and not (health.get("index") and same_folder(health["index"], index_dir)):
        return f"the index {health.get('index')}, not {index_dir}"
    if model is not None and model_id(str(health.get("model"))) != model_id(model):
        return f"the model {health.get('model')}, not {model_id(model)}"
    if reranker is not None and model_id(str(health.get("reranker"))) != model_id(reranker):
        return f"the reranker {health.get('reranker')}, not {model_id(reranker)}"
    return None


def absolute_sources(item: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """`item` with its local image/video paths made absolute (the server has its own working folder),
    and how to turn the absolute names in the server's messages back into the given ones."""
    names: dict[str, str] = {}

    def absolute(source: Any) -> Any:
        if isinstance(source, list):
            return [absolute(s) for s in source]
        if not isinstance(source, str) or source.startswith(("http://", "https://", "data:", "file://")):
            return source
        full = os.path.abspath(os.path.expanduser(source))
        if full != source:
            names[repr(full)] = repr(source)
        return full

    fixed = {k: absolute(v) if k in ("image", "video") else v for k, v in item.items()}
    return fixed, names


def given_names(message: str, names: dict[str, str]) -> str:
    """A server message with the paths as the user gave them."""
    for full, given in names.items():
        message = message.replace(full, given)
    return message
