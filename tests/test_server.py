"""`qvlsearch serve`: a real server in a subprocess, reached with the `openai` client, urllib and the CLI."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
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

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
ENV.pop("QVLSEARCH_SERVER", None)
ENV.pop("QVLSEARCH_API_KEY", None)
FILES = [PHOTOS / "cake.jpg", PHOTOS / "cat.jpg", PHOTOS / "bee.jpg", SAMPLE_DATA / "broken" / "corrupt.jpg",
         SAMPLE_DATA / "notes" / "cats.txt", SAMPLE_DATA / "notes" / "chess.txt"]


def cli(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qvlsearch", *args], input=stdin, capture_output=True, text=True,
                          env=env or ENV, timeout=300)


class Served:
    """A `qvlsearch serve` subprocess and its URL."""

    def __init__(self, index_dir: Path, checkpoints: dict, *extra: str):
        self.index_dir = index_dir
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qvlsearch", "serve", "--index", str(index_dir), "--port", "0",
             "--reranker", str(checkpoints["reranker"]), *extra],
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, checkpoints, embedder) -> Path:
    root = tmp_path_factory.mktemp("served") / "files"
    root.mkdir()
    for path in FILES:
        shutil.copy(path, root / path.name)
    index = root.parent / "index"
    Indexer(index, IndexOptions(model=str(checkpoints["embedder"])), embedder=embedder).run([root])
    return index


@pytest.fixture(scope="module")
def server(index_dir, checkpoints):
    served = Served(index_dir, checkpoints)
    yield served
    assert served.stop() == 0
    assert not (index_dir / "server.json").exists()


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
    assert status == 200 and records == json.loads(local.stdout)
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


def test_cli_with_a_server_imports_no_model_library(server, index_dir):
    probe = ("import runpy, sys; sys.argv = ['qvlsearch', 'search', 'a cat', '--index', sys.argv[1], '--paths']\n"
             "try:\n    runpy.run_module('qvlsearch', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'transformers', 'faiss') if m in sys.modules), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe, str(index_dir)], capture_output=True, text=True, env=ENV,
                            timeout=60)
    assert result.stderr.strip() == "[]" and len(result.stdout.splitlines()) == 5


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
    keyed = Served(copy, checkpoints, "--api-key", "s3cret")
    try:
        assert keyed.post("/v1/search", {"query": "a cat"})[0] == 401
        assert keyed.post("/v1/search", {"query": "a cat"}, headers={"Authorization": "Bearer wrong"})[0] == 401
        status, records = keyed.post("/v1/search", {"query": "a cat"}, headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and records
        search = ("search", "a cat", "--index", str(copy), "--jsonl")
        with_key = cli(*search, env={**ENV, "QVLSEARCH_SERVER": keyed.url, "QVLSEARCH_API_KEY": "s3cret"})
        assert with_key.returncode == 0 and [json.loads(x) for x in with_key.stdout.splitlines()] == records
        without = cli(*search, env={**ENV, "QVLSEARCH_SERVER": keyed.url})
        assert without.returncode == 2 and "API key" in without.stderr
    finally:
        assert keyed.stop() == 0
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
