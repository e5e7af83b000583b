"""`qvlsearch dupes` and `find_duplicates`: real copies of real files, indexed with the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import PHOTOS, SAMPLE_DATA
from make_media import make_pdf, set_creation_time
from PIL import Image
from terminal import check_paths, on_terminal

from qvlsearch.dupes import DEFAULT_THRESHOLD, MAX_TEXT_TOKENS, comparable, find_duplicates, near_pairs
from qvlsearch.indexer import Indexer, IndexOptions
from qvlsearch.search import SearchIndex

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
CAT_PAN = SAMPLE_DATA / "videos" / "cat pan.mp4"


def first_packets(source: Path, path: Path, count: int) -> Path:
    """A shorter clip: the first `count` packets of `source`, not re-encoded."""
    with av.open(str(source)) as src, av.open(str(path), "w") as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        packets = (p for p in src.demux(src.streams.video[0]) if p.dts is not None)
        for _, packet in zip(range(count), packets, strict=False):
            packet.stream = stream
            dst.mux(packet)
    return path


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """Photos, an exact copy, a re-encoded copy, a video, its remuxed copy and a shorter cut of it, a note."""
    root = tmp_path_factory.mktemp("library")
    for name in ("cat.jpg", "cake.jpg", "bee.jpg", "books.jpg", "tree.webp"):
        shutil.copy(PHOTOS / name, root / name)
    (root / "backup").mkdir()
    shutil.copy(PHOTOS / "cat.jpg", root / "backup" / "cat.jpg")
    os.utime(root / "cat.jpg", (1_500_000_000, 1_500_000_000))  # the older of the two exact copies
    Image.open(PHOTOS / "cake.jpg").save(root / "cake-reencoded.jpg", quality=95)
    shutil.copy(CAT_PAN, root / "cat pan.mp4")
    set_creation_time(CAT_PAN, root / "backup" / "cat pan.mp4", "2022-03-04T05:06:07.000000Z")
    first_packets(CAT_PAN, root / "cat pan short.mp4", 30)
    shutil.copy(SAMPLE_DATA / "videos" / "boats on a lake pan.mp4", root / "boats.mp4")
    (root / "note.txt").write_text("a note\n")
    return root


@pytest.fixture(scope="module")
def index(tmp_path_factory, library, checkpoints, embedder) -> SearchIndex:
    path = tmp_path_factory.mktemp("dupes") / "index"
    Indexer(path, IndexOptions(model=str(checkpoints["embedder"])), embedder=embedder).run([library])
    return SearchIndex(path)  # no model: dupes never needs one


def brute_force_pairs(index: SearchIndex, threshold: float) -> set[frozenset[str]]:
    """Every pair of comparable files at or above `threshold`, from all pairs in numpy."""
    table = index.item_columns(["id", "path", "kind", "duration_s"]).to_pylist()
    vectors = index.stored_vectors.get(index.ids)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = vectors @ vectors.T
    return {frozenset((a["path"], b["path"])) for i, a in enumerate(table) for j, b in enumerate(table)
            if i < j and similarity[i, j] >= threshold and comparable(a, b)}


def grouped_pairs(groups) -> set[frozenset[str]]:
    return {frozenset((a.path, b.path)) for g in groups for a in g.members for b in g.members if a.path < b.path}


def test_exact_and_near_groups_with_their_keepers(index, library):
    groups = find_duplicates(index)
    by_keeper = {Path(g.keeper.path).relative_to(library).as_posix(): g for g in groups}
    exact = by_keeper["cat.jpg"]  # same pixels and bytes: the older one is kept
    assert exact.type == "exact" and [m.path for m in exact.members] == [str(library / "cat.jpg"),
                                                                         str(library / "backup" / "cat.jpg")]
    assert [m.keep for m in exact.members] == [True, False] and exact.members[1].similarity == pytest.approx(1, 1e-3)
    near = next(g for g in groups if str(library / "cake.jpg") in {m.path for m in g.members})
    assert near.type == "near" and {Path(m.path).name for m in near.members} == {"cake.jpg", "cake-reencoded.jpg"}
    assert near.keeper.size == max(m.size for m in near.members)  # same pixels: the larger file is kept
    assert all(m.similarity >= DEFAULT_THRESHOLD for m in near.members)
    video = next(g for g in groups if g.kind == "video")
    assert {Path(m.path).relative_to(library).as_posix() for m in video.members} == {"cat pan.mp4",
                                                                                     "backup/cat pan.mp4"}
    assert video.type == "near"  # the remuxed copy has other bytes, the same frames


def test_groups_are_exactly_the_pairs_an_all_pairs_search_finds(index):
    for threshold in (0.9, DEFAULT_THRESHOLD, 0.99):
        assert grouped_pairs(find_duplicates(index, threshold)) == brute_force_pairs(index, threshold)


def test_videos_of_different_lengths_are_not_duplicates(index, library):
    groups = find_duplicates(index, 0.9, kind="video")
    short = str(library / "cat pan short.mp4")
    table = {r["path"]: r for r in index.item_columns(["path", "id", "duration_s"]).to_pylist()}
    vectors = index.stored_vectors.get(np.array([table[short]["id"], table[str(library / "cat pan.mp4")]["id"]]))
    assert vectors[0] @ vectors[1] / np.prod(np.linalg.norm(vectors, axis=1)) >= 0.9  # alike by vector...
    assert table[short]["duration_s"] < table[str(library / "cat pan.mp4")]["duration_s"] - 1  # ...not by length
    assert all(short not in {m.path for m in g.members} for g in groups)
    assert {g.kind for g in groups} == {"video"}


def test_kind_and_folder_filters(index, library):
    assert {g.kind for g in find_duplicates(index, kind="image")} == {"image"}
    assert find_duplicates(index, under=library / "backup") == []  # one side of each pair is outside
    assert find_duplicates(index, kind="text") == []


def test_pdfs_and_long_texts_are_compared_as_wholes(tmp_path, checkpoints, embedder):
    """PDFs that share a cover page, or texts that share their first MAX_TEXT_TOKENS tokens, are other files."""
    import random

    root = tmp_path / "files"
    cover = Image.new("RGB", (300, 400), (250, 250, 250))
    cover.paste((20, 20, 120), (0, 0, 300, 80))
    pages = {name: Image.open(PHOTOS / name).convert("RGB").resize((300, 400)) for name in
             ("cat.jpg", "cake.jpg", "bee.jpg", "books.jpg")}
    report = make_pdf(root / "report.pdf", [cover, pages["cat.jpg"], pages["cake.jpg"]])
    make_pdf(root / "invoice.pdf", [cover, pages["bee.jpg"], pages["books.jpg"]])  # the same cover only
    make_pdf(root / "report draft.pdf", [cover, pages["cat.jpg"]])  # one page fewer
    shutil.copy(report, root / "report copy.pdf")
    (root / "report signed.pdf").write_bytes(report.read_bytes() + b"%signed\n")  # other bytes, the same pages
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(5)) for _ in range(200)]
    start = " ".join(rng.choice(words) for _ in range(12_000))  # over MAX_TEXT_TOKENS tokens
    (root / "log.txt").write_text(start + " the end\n")
    (root / "log 2.txt").write_text(start + " and then something else altogether\n")
    shutil.copy(root / "log.txt", root / "log copy.txt")
    Indexer(tmp_path / "i", IndexOptions(model=str(checkpoints["embedder"])), embedder=embedder).run([root])
    index = SearchIndex(tmp_path / "i")
    tokens = {Path(r["path"]).name: r["tokens"] for r in index.item_columns(["path", "tokens"]).to_pylist()}
    assert tokens["log.txt"] == tokens["log 2.txt"] == MAX_TEXT_TOKENS  # both cut: their vectors are the same
    groups = {frozenset(Path(m.path).name for m in g.members): g for g in find_duplicates(index)}
    assert set(groups) == {frozenset({"report.pdf", "report copy.pdf", "report signed.pdf"}),
                           frozenset({"log.txt", "log copy.txt"})}
    assert groups[frozenset({"log.txt", "log copy.txt"})].type == "exact"
    assert all(m.similarity >= 0.999 for g in groups.values() for m in g.members)
    alike = find_duplicates(index, 0.0, kind="pdf")  # every page alike: still the page counts must agree
    assert all("report draft.pdf" not in {Path(m.path).name for m in g.members} for g in alike)


def test_ivf_candidate_search_finds_what_exact_search_finds():
    """Above FLAT_BELOW vectors the candidates come from an IVF index over a prefix: planted copies are all found."""
    rng = np.random.default_rng(0)
    n, dim = 24_000, 64
    centers = rng.standard_normal((300, dim))
    x = centers[rng.integers(0, 300, n)] + 0.8 * rng.standard_normal((n, dim))
    x[n // 2:n // 2 + 300] = x[:300] + 0.1 * rng.standard_normal((300, dim))  # near copies, cosine about 0.99
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    first, second, similarity = near_pairs(x, 0.97, prefix_dim=32)
    found = set(zip(first.tolist(), second.tolist(), strict=True))
    sims = x[: n // 2] @ x[n // 2:].T  # every pair across the halves, where all the planted pairs are
    truth = {(int(i), int(j) + n // 2) for i, j in zip(*np.nonzero(sims >= 0.97), strict=True)}
    assert len(truth) >= 300 and truth <= found
    assert np.all(similarity >= 0.97) and np.allclose(similarity, np.einsum("ij,ij->i", x[first], x[second]))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qvlsearch", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def test_cli_formats_paths_for_xargs_and_exit_codes(index, library):
    base = ["dupes", "--index", str(index.path)]
    records = json.loads(cli(*base, "--json").stdout)
    assert [r["group"] for r in records] == list(range(1, len(records) + 1)) and records[0]["type"] == "exact"
    assert list(records[0]) == ["group", "type", "kind", "keep", "members"]
    assert list(records[0]["members"][0]) == ["path", "id", "keep", "similarity", "size", "width", "height",
                                              "duration_s", "taken_at", "modified_at"]
    assert [json.loads(line) for line in cli(*base, "--jsonl").stdout.splitlines()] == records
    others = cli(*base, "--paths", "-0").stdout.split("\0")[:-1]
    assert others == [m["path"] for r in records for m in r["members"] if not m["keep"]]
    assert str(library / "backup" / "cat.jpg") in others and str(library / "cat.jpg") not in others
    assert all(Path(p).exists() for r in records for m in r["members"] for p in [m["path"]])  # nothing deleted
    tsv = cli(*base).stdout.splitlines()
    assert len(tsv) == sum(len(r["members"]) for r in records) and tsv[0].split("\t")[:3] == ["1", "exact", "keep"]
    assert cli(*base, "--kind", "text").returncode == 1
    for bad in (["--threshold", "2"], ["--kind", "audio"], ["--index", str(library / "nothing")]):
        result = cli(*base[:1], *bad) if bad[0] == "--index" else cli(*base, *bad)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


def test_the_table_fits_the_terminal(index):
    """At 80 and 60 columns each member's path is whole or shortened from the left (not all cut to one prefix);
    columns that do not fit beside it continue in a block below, with the group and path repeated."""
    base = ["dupes", "--index", str(index.path)]
    records = json.loads(cli(*base, "--json").stdout)
    paths = [m["path"] for r in records for m in r["members"]]
    for columns in (80, 60):
        code, out = on_terminal(*base, columns=columns, env=ENV)
        assert code == 0
        headers = []
        for block in out.rstrip("\n").split("\n\n"):
            lines = block.splitlines()
            headers += [h for h in lines[0].split() if h not in headers]
            assert lines[0].split()[0] == "group" and lines[0].split()[-1] == "path", out
            check_paths(lines[1:], paths, columns)
        assert sorted(headers) == sorted(["group", "type", "similarity", "bytes", "size", "date", "path"]), out
