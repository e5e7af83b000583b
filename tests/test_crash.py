"""A media decoder that crashes (a segfault on a hostile file) costs that one input: the server answers that
item's 422 and goes on serving; `qvlsearch index` records that file's error row and goes on.

The crash is real: tests/crash_site/sitecustomize.py, put on PYTHONPATH, makes the media libraries of every
process (the CLI, the server and their workers) raise SIGSEGV on files whose name contains "crash-decoder".
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from conftest import PHOTOS, SAMPLE_DATA
from make_media import make_image, make_video
from PIL import Image
from test_server import Served

from qvlsearch.indexer import Indexer, IndexOptions
from qvlsearch.store import Snapshot

CRASH_SITE = Path(__file__).resolve().parent / "crash_site"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(CRASH_SITE), os.environ.get("PYTHONPATH")) if p)}
ENV.pop("QVLSEARCH_SERVER", None)
ENV.pop("QVLSEARCH_API_KEY", None)
CRASHED = "the decoder crashed (SIGSEGV); the file may be corrupt or hostile"


def crash_files(folder: Path) -> dict[str, Path]:
    """An image, a video and a PDF, each a good file but for the name that makes the decoder crash."""
    return {"image": make_image(folder / "crash-decoder.png", color=(10, 200, 30)),
            "video": make_video(folder / "crash-decoder.mp4"),
            "pdf": Path(shutil.copy(next((SAMPLE_DATA / "documents").glob("*.pdf")), folder / "crash-decoder.pdf"))}


def test_the_server_answers_422_for_media_that_crash_the_decoder_and_goes_on(tmp_path, checkpoints, embedder):
    root = tmp_path / "files"
    root.mkdir()
    cake = Path(shutil.copy(PHOTOS / "cake.jpg", root / "cake.jpg"))
    Indexer(tmp_path / "index", IndexOptions(model=str(checkpoints["embedder"])), embedder=embedder).run([root])
    crash = crash_files(root)  # under the roots: the server may read them
    with Served(tmp_path / "index", checkpoints, env=ENV) as server:
        _, health = server.get("/health")
        status, body = server.post("/v1/embeddings", {
            "model": "embedder", "encoding_format": "float",
            "input": [{"image": str(crash["image"])}, {"image": str(cake)}, "a cat", {"video": str(crash["video"])}]})
        assert status == 422, body
        assert [f["index"] for f in body["error"]["failed"]] == [0, 3]
        assert body["error"]["failed"][0]["message"] == f"item 0: image {str(crash['image'])!r}: {CRASHED}"
        assert body["error"]["failed"][1]["message"] == f"item 3: video {str(crash['video'])!r}: {CRASHED}"
        assert [d["index"] for d in body["data"]] == [1, 2]  # the other items' vectors
        expected = embedder.embed([{"image": str(cake)}, {"text": "a cat"}])
        assert np.abs(np.array([d["embedding"] for d in body["data"]]) - expected).max() < 1e-5

        status, body = server.post("/v1/rerank", {"query": "a cake", "documents": [
            {"image": str(crash["image"])}, "a cake with candles", {"image": str(cake)}]})
        assert status == 422, body
        assert body["error"]["failed"] == [{"index": 0, "message": f"item 0: image {str(crash['image'])!r}: {CRASHED}"}]
        assert sorted(r["index"] for r in body["results"]) == [1, 2]
        status, body = server.post("/v1/rerank", {"query": {"image": str(crash["image"])}, "documents": ["a", "b"]})
        assert status == 422 and body["error"]["message"] == f"query: image {str(crash['image'])!r}: {CRASHED}"
        status, body = server.post("/v1/search", {"query": {"image": str(crash["image"])}})
        assert status == 422 and re.fullmatch(rf"item 0: image .*: {re.escape(CRASHED)}", body["error"]["message"])

        status, body = server.post("/v1/embeddings", {"model": "embedder", "input": ["a dog"]})
        assert status == 200 and len(body["data"]) == 1
        assert server.get("/health")[1]["pid"] == health["pid"] == server.process.pid  # the same server


def test_the_web_page_shows_a_card_for_an_indexed_file_that_now_crashes_its_decoder(tmp_path, checkpoints, embedder):
    """A video, a PDF and a RAW-free photo indexed as good files (here, without the crashing decoders) that crash
    the server's decoders when their pictures are made (a file changed since it was indexed): each thumbnail and
    viewer picture is a card that says so, and the server goes on."""
    root = tmp_path / "files"
    root.mkdir()
    shutil.copy(PHOTOS / "cake.jpg", root / "cake.jpg")
    crash = crash_files(root)
    Indexer(tmp_path / "index", IndexOptions(model=str(checkpoints["embedder"])), embedder=embedder).run([root])
    items = Snapshot(tmp_path / "index").items
    ids = {Path(p).name: i for p, i, page in zip(items["path"].to_pylist(), items["id"].to_pylist(),
                                                 items["page"].to_pylist(), strict=True) if page in (None, 1)}
    with Served(tmp_path / "index", checkpoints, env=ENV) as server:
        _, health = server.get("/health")
        pictures = [("thumb", crash["video"].name), ("thumb", crash["pdf"].name), ("view", crash["pdf"].name),
                    ("thumb", "cake.jpg"), ("view", "cake.jpg")]  # a video's view is the video file itself
        for route, name in pictures:
            with urllib.request.urlopen(f"{server.url}/web/{route}/{ids[name]}", timeout=120) as answer:
                assert answer.status == 200 and answer.headers["Content-Type"] == "image/jpeg", name
                assert Image.open(io.BytesIO(answer.read())).size[0] > 0
        assert server.get("/health")[1]["pid"] == health["pid"] == server.process.pid  # the same server
    said = server.process.stderr.read()
    assert said.count(f": {CRASHED}") == 3, said


def index(root: Path, index_dir: Path, checkpoints: dict, *more: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qvlsearch", "index", str(root), "--index", str(index_dir),
                           "--model", str(checkpoints["embedder"]), "--workers", "2", "--json", *more],
                          capture_output=True, text=True, env=ENV, timeout=600)


def rows(index_dir: Path) -> dict[str, tuple[int, str, str | None]]:
    items = Snapshot(index_dir, with_index=False).items
    return {Path(p).name: (i, s, e) for p, i, s, e in zip(
        *(items[c].to_pylist() for c in ("path", "id", "status", "error")), strict=True)}


def test_index_records_a_video_or_pdf_that_crashes_the_decoder_as_its_error_and_goes_on(tmp_path, checkpoints):
    root = tmp_path / "files"
    make_image(root / "good.png")
    make_video(root / "clip.mp4")
    (root / "note.txt").write_text("a note about cats\n")
    crash = crash_files(root)
    crash.pop("image").unlink()  # photos are decoded in threads, unless --processes (next test)
    result = index(root, tmp_path / "index", checkpoints)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["added"], summary["failed"]) == (3, 2)
    assert sorted((Path(f["path"]).name, f["error"]) for f in summary["failures"]) == [
        ("crash-decoder.mp4", CRASHED), ("crash-decoder.pdf", CRASHED)]
    first = rows(tmp_path / "index")
    assert {name: status for name, (_, status, _) in first.items()} == {
        "good.png": "ok", "clip.mp4": "ok", "note.txt": "ok",
        "crash-decoder.mp4": "error", "crash-decoder.pdf": "error"}

    again = index(root, tmp_path / "index", checkpoints, "--strict")
    assert again.returncode == 1, again.stderr  # failures are still failures
    assert (json.loads(again.stdout)["unchanged"], json.loads(again.stdout)["failed"]) == (3, 2)
    assert rows(tmp_path / "index") == first  # nothing was tried again

    os.utime(crash["video"], ns=(time.time_ns(), time.time_ns()))  # a changed file is tried again
    third = index(root, tmp_path / "index", checkpoints)
    assert third.returncode == 0, third.stderr
    after = rows(tmp_path / "index")
    assert {name for name in first if after[name] != first[name]} == {"crash-decoder.mp4"}
    assert after["crash-decoder.mp4"][1:] == ("error", CRASHED)


def test_with_processes_a_photo_that_crashes_the_decoder_is_its_error_too(tmp_path, checkpoints):
    root = tmp_path / "files"
    make_image(root / "good.png")
    (root / "note.txt").write_text("a note about cats\n")
    make_image(root / "crash-decoder.png")  # its header and metadata read well; it crashes as it is embedded
    result = index(root, tmp_path / "index", checkpoints, "--processes")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["added"], summary["failures"]) == (2, [{"path": str(root / "crash-decoder.png"), "error": CRASHED}])
