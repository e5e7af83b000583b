"""`qvlsearch search` and `qvlsearch rerank`, and `open_index`, over an index of sample_data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTOS, SAMPLE_DATA
from PIL import Image
from terminal import check_paths, on_terminal

from qvlsearch import InputError, MediaError, open_index
from qvlsearch.fs import display_path
from qvlsearch.indexer import Indexer, IndexOptions
from qvlsearch.search import SearchIndex, SearchResult
from qvlsearch.store import Store, StoreError, now

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
INDEX_INSTRUCTION = "Represent the user's input."
VIDEOS = sorted(str(p) for p in (SAMPLE_DATA / "videos").iterdir())


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, checkpoints, embedder) -> Path:
    path = tmp_path_factory.mktemp("search") / "index"
    Indexer(path, IndexOptions(model=str(checkpoints["embedder"]), device="cpu"), embedder=embedder).run([SAMPLE_DATA])
    return path


@pytest.fixture(scope="module")
def index(index_dir, embedder, reranker):
    from qvlsearch.search import SearchIndex

    return SearchIndex(index_dir, embedder=embedder, reranker=reranker)


def cli(*args: str, stdin: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qvlsearch", *args], input=stdin, capture_output=True, text=True,
                          env=ENV, timeout=300, **kwargs)


def test_text_query_returns_k_results_best_first(index):
    results = index.search("a black cat", k=7, mode="semantic")  # hybrid ranks by fused rank, not by score
    assert [r.rank for r in results] == list(range(1, 8))
    assert all(isinstance(r, SearchResult) for r in results)
    scores = [r.score for r in results]
    assert scores == sorted(scores, reverse=True)


def test_search_loads_no_reranker_unless_asked(index_dir, embedder, tmp_path):
    from qvlsearch.errors import ModelLoadError

    fresh = SearchIndex(index_dir, embedder=embedder, reranker_model=str(tmp_path / "no-reranker-here"))
    assert len(fresh.search("cat", k=3)) == 3  # loading that reranker would fail: it was not loaded
    with pytest.raises(ModelLoadError, match="no-reranker-here"):
        fresh.search("cat", k=3, rerank=True)


def test_image_query_finds_that_image_first(index):
    results = index.search({"image": str(PHOTOS / "cake.jpg")}, k=3, instruction=INDEX_INSTRUCTION)
    assert results[0].path == str(PHOTOS / "cake.jpg")
    assert results[0].score == pytest.approx(1.0, abs=2e-3)


def test_url_video_and_mixed_queries(index, http_base):
    by_url = index.search({"image": http_base + "/photos/cake.jpg"}, k=5)
    by_path = index.search({"image": str(PHOTOS / "cake.jpg")}, k=5)
    assert [r.path for r in by_url] == [r.path for r in by_path]
    video = index.search({"video": VIDEOS[0]}, k=3, instruction=INDEX_INSTRUCTION)
    assert video[0].path == VIDEOS[0]
    mixed = index.search({"text": "this photo, but at night", "image": str(PHOTOS / "cat.jpg")}, k=5)
    assert len(mixed) == 5 and [r.path for r in mixed] != [r.path for r in index.search("x", k=5)]


def test_filters_apply_before_the_cut(index):
    videos = index.search("anything", k=10, kind="video")  # whole videos and moments of the long one
    assert sorted({r.path for r in videos}) == VIDEOS and {r.kind for r in videos} == {"video"}
    images = index.search("anything", k=10, kind="image")
    assert len(images) == 10 and {r.kind for r in images} == {"image"}
    notes = index.search("anything", k=50, under=SAMPLE_DATA / "notes")
    assert len(notes) == 6 and all(r.path.startswith(str(SAMPLE_DATA / "notes") + "/") for r in notes)
    best = index.search("anything", k=50)
    cut = best[5].score
    assert [r.path for r in index.search("anything", k=50, min_score=cut)] == [r.path for r in best[:6]]
    both = index.search("anything", k=10, kind=["text", "video"], under=SAMPLE_DATA / "videos")
    assert sorted({r.path for r in both}) == VIDEOS
    with pytest.raises(InputError, match="kind must be one of"):
        index.search("x", kind="audio")


def test_rerank_orders_by_reranker_scores_and_keeps_both(index, reranker):
    results = index.search("a cat", k=5, rerank=True, rerank_top=12)
    candidates = index.search("a cat", k=12)
    from qvlsearch.search import document_item

    expected = reranker.rerank({"text": "a cat"}, [document_item(c) for c in candidates])
    best = sorted(zip(expected, (c.path for c in candidates), strict=True), key=lambda t: -t[0])[:5]
    assert [r.path for r in results] == [path for _, path in best]
    assert [r.rerank_score for r in results] == pytest.approx([score for score, _ in best], abs=1e-6)
    assert all(r.score is not None and r.to_json()["rerank_score"] is not None for r in results)


def in_process(*args: str, stdin: str | None = None):
    """The CLI in this process (no fresh torch import per call); stdout is not a terminal here."""
    from typer.testing import CliRunner

    from qvlsearch.cli import app

    result = CliRunner().invoke(app, list(args), input=stdin)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def test_cli_formats_and_exit_codes(index_dir, checkpoints):
    base = ["search", "a cat", "--index", str(index_dir), "-k", "4", "--mode", "semantic"]  # no hit by its words
    cli = in_process
    tsv = cli(*base)
    assert tsv.returncode == 0 and len(tsv.stdout.splitlines()) == 4
    assert tsv.stdout.splitlines()[0].split("\t")[0] == "1"
    array = json.loads(cli(*base, "--json").stdout)
    assert [r["rank"] for r in array] == [1, 2, 3, 4]
    for record in array:
        optional = ("duration_s", "taken_at", "lat", "lon", "camera")  # only when known
        assert [key for key in record if key not in optional] == ["rank", "path", "kind", "score", "id"]
    lines = [json.loads(line) for line in cli(*base, "--jsonl").stdout.splitlines()]
    assert lines == array
    assert cli(*base, "--paths").stdout.splitlines() == [r["path"] for r in array]
    assert cli(*base, "--paths", "-0").stdout.split("\0")[:-1] == [r["path"] for r in array]
    refused = subprocess.run([sys.executable, "-m", "qvlsearch", *base, "--json", "--paths"], capture_output=True,
                             text=True, env=ENV, timeout=300)  # a real run: main() makes the exit code
    assert refused.returncode == 2 and refused.stderr == "qvlsearch: choose one of --json, --jsonl and --paths\n"
    nothing = cli(*base, "--min-score", "2")
    assert nothing.returncode == 1 and nothing.stdout == ""
    stdin = cli("search", "-", "--index", str(index_dir), "-k", "2", "--jsonl", "--mode", "semantic", stdin="a cat\n")
    assert [json.loads(x)["path"] for x in stdin.stdout.splitlines()] == [r["path"] for r in array[:2]]


def test_cli_image_query_and_queries_file(index_dir, tmp_path):
    cli = in_process
    image = cli("search", "--image", str(PHOTOS / "cake.jpg"), "--instruction", INDEX_INSTRUCTION, "--index",
                str(index_dir), "-k", "1", "--paths")
    assert image.stdout.strip() == str(PHOTOS / "cake.jpg")
    queries = tmp_path / "queries.txt"
    queries.write_text('a cat\n{"image": "%s"}\n\n' % (PHOTOS / "bee.jpg"))
    result = cli("search", "--queries", str(queries), "--index", str(index_dir), "-k", "2")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0 and len(records) == 4
    assert records[0]["query"] == "a cat" and records[2]["query"] == {"image": str(PHOTOS / "bee.jpg")}


def test_cli_error_paths(index_dir, tmp_path, checkpoints):
    missing = cli("search", "x", "--index", str(tmp_path / "none"))
    assert missing.returncode == 2 and missing.stderr.startswith("qvlsearch: no index at")
    empty_root = tmp_path / "empty"
    empty_root.mkdir()
    assert cli("index", str(empty_root), "--index", str(tmp_path / "e"), "--model",
               str(checkpoints["embedder"]), "--quiet").returncode == 0
    empty = cli("search", "x", "--index", str(tmp_path / "e"))
    assert empty.returncode == 1 and "is empty" in empty.stderr
    mismatch = cli("search", "x", "--index", str(index_dir), "--model", "Qwen/Qwen3-VL-Embedding-8B")
    assert mismatch.returncode == 2 and "was built with model" in mismatch.stderr
    bad_image = cli("search", "--image", str(tmp_path / "nope.jpg"), "--index", str(index_dir))
    assert bad_image.returncode == 2 and "no such file" in bad_image.stderr and "Traceback" not in bad_image.stderr
    assert len(bad_image.stderr.strip().splitlines()) == 1
    assert cli("search", "--index", str(index_dir)).returncode == 2
    with pytest.raises(StoreError, match="no index at"):
        open_index(tmp_path / "none")
    with pytest.raises(MediaError):
        open_index(index_dir).search({"image": str(tmp_path / "nope.jpg")})


def test_search_piped_into_rerank(index_dir, checkpoints):
    searched = cli("search", "a cat", "--index", str(index_dir), "-k", "6", "--jsonl")
    reranked = cli("rerank", "a cat", "-k", "3", "--jsonl", "--reranker", str(checkpoints["reranker"]),
                   stdin=searched.stdout)
    assert reranked.returncode == 0, reranked.stderr
    before = {json.loads(line)["path"]: json.loads(line) for line in searched.stdout.splitlines()}
    after = [json.loads(line) for line in reranked.stdout.splitlines()]
    assert [r["rank"] for r in after] == [1, 2, 3]
    for row in after:
        assert row["score"] == before[row["path"]]["score"] and row["id"] == before[row["path"]]["id"]
    scores = [r["rerank_score"] for r in after]
    assert scores == sorted(scores, reverse=True)


def test_rerank_files_with_an_unreadable_one(tmp_path, checkpoints, reranker):
    files = [str(PHOTOS / "cat.jpg"), str(SAMPLE_DATA / "notes" / "cats.txt"), str(tmp_path / "gone.jpg"),
             VIDEOS[0]]
    result = cli("rerank", "a cat", *files, "--json", "--reranker", str(checkpoints["reranker"]))
    assert result.returncode == 0
    rows = json.loads(result.stdout)
    assert rows[-1]["path"] == files[2] and rows[-1]["rerank_score"] is None
    assert "gone.jpg" in result.stderr and "no such file" in result.stderr
    expected = reranker.rerank("a cat", [{"image": files[0]}, {"text": Path(files[1]).read_text()},
                                         {"video": files[3]}])
    order = [p for _, p in sorted(zip(expected, [files[0], files[1], files[3]], strict=True), key=lambda t: -t[0])]
    assert [r["path"] for r in rows[:3]] == order
    paths = cli("rerank", "a cat", "--paths", "--reranker", str(checkpoints["reranker"]),
                stdin="\n".join(files[:2]) + "\n")
    assert sorted(paths.stdout.splitlines()) == sorted(files[:2])
    assert cli("rerank", "a cat", "--reranker", str(checkpoints["reranker"]), stdin="").returncode == 2


def expected_tile(path: str, kind: str) -> Image.Image:
    """What a result's tile must show, made here from the file: the picture, or a video's middle frame."""
    if kind == "video":
        decord = pytest.importorskip("decord", reason="decord (the qvlsearch[decord] extra) draws the expected frame")

        reader = decord.VideoReader(path)
        tile = Image.fromarray(reader[len(reader) // 2].asnumpy())
    else:
        tile = Image.open(path).convert("RGB")
    tile.thumbnail((256, 256))
    return tile


def tile_of(sheet: Image.Image, i: int, size: tuple[int, int], columns: int) -> Image.Image:
    x, y = (i % columns) * 256, (i // columns) * (256 + 40)
    left, top = x + (256 - size[0]) // 2, y + (256 - size[1]) // 2
    return sheet.crop((left, top, left + size[0], top + size[1]))


def test_contact_sheet(index_dir, tmp_path):
    sheet = tmp_path / "sheet.jpg"
    result = cli("search", "a cat", "--index", str(index_dir), "-k", "7", "--kind", "image",
                 "--contact-sheet", str(sheet), "--paths")
    assert result.returncode == 0
    paths = result.stdout.splitlines()
    with Image.open(sheet) as image:
        assert image.format == "JPEG" and image.size == (5 * 256, 2 * (256 + 40))
        for i, path in enumerate(paths):  # each tile is its photo (up to JPEG's loss), not the fallback card
            want = expected_tile(path, "image")
            got = tile_of(image.convert("RGB"), i, want.size, 5)
            assert np.abs(np.asarray(got, dtype=float) - np.asarray(want, dtype=float)).mean() < 8, path


def test_contact_sheet_shows_every_kind(index, tmp_path):
    from qvlsearch.contact_sheet import text_card, write_contact_sheet

    results = index.search("x", k=1, kind="video") + index.search("x", k=1, kind="text") + index.search(
        "x", k=1, kind="image")
    path = write_contact_sheet(results, tmp_path / "kinds.png")
    with Image.open(path) as image:
        assert image.size == (3 * 256, 256 + 40)
        sheet = image.convert("RGB")
    for i, (result, want) in enumerate(zip(results, (
            expected_tile(results[0].path, "video"),
            text_card(Path(results[1].path).read_text()[:600]),
            expected_tile(results[2].path, "image")), strict=True)):
        assert tile_of(sheet, i, want.size, 3).tobytes() == want.tobytes(), result.path  # a PNG: exactly


def test_table_format_for_terminals(capsys):
    from qvlsearch.cli import emit

    emit([{"rank": 1, "path": "/p/clip.mp4", "kind": "video", "score": 0.5, "rerank_score": 0.9, "id": 3,
           "duration_s": 4.0}, {"rank": 2, "path": "/p/a.jpg", "kind": "image", "score": 0.4, "rerank_score": None,
                                "id": 4}], "table")
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["#", "score", "rerank", "kind", "path", "where"]
    assert "0.9000" in out and "4.0s" in out and "/p/a.jpg" in out and " - " in out


def test_kind_takes_a_comma_separated_list_or_repeats(index, index_dir):
    both = {r.kind for r in index.search("a cat", k=40, kind=["image,video"])}
    assert both == {"image", "video"} and index.search("a cat", kind="image, video") == index.search(
        "a cat", kind=["image", "video"])
    base = ["search", "a cat", "--index", str(index_dir), "-k", "40", "--json"]
    assert in_process(*base, "--kind", "image,video").stdout == in_process(*base, "--kind", "image", "--kind",
                                                                             "video").stdout
    bad = cli(*base, "--kind", "image,audio")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("qvlsearch: kind must be")


def test_rerank_takes_a_video_query_as_search_does(checkpoints):
    files = [str(PHOTOS / "cake.jpg"), str(PHOTOS / "cat.jpg")]
    result = cli("rerank", "--video", VIDEOS[0], *files, "--reranker", str(checkpoints["reranker"]), "--json")
    assert result.returncode == 0, result.stderr
    assert sorted(r["path"] for r in json.loads(result.stdout)) == files


def test_the_table_fits_the_terminal_and_a_pipe_gets_whole_paths(index_dir):
    """At 80 and 60 columns each path is whole or shortened from the left, never broken across lines."""
    base = ["search", "a cat", "--index", str(index_dir), "-k", "8", "--mode", "semantic"]
    paths = [r["path"] for r in json.loads(in_process(*base, "--json").stdout)]
    for columns in (80, 60):
        code, out = on_terminal(*base, columns=columns, env=ENV)
        lines = out.splitlines()
        assert code == 0 and lines[0].split() == ["#", "score", "kind", "path", "where"], out
        check_paths(lines[1:], paths, columns)
        assert "…" in out  # the longest are shortened
    piped = subprocess.run([sys.executable, "-m", "qvlsearch", *base], capture_output=True, text=True,
                           env={**ENV, "COLUMNS": "40"}, timeout=300)
    assert [line.split("\t")[3] for line in piped.stdout.splitlines()] == paths


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_an_index_whose_faiss_file_holds_ids_still_searches(index_dir, embedder, tmp_path, quantize):
    """Indexes written before FAISS rows were mapped by position keep item ids in an IndexIDMap2 (int8: its
    hits are re-scored through their rows)."""
    from schema1 import write_schema1_index

    from qvlsearch.store import Snapshot, StoredVectors

    snapshot = Snapshot(index_dir)
    rows = snapshot.items.to_pylist()
    ok = [r["id"] for r in rows if r["status"] == "ok"]
    vectors = dict(zip(ok, StoredVectors(snapshot).get(np.array(ok)), strict=True))
    old = tmp_path / "old-index"
    settings = {**{k: snapshot.manifest[k] for k in ("model", "dim", "index_type")}, "quantize": quantize}
    write_schema1_index(old, settings, snapshot.manifest["full_dim"], rows, vectors, id_map=True)

    expected = SearchIndex(index_dir, embedder=embedder).search("a black cat", k=5, mode="semantic")
    found = SearchIndex(old, embedder=embedder).search("a black cat", k=5, mode="semantic")  # it has no words
    assert [(r.id, r.path) for r in found] == [(r.id, r.path) for r in expected]
    assert [r.score for r in found] == pytest.approx([r.score for r in expected], abs=1e-6)


def test_a_reader_that_closes_early_is_not_an_error(index_dir):
    """`search | head -1` must not look like "nothing matched" (1) to a script."""
    search = subprocess.Popen([sys.executable, "-m", "qvlsearch", "search", "a cat", "--index", str(index_dir),
                               "--jsonl"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    search.stdout.close()  # the reader is gone before the first result
    assert search.wait(timeout=300) == 0
    assert search.stderr.read() == b""


def synthetic_binary_index(path: Path, rng: np.random.Generator, n: int, full_dim: int,
                           dim: int) -> dict[int, np.ndarray]:
    """A binary index of clustered random vectors over two commits; the second changes 10% of them."""
    settings = {"model": "synthetic", "model_revision": None, "dim": dim, "quantize": "binary", "index_type": "flat",
                "instruction": "", "min_pixels": 0, "max_pixels": 0, "total_pixels": 0, "fps": 1.0, "max_frames": 1}
    store = Store.create(path, settings, full_dim)
    centers = rng.normal(size=(20, full_dim))
    current = {}

    def put(old_id: int | None = None) -> None:
        vector = centers[rng.integers(20)] + 0.5 * rng.normal(size=full_dim)
        vector = (vector / np.linalg.norm(vector)).astype(np.float16)
        item_id = store.put({"id": old_id or store.new_id(), "path": f"/x/{old_id}.txt",
                             "path_bytes": f"/x/{old_id}.txt".encode(), "root": "/x", "kind": "text", "status": "ok",
                             "indexed_at": now()}, vector)
        current.pop(old_id, None)  # a changed item is stored under a new id
        current[item_id] = vector

    for _ in range(n):
        put()
    store.commit()
    for item_id in rng.choice(np.array(sorted(current)), n // 10, replace=False).tolist():
        put(item_id)
    store.commit()
    return current


def test_binary_search_rescores_hamming_candidates_with_the_stored_vectors(tmp_path):
    rng = np.random.default_rng(0)
    current = synthetic_binary_index(tmp_path / "i", rng, n=5000, full_dim=256, dim=128)
    search = open_index(tmp_path / "i")
    ids = np.array(sorted(current))
    matrix = np.stack([current[i] for i in ids]).astype(np.float32)[:, :128]
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    found = 0
    for _ in range(20):
        query = matrix[rng.integers(len(ids))] + 0.3 * rng.normal(size=128).astype(np.float32)
        query = (query / np.linalg.norm(query))[None, :]
        exact = matrix @ query[0]
        truth = ids[np.argsort(-exact)[:10]].tolist()
        hits = search.nearest(query, 10, keep=lambda item_id: True, min_score=None)
        for item_id, score in hits:  # cosine with the current vector, not a Hamming estimate
            assert score == pytest.approx(exact[np.searchsorted(ids, item_id)], abs=1e-5)
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
        found += len({i for i, _ in hits} & set(truth))
    assert found / 200 >= 0.95


@pytest.mark.parametrize("index_type, quantize", [("hnsw", "none"), ("ivf", "none"), ("flat", "binary")])
def test_every_index_type_finds_what_exact_search_finds(index_dir, embedder, tmp_path, index_type, quantize):
    """On a small index the approximate searches are exhaustive, so they must agree with flat exactly."""
    other = tmp_path / "other"
    shutil.copytree(index_dir, other)
    changed = cli("reindex", "--index", str(other), "--index-type", index_type, "--quantize", quantize)
    assert changed.returncode == 0, changed.stderr
    exact, approximate = SearchIndex(index_dir, embedder=embedder), SearchIndex(other, embedder=embedder)
    for query in ("a cat", "boats on a lake", "a red ball"):
        want, got = exact.search(query, k=5), approximate.search(query, k=5)
        assert [r.id for r in got] == [r.id for r in want]
        assert [r.score for r in got] == pytest.approx([r.score for r in want], abs=1e-4)


def test_a_missing_vector_segment_is_a_clear_error(tmp_path):
    synthetic_binary_index(tmp_path / "i", np.random.default_rng(1), n=300, full_dim=64, dim=64)
    segment = sorted((tmp_path / "i" / "segments").glob("seg-*.npy"))[-1]
    segment.unlink()
    with pytest.raises(StoreError, match=f"{segment.name} is missing .*qvlsearch optimize"):
        open_index(tmp_path / "i").nearest(np.ones((1, 64), dtype=np.float32) / 8, 5, lambda i: True, None)


def synthetic_index(path: Path, rows: list[tuple[str, bytes, np.ndarray]], index_type: str = "flat",
                    quantize: str = "none", commit_every: int | None = None) -> None:
    """An index of given (kind, path bytes, vector) rows, without a model (a segment every `commit_every` rows)."""
    full_dim = len(rows[0][2])
    settings = {"model": "synthetic", "model_revision": None, "dim": full_dim, "quantize": quantize,
                "index_type": index_type, "instruction": "", "min_pixels": 0, "max_pixels": 0, "total_pixels": 0,
                "fps": 1.0, "max_frames": 1}
    store = Store.create(path, settings, full_dim)
    for item_id, (kind, path_bytes, vector) in enumerate(rows, 1):
        store.put({"id": item_id, "path": display_path(os.fsdecode(path_bytes)), "path_bytes": path_bytes, "root": "/",
                   "kind": kind, "status": "ok", "indexed_at": now()}, vector / np.linalg.norm(vector))
        if commit_every and item_id % commit_every == 0:
            store.commit()
    store.commit()


def test_int8_scores_are_the_cosine_in_segments_of_any_size(tmp_path):
    """Segments of 100 and 23 rows: every hit's score is its cosine with the stored float16 vector."""
    rng = np.random.default_rng(4)
    vectors = rng.normal(size=(123, 48)).astype(np.float32)
    synthetic_index(tmp_path / "i", [("text", b"/t/%d.txt" % i, v) for i, v in enumerate(vectors)], quantize="int8",
                    commit_every=100)
    index = open_index(tmp_path / "i")
    assert [s["rows"] for s in index.manifest["segments"]] == [100, 23]
    stored = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    for _ in range(5):
        query = rng.normal(size=48).astype(np.float32)
        query /= np.linalg.norm(query)
        for k in (1, 10, 123):
            hits = index.nearest(query[None, :], k, keep=lambda item_id: True, min_score=None)
            assert len(hits) == k
            for item_id, score in hits:
                assert score == pytest.approx(float(stored[item_id - 1] @ query), abs=1e-6)
            assert [i for i, _ in hits] == (np.argsort(-(stored @ query), kind="stable")[:k] + 1).tolist()


def test_ivf_filtered_search_finds_every_match_when_widened_to_everything(tmp_path, monkeypatch):
    """`-k 10 --kind video` returns 10 videos when the index has 10, also where IVF would not probe their lists."""
    from qvlsearch.store import segments

    monkeypatch.setattr(segments, "SEAL_ROWS", 1000)  # so that 2,010 rows make one segment with IVF lists
    rng = np.random.default_rng(2)
    query = rng.normal(size=64).astype(np.float32)
    query /= np.linalg.norm(query)
    images = [("image", b"/p/%d.jpg" % i, query + 0.8 * rng.normal(size=64)) for i in range(2000)]
    videos = [("video", b"/v/%d.mp4" % i, -query + 0.3 * rng.normal(size=64)) for i in range(10)]
    synthetic_index(tmp_path / "i", images + videos, index_type="ivf")
    index = open_index(tmp_path / "i")
    assert [s["index"] for s in index.manifest["segments"]] == ["IVF44,Flat"]
    hits = index.nearest(query[None, :], 10, index.filter("video", None), None)
    assert sorted(item_id for item_id, _ in hits) == list(range(2001, 2011))
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


def test_under_filters_in_arrow_without_making_python_paths(tmp_path):
    import tracemalloc

    rng = np.random.default_rng(3)
    n = 50_000
    rows = [("image", b"/photos/%d/%06d.jpg" % (i % 12, i), rng.normal(size=32)) for i in range(n)]
    rows.append(("text", b"/caf\xe9/menu.txt", rng.normal(size=32)))
    synthetic_index(tmp_path / "i", rows)
    index = open_index(tmp_path / "i")
    keep = index.filter(None, "/photos/1")  # "/photos/1/", not "/photos/10/"
    assert sum(keep(i) for i in range(1, n + 2)) == len(range(1, n, 12))
    assert [i for i in range(1, n + 2) if index.filter(None, os.fsdecode(b"/caf\xe9"))(i)] == [n + 1]
    tracemalloc.start()
    index.filter("image", "/photos/1")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * n, f"{peak / n:.0f} bytes of Python objects a row"  # a bytes object a path would be ~60


def test_paths_are_written_as_their_exact_bytes(tmp_path, checkpoints, embedder):
    from typer.testing import CliRunner

    from qvlsearch.cli import app

    root = tmp_path / "r"
    root.mkdir()
    latin1 = root / os.fsdecode(b"caf\xe9.png")
    shutil.copy(PHOTOS / "cat.jpg", root / "cat.jpg")
    shutil.copy(PHOTOS / "bee.jpg", latin1.with_suffix(".jpg"))
    Indexer(tmp_path / "i", IndexOptions(model=str(checkpoints["embedder"]), device="cpu"),
            embedder=embedder).run([root])
    base = ["search", "x", "--index", str(tmp_path / "i"), "--device", "cpu"]
    by_nul = CliRunner().invoke(app, [*base, "--paths", "-0"]).stdout_bytes
    names = by_nul.split(b"\0")
    assert names[-1] == b"" and sorted(names[:-1]) == sorted(os.fsencode(p) for p in root.iterdir())
    assert all(os.path.exists(name) for name in names[:-1])  # what `xargs -0` gets opens
    by_line = CliRunner().invoke(app, [*base, "--paths"]).stdout_bytes
    assert by_line.splitlines() == names[:-1]
    records = json.loads(CliRunner().invoke(app, [*base, "--json"]).stdout)
    assert sorted(r["path"] for r in records) == [str(root / "caf\\xe9.jpg"), str(root / "cat.jpg")]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("qvlsearch: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_bad_search_options_are_one_line_before_searching(index_dir, tmp_path):
    base = ["search", "a cat", "--index", str(index_dir)]
    missing = cli("search", "--queries", str(tmp_path / "missing.txt"), "--index", str(index_dir))
    assert "cannot read --queries file" in one_line_error(missing) and "No such file" in missing.stderr
    no_folder = cli(*base, "--contact-sheet", str(tmp_path / "nope" / "sheet.jpg"))
    assert "there is no folder" in one_line_error(no_folder) and no_folder.stdout == ""  # nothing searched
    no_suffix = cli(*base, "--contact-sheet", str(tmp_path / "sheet"))
    assert "image suffix" in one_line_error(no_suffix) and no_suffix.stdout == ""
    for device in ("gpu", "cuda:9"):
        assert "device" in one_line_error(cli(*base, "--device", device))
