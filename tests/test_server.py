"""`qvlsearch serve`: a real server in a subprocess, reached with the `openai` client, urllib and the CLI."""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTOS, SAMPLE_DATA

from qvlsearch.client import find_server
from qvlsearch.indexer import Indexer, IndexOptions
from qvlsearch.media import VisionOptions
from qvlsearch.server import chunks

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
ENV.pop("QVLSEARCH_SERVER", None)
ENV.pop("QVLSEARCH_API_KEY", None)
FILES = [PHOTOS / "cake.jpg", PHOTOS / "cat.jpg", PHOTOS / "bee.jpg", SAMPLE_DATA / "broken" / "corrupt.jpg",
         SAMPLE_DATA / "notes" / "cats.txt", SAMPLE_DATA / "notes" / "chess.txt"]
CAFE = b"caf\xe9 menu.txt"


def cli(*args: str, stdin: str | None = None, env: dict | None = None, cwd: Path | None = None,
        text: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qvlsearch", *args], input=stdin, capture_output=True, text=text,
                          env=env or ENV, timeout=300, cwd=cwd)


class Served:
    """A `qvlsearch serve` subprocess and its URL (from its discovery file, or with `announced=False`
    from the line it prints on stderr)."""

    def __init__(self, index_dir: Path, checkpoints: dict, *extra: str, announced: bool = True,
                 env: dict | None = None):
        self.index_dir = index_dir
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qvlsearch", "serve", "--index", str(index_dir), "--port", "0",
             "--reranker", str(checkpoints["reranker"]), *extra],
            env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not announced:
            self.said = []  # the lines before "serving … on URL"
            for line in iter(self.process.stderr.readline, ""):
                if line.startswith("qvlsearch: serving "):
                    self.url = re.search(r" on (http://\S+)", line)[1]
                    return
                self.said.append(line)
            pytest.fail(f"the server did not start: {''.join(self.said)}")
        deadline = time.monotonic() + 240
        while not (index_dir / "server.json").exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"the server did not start: {self.process.communicate()[1]}")
            time.sleep(0.2)
        self.url = json.loads((index_dir / "server.json").read_text())["url"]

    def post(self, path: str, body, *, raw: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data,
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def get(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc_info) -> None:
        assert self.stop() == 0

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, checkpoints, embedder) -> Path:
    root = tmp_path_factory.mktemp("served") / "files"
    root.mkdir()
    for path in FILES:
        shutil.copy(path, root / path.name)
    (root / os.fsdecode(CAFE)).write_text("the menu of a cafe: coffee, tea and cake\n")  # a name that is not UTF-8
    index = root.parent / "index"
    Indexer(index, IndexOptions(model=str(checkpoints["embedder"])), embedder=embedder).run([root])
    return index


@pytest.fixture(scope="module")
def server(index_dir, checkpoints):
    with Served(index_dir, checkpoints) as served:
        yield served
    assert not (index_dir / "server.json").exists()


def as_printed(records: list[dict]) -> list[dict]:
    """/v1/search's records as `search --json` prints them (the API adds `path_bytes` to a non-UTF-8 name)."""
    return [{k: v for k, v in r.items() if k != "path_bytes"} for r in records]


def root_of(index_dir: Path) -> Path:
    return index_dir.parent / "files"


def with_index(index_dir: Path, **more: str) -> dict:
    return {**ENV, "QVLSEARCH_INDEX": str(index_dir), **more}


def test_openai_client_gets_the_vectors_of_qvlsearch_embed(server, index_dir, checkpoints):
    from openai import OpenAI

    model = str(checkpoints["embedder"])
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    texts = ["a cat on a chair", "chess openings"]
    local = cli("embed", "-", "--no-server", "--model", model, stdin="".join(json.dumps({"text": t}) + "\n"
                                                                             for t in texts))
    assert local.returncode == 0, local.stderr
    expected = np.array([json.loads(line)["vector"] for line in local.stdout.splitlines()])
    as_base64 = client.embeddings.create(model=model, input=texts)  # the client asks for base64 by default
    as_float = client.embeddings.create(model=model, input=texts, encoding_format="float")
    for answer in (as_base64, as_float):
        assert [d.index for d in answer.data] == [0, 1] and answer.model == model
        assert np.abs(np.array([d.embedding for d in answer.data]) - expected).max() < 1e-5
        assert answer.usage.prompt_tokens == answer.usage.total_tokens > 0
    cut = client.embeddings.create(model="embedder", input=texts, dimensions=32)  # a model's last name is enough
    matryoshka = expected[:, :32] / np.linalg.norm(expected[:, :32], axis=1, keepdims=True)  # what --dim 32 does
    assert np.abs(np.array([d.embedding for d in cut.data]) - matryoshka).max() < 1e-5


def test_embed_cli_prints_the_same_with_the_server(server, index_dir, checkpoints):
    image = root_of(index_dir) / "cake.jpg"
    lines = "".join(json.dumps(item) + "\n" for item in (
        {"text": "a cat"}, {"image": str(image)}, {"image": str(root_of(index_dir) / "corrupt.jpg")}, {"video": 3}))
    args = ("embed", "-", "--model", str(checkpoints["embedder"]))
    remote = cli(*args, stdin=lines, env=with_index(index_dir))
    local = cli(*args, "--no-server", stdin=lines)
    assert remote.returncode == local.returncode == 1
    assert remote.stdout == local.stdout and sorted(remote.stderr.splitlines()) == sorted(local.stderr.splitlines())
    assert "item 2: image" in remote.stderr and "item 3: video must be" in remote.stderr


def test_search_and_rerank_answer_as_the_cli_does(server, index_dir, checkpoints):
    base = ("search", "a cat", "--index", str(index_dir), "-k", "3", "--rerank", "--rerank-top", "5",
            "--reranker", str(checkpoints["reranker"]))
    local = cli(*base, "--json", "--no-server")
    assert local.returncode == 0, local.stderr
    remote = cli(*base, "--json")
    assert remote.stdout == local.stdout and remote.stderr == local.stderr == ""
    status, records = server.post("/v1/search", {"query": "a cat", "k": 3, "rerank": True, "rerank_top": 5})
    assert status == 200 and as_printed(records) == json.loads(local.stdout)
    named = [base64.b64decode(r["path_bytes"]) for r in records if "path_bytes" in r]
    assert named == [bytes(root_of(index_dir)) + b"/" + CAFE]  # the one name that is not UTF-8, as bytes
    status, records = server.post("/v1/search", {"query": "COFFEE tea", "mode": "words"})  # words: no model
    assert status == 200 and [(r["matched"], r["score"]) for r in records] == [(["coffee", "tea"], None)]
    status, answer = server.post("/v1/search", {"query": "a cat", "mode": "fuzzy"})
    assert status == 400 and "mode must be one of hybrid, semantic, words" in answer["error"]["message"]
    # the tab-separated form, filters, and a query image
    base = ("search", "--image", str(root_of(index_dir) / "cat.jpg"), "--index", str(index_dir), "--kind", "image")
    assert cli(*base).stdout == cli(*base, "--no-server").stdout != ""
    # rerank: the Cohere/Jina shape, and the CLI's output with and without the server
    candidates = [str(root_of(index_dir) / n) for n in ("cats.txt", "cake.jpg", "corrupt.jpg", "chess.txt")]
    args = ("rerank", "a cat", *candidates, "--jsonl", "--reranker", str(checkpoints["reranker"]))
    local = cli(*args, "--no-server")
    remote = cli(*args, env=with_index(index_dir))
    assert remote.returncode == local.returncode == 0
    assert remote.stdout == local.stdout and remote.stderr == local.stderr
    assert "skipped document item 2: image" in remote.stderr
    documents = [Path(candidates[0]).read_text(), {"image": candidates[1]}, {"image": candidates[2]},
                 Path(candidates[3]).read_text()]
    status, answer = server.post("/v1/rerank", {"query": "a cat", "documents": documents, "top_n": 2})
    assert status == 422 and answer["error"]["failed"][0]["index"] == 2
    assert "item 2: image" in answer["error"]["message"]
    scored = {json.loads(line)["path"]: json.loads(line)["rerank_score"] for line in local.stdout.splitlines()}
    assert [r["index"] for r in answer["results"]] == [candidates.index(p) for p in sorted(
        (p for p in candidates if scored[p] is not None), key=lambda p: -scored[p])][:2]
    assert answer["results"][0]["relevance_score"] == pytest.approx(scored[candidates[answer["results"][0]["index"]]],
                                                                    abs=1e-6)


def test_cohere_v2_and_text_embeddings_inference_rerank_shapes(server, checkpoints):
    """Cohere's current client posts to /v2/rerank; text-embeddings-inference's clients to /rerank {query, texts}:
    both get the scores of /v1/rerank, in their own shapes, under the same caps."""
    import cohere

    documents = ["notes about cats and kittens", "a chocolate cake recipe", "the rules of chess"]
    status, v1 = server.post("/v1/rerank", {"query": "a cat", "documents": documents})
    assert status == 200
    client = cohere.ClientV2(api_key="unused", base_url=server.url)
    answer = client.rerank(model=str(checkpoints["reranker"]), query="a cat", documents=documents, top_n=2)
    assert [(r.index, r.relevance_score) for r in answer.results] == [
        (r["index"], r["relevance_score"]) for r in v1["results"][:2]]
    assert answer.id and answer.meta.api_version.version == "2"
    status, tei = server.post("/rerank", {"query": "a cat", "texts": documents, "return_text": True})
    assert status == 200 and tei == [{"index": r["index"], "score": r["relevance_score"],
                                      "text": documents[r["index"]]} for r in v1["results"]]
    for path, body in (("/v2/rerank", {"query": "x", "documents": ["d"] * 1001}),
                       ("/rerank", {"query": "x", "texts": ["d"] * 1001}),
                       ("/v2/rerank", {"query": "x", "documents": ["d"], "top_n": 1001})):
        status, refused = server.post(path, body)
        assert status == 400 and "1000" in refused["error"]["message"], (path, refused)


def test_cli_with_a_server_imports_no_model_library(server, index_dir):
    probe = ("import runpy, sys; sys.argv = ['qvlsearch', 'search', 'a cat', '--index', sys.argv[1], '--paths']\n"
             "try:\n    runpy.run_module('qvlsearch', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'transformers', 'faiss') if m in sys.modules), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe, str(index_dir)], capture_output=True, text=True, env=ENV,
                            errors="surrogateescape",
                            timeout=60)
    assert result.stderr.strip() == "[]" and len(result.stdout.splitlines()) == 6


def test_fifty_requests_from_ten_clients_all_answered(server, checkpoints):
    model = str(checkpoints["embedder"])
    texts = [f"request {n}: {'a cat ' * (n % 7)}and a dog" for n in range(50)]

    def ask(n: int) -> tuple[int, list[float]]:
        status, body = server.post("/v1/embeddings", {"model": model, "input": [texts[n], "shared"],
                                                      "dimensions": 32 + n % 3 * 16})
        assert status == 200, body
        return n, body["data"][0]["embedding"]

    with ThreadPoolExecutor(10) as pool:
        answers = dict(pool.map(ask, range(50)))
    assert sorted(answers) == list(range(50))
    for n in (0, 7, 49):  # alone, each request gets the same vector as in the crowd
        assert np.abs(np.array(ask(n)[1]) - answers[n]).max() < 1e-5
        assert len(answers[n]) == 32 + n % 3 * 16


def test_bad_requests_get_openai_style_errors(server, index_dir, checkpoints, tmp_path):
    model = str(checkpoints["embedder"])
    status, body = server.post("/v1/embeddings", None, raw=b'{"model": "x", "input": [')
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "JSON" in body["error"]["message"]
    assert server.post("/v1/embeddings", {"model": model, "input": 5})[0] == 400
    assert server.post("/v1/embeddings", {"model": model, "input": "x", "dimensions": 5})[0] == 400
    status, body = server.post("/v1/embeddings", {"model": "no-such-model", "input": "x"})
    assert status == 404 and "no-such-model" in body["error"]["message"]
    status, body = server.post("/v1/search", {"query": "x", "kind": "audio"})
    assert status == 400 and "kind must be one of" in body["error"]["message"]
    # files: inside the index's roots yes, elsewhere no; URLs only with --allow-urls; data: URIs always
    outside = tmp_path / "cake.jpg"
    shutil.copy(PHOTOS / "cake.jpg", outside)
    for source in (str(outside), "file://" + str(outside), "http://127.0.0.1:9/cake.jpg", str(root_of(index_dir))
                   + "/../../../cake.jpg"):
        status, body = server.post("/v1/embeddings", {"model": model, "input": [{"image": source}]})
        assert status == 403 and body["error"]["type"] == "permission_error", source
    data_uri = "data:image/jpeg;base64," + base64.b64encode(outside.read_bytes()).decode()
    by_uri = server.post("/v1/embeddings", {"model": model, "input": [{"image": data_uri}]})
    inside = str(root_of(index_dir) / "cake.jpg")
    by_path = server.post("/v1/embeddings", {"model": model, "input": [{"image": inside}]})
    assert by_uri[0] == by_path[0] == 200 and by_uri[1]["data"] == by_path[1]["data"]
    # one unreadable item: 422 naming it, with the others' vectors
    status, body = server.post("/v1/embeddings", {"model": model, "input": [
        "fine", {"image": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}, "also fine"]})
    assert status == 422 and body["error"]["message"].startswith("item 1: image data URI")
    assert [f["index"] for f in body["error"]["failed"]] == [1] and [d["index"] for d in body["data"]] == [0, 2]
    # a body over the limit is refused before it is read
    import http.client

    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    connection.putrequest("POST", "/v1/embeddings")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(65 * 2**20))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["type"] == "request_too_large"
    connection.close()
    # a client that goes away mid-request does not stop the server
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    connection.request("POST", "/v1/search", json.dumps({"query": "a cat", "rerank": True}),
                       {"Content-Type": "application/json"})
    connection.close()
    assert server.post("/v1/search", {"query": "a cat", "k": 1})[0] == 200


def test_unknown_routes_and_methods_get_openai_style_errors(server):
    status, body = server.post("/v1/chat/completions", {"model": "x"})
    assert status == 404 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("POST /v1/chat/completions: Not Found; this server answers")
    request = urllib.request.Request(server.url + "/v1/search")  # a GET where only POST is
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=30)
    assert answer.value.code == 405 and answer.value.headers["Allow"] == "POST"
    error = json.loads(answer.value.read())["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith("GET /v1/search: Method Not")


def test_search_follows_the_index_as_it_is_written(server, index_dir, checkpoints, embedder):
    with urllib.request.urlopen(server.url + "/health") as response:
        before = json.loads(response.read())
    assert before["model"] == str(checkpoints["embedder"]) and before["index"] == str(index_dir)
    new = root_of(index_dir) / "bees.txt"
    shutil.copy(SAMPLE_DATA / "notes" / "bees and flowers.txt", new)
    try:
        Indexer(index_dir, IndexOptions(model=str(checkpoints["embedder"])), embedder=embedder).run(
            [root_of(index_dir)])
        status, records = server.post("/v1/search", {"query": "bees", "k": 50})
        assert status == 200 and str(new) in [r["path"] for r in records]
        with urllib.request.urlopen(server.url + "/health") as response:
            assert json.loads(response.read())["generation"] > before["generation"]
    finally:
        new.unlink()
        Indexer(index_dir, IndexOptions(model=str(checkpoints["embedder"])), embedder=embedder).run(
            [root_of(index_dir)])


def test_api_key_sigterm_and_refused_bind(tmp_path, index_dir, checkpoints):
    refused = cli("serve", "--index", str(index_dir), "--host", "0.0.0.0")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "API key" in refused.stderr
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy, ignore=shutil.ignore_patterns("server.json", "lock*"))
    with Served(copy, checkpoints, "--api-key", "s3cret") as keyed:
        assert keyed.post("/v1/search", {"query": "a cat"})[0] == 401
        assert keyed.post("/v1/search", {"query": "a cat"}, headers={"Authorization": "Bearer wrong"})[0] == 401
        status, records = keyed.post("/v1/search", {"query": "a cat"}, headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and records
        search = ("search", "a cat", "--index", str(copy), "--jsonl")
        with_key = cli(*search, env={**ENV, "QVLSEARCH_SERVER": keyed.url, "QVLSEARCH_API_KEY": "s3cret"})
        assert with_key.returncode == 0 and [json.loads(x) for x in with_key.stdout.splitlines()] == as_printed(records)
        without = cli(*search, env={**ENV, "QVLSEARCH_SERVER": keyed.url})
        assert without.returncode == 2 and "API key" in without.stderr
    assert not (copy / "server.json").exists()


def test_a_stale_discovery_file_is_ignored_quickly(tmp_path, monkeypatch):
    monkeypatch.delenv("QVLSEARCH_SERVER", raising=False)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for pid in (gone.pid, os.getpid()):  # a dead process; a live one that no longer listens
        (tmp_path / "server.json").write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": pid,
                                                          "host": socket.gethostname()}))
        started = time.monotonic()
        assert find_server(tmp_path, search=True) is None
        assert time.monotonic() - started < 1


def raw_request(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None
                ) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly these headers (a browser's, or a rebound name's), as http.client sends them."""
    import http.client

    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    try:
        connection.putrequest(method, path, skip_host="Host" in (headers or {}))
        for name, value in {**({"Content-Length": str(len(body))} if method == "POST" else {}),
                            **(headers or {})}.items():
            connection.putheader(name, value)
        connection.endheaders(body or None)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def test_rebound_names_other_origins_and_form_posts_are_refused(server):
    port = server.url.rsplit(":", 1)[1]
    query = json.dumps({"query": "a cat"}).encode()
    as_json = {"Content-Type": "application/json"}
    for host in ("localhost", f"localhost:{port}", "127.0.0.1", f"127.0.0.1:{port}", f"[::1]:{port}"):
        status, _, body = raw_request(server.url, "POST", "/v1/search", query, {**as_json, "Host": host})
        assert status == 200 and json.loads(body), host
    # DNS rebinding: a page of attacker.example whose name now points at 127.0.0.1 reads nothing
    for host in (f"attacker.example:{port}", "attacker.example", "127.0.0.1.attacker.example", "[", "evil:x"):
        status, _, body = raw_request(server.url, "POST", "/v1/search", query, {**as_json, "Host": host})
        assert status == 400 and list(json.loads(body)) == ["error"], host
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert raw_request(server.url, "GET", "/health", headers={"Host": "attacker.example"})[0] == 400
    # a page of another origin (or port) may neither post nor preflight; no answer carries CORS headers
    for headers in ({"Origin": "http://attacker.example"}, {"Origin": f"http://localhost:{int(port) + 1}"},
                    {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        status, answer, body = raw_request(server.url, "POST", "/v1/search", query, {**as_json, **headers})
        assert status == 403 and json.loads(body)["error"]["type"] == "permission_error", headers
        assert not [h for h in answer if h.startswith("access-control-")]
    status, answer, _ = raw_request(server.url, "OPTIONS", "/v1/search", headers={
        "Origin": "http://attacker.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert status == 403 and not [h for h in answer if h.startswith("access-control-")]
    same = raw_request(server.url, "POST", "/v1/search", query, {**as_json, "Origin": server.url,
                                                                 "Sec-Fetch-Site": "same-origin"})
    assert same[0] == 200 and not [h for h in same[1] if h.startswith("access-control-")]
    # the "simple" cross-site POSTs that skip a preflight: a form, or text/plain
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, _, body = raw_request(server.url, "POST", "/v1/search", query, {"Content-Type": kind})
        assert status == 415 and "application/json" in json.loads(body)["error"]["message"], kind
    assert raw_request(server.url, "POST", "/v1/search", query, {"Content-Type": "application/json; charset=utf-8"}
                       )[0] == 200


def test_requests_beyond_the_caps_are_refused_naming_the_limit(server, index_dir, checkpoints):
    model = str(checkpoints["embedder"])
    video = {"video": "data:video/mp4;base64,AAAA"}  # refused before any decoder sees it
    cat = str(root_of(index_dir) / "cat.jpg")
    refused = [
        ("/v1/embeddings", {"model": model, "input": ["x"] * 257}, "256"),
        ("/v1/embeddings", {"model": model, "input": "x" * 100_001}, "100000"),
        ("/v1/embeddings", {"model": model, "input": [{"text": ["a", "x" * 100_001]}]}, "100000"),
        ("/v1/embeddings", {"model": model, "input": [{**video, "fps": 2}]}, "fps 2 is over this server's limit"),
        ("/v1/embeddings", {"model": model, "input": [{**video, "max_frames": 65}]}, "limit of 64"),
        ("/v1/embeddings", {"model": model, "input": [{**video, "max_frames": 1}]}, "max_frames must be"),
        ("/v1/embeddings", {"model": model, "input": [{**video, "fps": -1}]}, "fps must be"),
        ("/v1/embeddings", {"model": model, "input": [{**video, "fps": float("nan")}]}, "fps must be"),
        ("/v1/embeddings", {"model": model, "input": [{"image": [cat] * 9}]}, "limit of 8"),
        ("/v1/embeddings", {"model": model, "input": [{"image": [cat] * 4}]}, "over the limit of 5640"),
        ("/v1/embeddings", {"model": model, "input": [{"image": [cat] * 2, **video}]}, "over the limit of 5640"),
        ("/v1/rerank", {"query": "x", "documents": [{"image": [cat] * 4}]}, "over the limit of 5640"),
        ("/v1/rerank", {"query": "x", "documents": ["d"] * 1001}, "1000"),
        ("/v1/rerank", {"query": "x", "documents": ["d"], "top_n": 1001}, "1000"),
        ("/v1/rerank", {"query": {**video, "fps": 30}, "documents": ["d"]}, "fps 30"),
        ("/v1/rerank", {"query": "x", "documents": ["d"], "instruction": "x" * 100_001}, "100000"),
        ("/v1/search", {"query": "a cat", "k": 1e21}, "k"),
        ("/v1/search", {"query": "a cat", "k": 1001}, "1000"),
        ("/v1/search", {"query": "a cat", "rerank": True, "rerank_top": 1e20}, "rerank_top"),
        ("/v1/search", {"query": "a cat", "rerank": True, "rerank_top": 201}, "200"),
        ("/v1/search", {"query": {**video, "fps": 30, "max_frames": 300}}, "fps 30"),
    ]
    for path, body, said in refused:
        status, answer = server.post(path, body)
        assert status == 400 and said in answer["error"]["message"], (path, str(body)[:80], answer)
        assert answer["error"]["type"] == "invalid_request_error"
    # at the caps, and below the server's settings, all is well
    status, answer = server.post("/v1/embeddings", {"model": model, "input": [{"text": "x" * 100_000, "fps": 0.5,
                                                                               "max_frames": 2}] + ["y"] * 255})
    assert status == 200 and len(answer["data"]) == 256
    assert server.post("/v1/search", {"query": "a cat", "k": 1000, "rerank": True, "rerank_top": 5})[0] == 200


def test_photos_are_embedded_in_chunks_of_bounded_pixels_with_the_same_vectors(server, index_dir, checkpoints):
    """One-photo items and an item of three photos (the most an item may have) pass, embedded a few at a
    time (server.chunks: 256 one-photo items go three at a time), with the vectors that each gets alone."""
    model = str(checkpoints["embedder"])
    photos = [str(root_of(index_dir) / name) for name in ("cat.jpg", "cake.jpg")]
    items = [{"image": photos[i % 2]} for i in range(6)] + [{"image": [*photos, photos[0]]}]
    status, answer = server.post("/v1/embeddings", {"model": model, "input": items})
    assert status == 200 and len(answer["data"]) == 7
    for item, record in zip(items[:2] + items[-1:], answer["data"][:2] + answer["data"][-1:], strict=True):
        status, alone = server.post("/v1/embeddings", {"model": model, "input": [item]})
        assert status == 200 and np.allclose(alone["data"][0]["embedding"], record["embedding"], atol=1e-5)
    assert [len(c) for c in chunks(items, VisionOptions())] == [3, 3, 1]
    assert [len(c) for c in chunks([{"image": photos[0]}] * 256 + [{"text": "x"}] * 9, VisionOptions())
            ] == [3] * 85 + [1 + 9]


def test_embed_through_a_server_when_every_item_succeeds(server, index_dir, checkpoints):
    lines = "".join(json.dumps(item) + "\n" for item in ({"text": "a cat"}, {"image": str(root_of(index_dir)
                                                                                          / "cake.jpg")}))
    args = ("embed", "-", "--model", str(checkpoints["embedder"]))
    remote = cli("-v", *args, stdin=lines, env=with_index(index_dir))
    local = cli(*args, "--no-server", stdin=lines)
    assert remote.returncode == local.returncode == 0, remote.stderr
    assert f"qvlsearch: using the server at {server.url}\n" in remote.stderr and "Traceback" not in remote.stderr
    assert remote.stdout == local.stdout


def test_relative_model_paths_find_the_server_and_paths_keep_their_bytes(server, index_dir, checkpoints):
    folder = checkpoints["embedder"].parent
    search = ("search", "a cafe menu", "--index", str(index_dir), "-k", "50")
    relative = cli("-v", *search, "--model", "embedder", "--rerank", "--reranker", "./reranker", "--json",
                   cwd=folder)
    used = f"qvlsearch: using the server at {server.url}\n"  # (not "not using the server at …")
    assert relative.returncode == 0 and used in relative.stderr, relative.stderr
    rerank = cli("-v", "rerank", "a cat", str(root_of(index_dir) / "cats.txt"), "--reranker", "reranker",
                 env=with_index(index_dir), cwd=folder)
    assert rerank.returncode == 0 and used in rerank.stderr, rerank.stderr
    # --paths -0 writes each name's exact bytes, with the server as without it: xargs -0 opens them
    remote = cli(*search, "--paths", "-0", text=False)
    local = cli(*search, "--paths", "-0", "--no-server", text=False)
    assert remote.returncode == local.returncode == 0
    assert remote.stdout == local.stdout and bytes(root_of(index_dir)) + b"/" + CAFE + b"\0" in remote.stdout
    for name in remote.stdout.split(b"\0")[:-1]:
        assert os.path.exists(name), name
    as_json = cli(*search, "--jsonl")
    assert as_json.stdout == cli(*search, "--jsonl", "--no-server").stdout and "path_bytes" not in as_json.stdout


class Recorder(http.server.BaseHTTPRequestHandler):
    """A planted server: answers as a qvlsearch server would, and records every request it gets."""

    seen: list = []
    health: dict = {}

    def do_GET(self) -> None:
        self.answer()

    def do_POST(self) -> None:
        self.answer(self.rfile.read(int(self.headers.get("Content-Length", 0))))

    def answer(self, body: bytes = b"") -> None:
        self.seen.append((self.path, dict(self.headers), body))
        made_up = self.health if self.path == "/health" else [{"rank": 1, "path": "/planted", "kind": "text",
                                                                "score": 1.0, "id": 1}]
        data = json.dumps(made_up).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_a_planted_server_json_gets_neither_the_key_nor_the_query(tmp_path, index_dir, checkpoints, monkeypatch,
                                                                  capsys):
    from qvlsearch.client import write_discovery

    shared = tmp_path / "shared-index"  # an index folder that other users may write to
    shutil.copytree(index_dir, shared, ignore=shutil.ignore_patterns("server.json", "lock*"))
    Recorder.health = {"status": "ok", "model": str(checkpoints["embedder"]), "index": str(shared),
                       "reranker": str(checkpoints["reranker"])}
    planted = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=planted.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{planted.server_address[1]}"
    announce = {"url": url, "pid": os.getpid(), "host": socket.gethostname(), "api_key": True}
    try:
        (shared / "server.json").write_text(json.dumps(announce))
        os.chmod(shared, 0o777)
        search = ("search", "my private query", "--index", str(shared), "--jsonl")
        env = {**ENV, "QVLSEARCH_API_KEY": "s3cret"}
        result = cli("-v", *search, env=env)
        local = cli(*search, "--no-server")
        assert Recorder.seen == []
        assert result.returncode == 0 and result.stdout == local.stdout and "/planted" not in result.stdout
        assert f"{shared} is writable by other users (mode 777)" in result.stderr
        os.chmod(shared, 0o755)
        monkeypatch.delenv("QVLSEARCH_SERVER", raising=False)
        monkeypatch.setenv("QVLSEARCH_API_KEY", "s3cret")
        os.chmod(shared / "server.json", 0o666)  # a file that others may write
        assert find_server(shared, search=True) is None
        os.chmod(shared / "server.json", 0o600)
        (shared / "server.json").rename(tmp_path / "elsewhere.json")  # a link to a file elsewhere
        (shared / "server.json").symlink_to(tmp_path / "elsewhere.json")
        assert find_server(shared, search=True) is None
        (shared / "server.json").unlink()
        for elsewhere in ("http://192.0.2.1:9", "https://127.0.0.1:9", "http://attacker.example:80"):
            (shared / "server.json").write_text(json.dumps({**announce, "url": elsewhere}))
            assert find_server(shared, search=True) is None
        assert Recorder.seen == []
        (shared / "server.json").write_text(json.dumps(announce))  # the user's own file: the key goes there
        assert find_server(shared, search=True) is not None
        assert Recorder.seen[0][1]["Authorization"] == "Bearer s3cret"
    finally:
        planted.shutdown()
    # serve writes its file afresh, mode 0600, never through a link planted at a name it might use
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    for name in (f".server.json.{os.getpid()}", "server.json"):
        (shared / name).unlink(missing_ok=True)
        (shared / name).symlink_to(victim)
    written = write_discovery(shared, "http://127.0.0.1:1", False)
    assert victim.read_text() == "precious\n" and not written.is_symlink()
    assert oct(written.stat().st_mode & 0o777) == "0o600" and json.loads(written.read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in shared.glob(".server.json*")) == [f".server.json.{os.getpid()}"]
    # serve says when its folder would make commands distrust the file it writes
    from qvlsearch.server import announce

    os.chmod(shared, 0o775)
    capsys.readouterr()
    assert announce(shared, "http://127.0.0.1:1", False) == shared / "server.json"
    assert capsys.readouterr().err == (f"qvlsearch: {shared} is writable by other users (mode 775), so commands "
                                       "will not use this server unless QVLSEARCH_SERVER=http://127.0.0.1:1 names it\n")


def test_a_needed_key_that_is_missing_is_said(tmp_path, index_dir, checkpoints):
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy, ignore=shutil.ignore_patterns("server.json", "lock*"))
    with Served(copy, checkpoints, "--api-key", "s3cret") as keyed:
        search = ("search", "a cat", "--index", str(copy), "--jsonl")
        without = cli(*search)
        assert without.returncode == 0 and without.stdout
        assert without.stderr == f"qvlsearch: the server at {keyed.url} needs an API key: set QVLSEARCH_API_KEY " \
                                 "to use it; working here\n"
        wrong = cli(*search, env={**ENV, "QVLSEARCH_API_KEY": "wrong"})
        assert wrong.returncode == 0 and "refuses QVLSEARCH_API_KEY" in wrong.stderr


@pytest.fixture
def read_only_copy(tmp_path, index_dir):
    """A copy of the index on a file system mounted read-only (root itself cannot write there)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True
                      ).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        shutil.copytree(index_dir, mount / "index", ignore=shutil.ignore_patterns("server.json", "lock*"))
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield mount / "index"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_serve_on_a_read_only_index_folder(read_only_copy, checkpoints):
    with Served(read_only_copy, checkpoints, announced=False) as served:
        said = "".join(served.said)
        assert said.count("\n") == 1 and "cannot write" in said and "Read-only file system" in said
        assert f"QVLSEARCH_SERVER={served.url}" in said
        status, records = served.post("/v1/search", {"query": "a cat", "k": 2})
        assert status == 200 and len(records) == 2
    assert "Traceback" not in served.process.stderr.read()
