"""Moments of videos and pages of PDFs: search returns the place, not just the file. Real videos and PDFs
made here, the tiny model, real FAISS and Parquet."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from make_media import make_color_video, make_encrypted_pdf, make_image, make_pdf, make_three_part_video, make_video
from PIL import Image
from test_index import ENV, assert_consistent

from qvlsearch.contact_sheet import thumbnail
from qvlsearch.indexer import Indexer, IndexOptions
from qvlsearch.moments import place, windows
from qvlsearch.pages import PdfPage
from qvlsearch.search import SearchIndex, SearchResult, document_item, merge_moments

RED, GREEN, BLUE = (220, 0, 0), (0, 200, 0), (0, 0, 220)


def pdf_pages() -> list[Image.Image]:
    """Three pages that differ: a red page, a green page with a white square, a blue striped page."""
    red = Image.new("RGB", (300, 400), RED)
    green = Image.new("RGB", (300, 400), GREEN)
    green.paste((255, 255, 255), (100, 150, 200, 250))
    blue = Image.new("RGB", (300, 400), BLUE)
    for x in range(0, 300, 40):
        blue.paste((255, 255, 255), (x, 0, x + 10, 400))
    return [red, green, blue]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("places") / "library"
    make_three_part_video(root / "parts.mp4")
    make_video(root / "other.mp4")
    make_pdf(root / "doc.pdf", pdf_pages())
    make_image(root / "photo.png", color=(120, 120, 120))
    (root / "note.txt").write_text("a note")
    return root


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, library, checkpoints, embedder):
    path = tmp_path_factory.mktemp("places-index") / "index"
    Indexer(path, IndexOptions(model=str(checkpoints["embedder"])), embedder=embedder).run([library])
    return path


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qvlsearch", *args], input=stdin, capture_output=True, text=True,
                          env=ENV, timeout=300)


def test_windows_cover_the_video_and_stay_bounded():
    assert windows(30.0) == [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0)]
    assert windows(9.0) == []  # one window's worth: the whole-file vector is the moment
    assert windows(31.0) == [(0.0, 10.0), (10.0, 20.0), (20.0, 31.0)]  # a short tail joins the last window
    long = windows(36000.0)  # ten hours
    assert len(long) == 300 and long[-1][1] == 36000.0 and long[0] == (0.0, 120.0)
    assert windows(30.0, 0) == []


def test_a_video_one_window_covers_gets_no_moment_equal_to_itself(tmp_path, checkpoints, embedder):
    """10–15 s: the tail would join the one window, which would be the whole video (a duplicate hit)."""
    assert windows(12.0) == [] and windows(14.9) == [] and windows(10.0) == []
    assert windows(15.0) == [(0.0, 10.0), (10.0, 15.0)]
    for seconds in (12, 16):
        make_video(tmp_path / "videos" / f"{seconds}s.mp4", frames=2 * seconds, fps=2)
    Indexer(tmp_path / "i", IndexOptions(model=str(checkpoints["embedder"])), embedder=embedder).run(
        [tmp_path / "videos"])
    rows = list(assert_consistent(tmp_path / "i").rows.values())
    assert [(r["start_s"], r["end_s"]) for r in rows if r["path"].endswith("12s.mp4")] == [(None, None)]
    assert sorted(((r["start_s"], r["end_s"]) for r in rows if r["path"].endswith("16s.mp4")),
                  key=lambda window: (window[0] is not None, window[0] or 0.0)) == [(None, None), (0.0, 10.0),
                                                                                    (10.0, 16.0)]
    hits = SearchIndex(tmp_path / "i", embedder=embedder).search("a white square", k=10)
    assert sum(h.path.endswith("12s.mp4") for h in hits) == 1


def test_rows_per_page_and_moment_and_info_counts_files(index_dir):
    store = assert_consistent(index_dir)
    rows = list(store.rows.values())
    parts = sorted(((r["start_s"], r["end_s"]) for r in rows if r["path"].endswith("parts.mp4")),
                   key=lambda window: (window[0] is not None, window[0] or 0.0))
    assert parts == [(None, None), (0.0, 10.0), (10.0, 20.0), (20.0, 30.0)]
    assert sorted(r["page"] for r in rows if r["kind"] == "pdf") == [1, 2, 3]
    assert len({r["path"] for r in rows if r["kind"] == "pdf"}) == 1
    counts = store.manifest["counts"]
    assert counts["files"] == 5 and counts["items"] == 5 + 3 + 2  # 3 moments, 2 more pages
    info = cli("info", "--index", str(index_dir))
    assert "files:     5" in info.stdout and "items:     10" in info.stdout


def test_a_clip_of_one_part_finds_that_moment(index_dir, library, embedder, tmp_path):
    index = SearchIndex(index_dir, embedder=embedder)
    for color, part in ((BLUE, (10.0, 20.0)), (RED, (0.0, 10.0))):
        clip = make_color_video(tmp_path / f"{color}.mp4", color)
        best = index.search({"video": str(clip)}, k=3, kind="video")[0]
        assert best.path.endswith("parts.mp4") and best.start_s is not None
        assert best.start_s < part[1] and part[0] < best.end_s  # overlaps that part
        assert best.to_json()["start_s"] == best.start_s and "page" not in best.to_json()


def test_a_picture_of_one_page_finds_that_page(index_dir, embedder, tmp_path):
    index = SearchIndex(index_dir, embedder=embedder)
    for number, page in enumerate(pdf_pages(), 1):
        page.save(tmp_path / f"page{number}.png")
        best = index.search({"image": str(tmp_path / f"page{number}.png")}, k=3, kind="pdf")[0]
        assert (best.kind, best.page) == ("pdf", number)
        record = best.to_json()
        assert record["page"] == number and "start_s" not in record
    assert {r.kind for r in index.search("anything", k=10, kind="pdf")} == {"pdf"}


def test_cli_json_table_and_paths(index_dir, tmp_path):
    clip = make_color_video(tmp_path / "blue.mp4", BLUE)
    hits = [json.loads(line) for line in cli("search", "--video", str(clip), "--index", str(index_dir), "-k", "3",
                                             "--kind", "video", "--jsonl").stdout.splitlines()]
    assert isinstance(hits[0]["start_s"], float) and isinstance(hits[0]["end_s"], float)
    assert all(("start_s" in h) == ("end_s" in h) for h in hits)
    tsv = cli("search", "--video", str(clip), "--index", str(index_dir), "-k", "3", "--kind", "video").stdout
    assert tsv.splitlines()[0].endswith(place(hits[0])) and "–" in place(hits[0])
    paths = cli("search", "--video", str(clip), "--index", str(index_dir), "-k", "5", "--paths").stdout.splitlines()
    assert len(paths) == len(set(paths))  # each file once, though it has many hits
    pages = cli("search", "--image", str(tmp_path / "blue.mp4"), "--index", str(index_dir), "--kind", "pdf", "-k",
                "1")
    assert pages.returncode == 2  # a video given as --image: one line, not a traceback
    assert place({"page": 3}) == "p. 3" and place({"start_s": 62.0, "end_s": 72.5}) == "1:02–1:12"


def test_adjacent_matching_moments_merge_into_one_hit():
    def hit(start, score, path="v.mp4"):
        return SearchResult(rank=0, id=int(start), path=path, kind="video", score=score, start_s=start,
                            end_s=start + 10)

    merged = merge_moments([hit(10, 0.90), hit(20, 0.89), hit(0, 0.50), SearchResult(0, 99, "a.png", "image", 0.4),
                            hit(40, 0.88), hit(30, 0.87, "w.mp4")])
    assert [(r.path, r.start_s, r.end_s, r.score, r.rank) for r in merged] == [
        ("v.mp4", 10, 30, 0.90, 1), ("v.mp4", 0, 10, 0.50, 2), ("a.png", None, None, 0.4, 3),
        ("v.mp4", 40, 50, 0.88, 4), ("w.mp4", 30, 40, 0.87, 5)]


def test_rerank_scores_the_window_or_the_page(index_dir, reranker, embedder, library, checkpoints):
    index = SearchIndex(index_dir, embedder=embedder, reranker=reranker)
    moment = next(r for r in index.search("red", k=20, kind="video") if r.start_s is not None)
    item = document_item(moment)
    assert item["video_start"] == moment.start_s and item["video_end"] == moment.end_s
    window_score = reranker.rerank("red", [item])[0]
    whole_score = reranker.rerank("red", [{"video": str(library / "parts.mp4")}])[0]
    assert window_score != pytest.approx(whole_score, abs=1e-6)
    page = next(r for r in index.search("red", k=5, kind="pdf"))
    assert document_item(page) == {"image": PdfPage(page.fs_path, page.page)}
    rows = "\n".join(json.dumps(r.to_json() | {"path": r.fs_path}) for r in (moment, page))
    ranked = [json.loads(line) for line in cli("rerank", "red", "--reranker", str(checkpoints["reranker"]), "--jsonl",
                                               stdin=rows).stdout.splitlines()]
    by_place = {place(r): r["rerank_score"] for r in ranked}
    assert by_place[place(moment.to_json())] == pytest.approx(window_score, abs=1e-5)
    assert by_place[f"p. {page.page}"] == pytest.approx(reranker.rerank("red", [document_item(page)])[0], abs=1e-5)


def test_contact_sheet_tiles_show_the_moment_and_the_page(index_dir, library):
    red_part = SearchResult(1, 1, str(library / "parts.mp4"), "video", 0.5, start_s=0.0, end_s=10.0)
    blue_part = SearchResult(2, 2, str(library / "parts.mp4"), "video", 0.5, start_s=10.0, end_s=20.0)
    page = SearchResult(3, 3, str(library / "doc.pdf"), "pdf", 0.5, page=2)
    centre = [np.asarray(thumbnail(r).convert("RGB"))[10, 10].astype(int) for r in (red_part, blue_part, page)]
    assert centre[0][0] > 150 > centre[0][2] and centre[1][2] > 150 > centre[1][0] and centre[2][1] > 150 > centre[2][0]


def test_files_change_as_wholes(tmp_path, library, checkpoints, embedder):
    root = tmp_path / "lib"
    shutil.copytree(library, root)
    options = IndexOptions(model=str(checkpoints["embedder"]), max_pages=2)
    first = Indexer(tmp_path / "i", options, embedder=embedder)
    first.run([root])
    assert first.summary.warnings == [(str(root / "doc.pdf"), "1 of 3 pages skipped (past --max-pages 2)")]
    make_pdf(root / "doc.pdf", pdf_pages()[:1])  # now one page: its two page rows are replaced by one
    (root / "parts.mp4").rename(root / "moved.mp4")  # a move: all four vectors go along, no model
    (root / "note.txt").unlink()
    again = Indexer(tmp_path / "i", options, embedder=embedder)
    again.run([root])
    s = again.summary
    assert (s.updated, s.moved, s.removed, s.added) == (1, 1, 1, 0) and again.model_runs == 1
    rows = list(assert_consistent(tmp_path / "i").rows.values())
    assert [r["page"] for r in rows if r["kind"] == "pdf"] == [1]
    assert len([r for r in rows if r["path"].endswith("moved.mp4")]) == 4
    assert not [r for r in rows if r["path"].endswith(("parts.mp4", "note.txt"))]


def test_bad_pdfs_and_videos_become_error_rows(tmp_path, checkpoints, embedder):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "damaged.pdf").write_bytes(b"%PDF-1.4\n" + b"\x00garbage" * 100)
    make_encrypted_pdf(root / "locked.pdf")
    make_pdf(root / "good.pdf", pdf_pages()[:2])
    data = make_three_part_video(root / "full.mp4").read_bytes()
    (root / "cut.mp4").write_bytes(data[: len(data) * 2 // 3])  # the later part is gone
    summary = Indexer(tmp_path / "i", IndexOptions(model=str(checkpoints["embedder"])), embedder=embedder).run([root])
    rows = list(assert_consistent(tmp_path / "i").rows.values())
    damaged = [r for r in rows if r["path"].endswith("damaged.pdf")]
    assert len(damaged) == 1 and damaged[0]["status"] == "error" and "PDF" in damaged[0]["error"]
    locked = [r for r in rows if r["path"].endswith("locked.pdf")]
    assert len(locked) == 1 and locked[0]["status"] == "error" and "encrypted" in locked[0]["error"]
    assert sorted(r["page"] for r in rows if r["path"].endswith("good.pdf") and r["status"] == "ok") == [1, 2]
    assert len([r for r in rows if r["path"].endswith("full.mp4") and r["status"] == "ok"]) == 4
    assert [r for r in rows if r["path"].endswith("cut.mp4")]  # its rows are there: ok, or errors with a reason
    assert all(r["error"] for r in rows if r["status"] == "error")
    assert summary.total == 5 and dict(summary.failures).get(str(root / "damaged.pdf"))


def test_dupes_see_files_not_their_pages_and_moments(index_dir, library, tmp_path, checkpoints, embedder):
    from qvlsearch.dupes import find_duplicates

    assert find_duplicates(SearchIndex(index_dir)) == []  # a PDF's pages share its hash, but are one file
    root = tmp_path / "lib"
    shutil.copytree(library, root)
    shutil.copy(root / "doc.pdf", root / "doc copy.pdf")
    Indexer(tmp_path / "i", IndexOptions(model=str(checkpoints["embedder"])), embedder=embedder).run([root])
    (group,) = find_duplicates(SearchIndex(tmp_path / "i"))
    assert group.type == "exact" and sorted(m.path for m in group.members) == [str(root / "doc copy.pdf"),
                                                                              str(root / "doc.pdf")]
