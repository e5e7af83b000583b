"""Words as well as meaning: PDFs with real text layers, notes in several languages, camera-style names and EXIF
descriptions in a real SQLite FTS5 index per segment, fused with the vectors; kept in step across commits,
merges, deletes and a SIGKILL; added to an index made before words without embedding again."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from make_media import make_photo, make_text_pdf
from test_index import ENV, assert_consistent, cli

from qvlsearch.errors import InputError
from qvlsearch.indexer import Indexer, IndexOptions
from qvlsearch.search import SearchIndex
from qvlsearch.store import Snapshot, Store, now, read_manifest
from qvlsearch.words import SegmentWords, name_words, query_expression, reciprocal_rank_fusion, write_words

SETTINGS = {"model": "synthetic", "model_revision": None, "dim": 8, "quantize": "none", "index_type": "flat",
            "instruction": "", "min_pixels": 0, "max_pixels": 0, "total_pixels": 0, "fps": 1.0, "max_frames": 1}


def write_library(root: Path) -> Path:
    make_text_pdf(root / "docs" / "invoices.pdf", [["Invoice 4712", "Total 12 EUR"], ["Invoice 4711", "Total 99 EUR"],
                                                   ["Invoice 4710", "Total 7 EUR"]])
    notes = root / "notes"
    notes.mkdir(parents=True)
    (notes / "einkauf.txt").write_text("Einkaufsliste: Äpfel, Brötchen, Käse vom Müller\n")
    (notes / "voyage.txt").write_text("Le café était très bon à Besançon\n")
    (notes / "zhang.txt").write_text("这是我的发票，请查收。\n")
    (notes / "tokyo.txt").write_text("東京で買った本の領収書\n")
    make_photo(root / "photos" / "IMG_2043.JPG", camera=("Google", "Pixel 7"), description="Birthday cake")
    make_photo(root / "photos" / "IMG_2044.JPG", camera=("Canon", "Canon EOS R5"))
    make_photo(root / "photos" / "DSC-0042.jpg")
    return root


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    return write_library(tmp_path_factory.mktemp("words"))


@pytest.fixture(scope="module")
def index_dir(library, tmp_path_factory, checkpoints, embedder) -> Path:
    path = tmp_path_factory.mktemp("words-index") / "i"
    Indexer(path, IndexOptions(model=str(checkpoints["embedder"])), embedder=embedder).run([library])
    return path


@pytest.fixture(scope="module")
def index(index_dir, embedder) -> SearchIndex:
    return SearchIndex(index_dir, embedder=embedder)


def top(index: SearchIndex, query: str, mode: str = "words", **options) -> list[tuple[str, int | None]]:
    return [(Path(r.path).name, r.page) for r in index.search(query, mode=mode, **options)]


def test_an_exact_number_finds_its_page_and_not_the_neighbours(index):
    assert top(index, "4711") == [("invoices.pdf", 2)]
    assert top(index, "invoice 4711") == [("invoices.pdf", 2)]  # every word must match
    assert top(index, "4711", mode="hybrid")[0] == ("invoices.pdf", 2)  # fused: words lift it to the top
    hit = index.search("4711", mode="words")[0]
    assert hit.matched == ["4711"] and hit.to_json()["matched"] == ["4711"] and hit.score is None


def test_quoted_phrases_match_as_phrases(index):
    assert top(index, '"total 99"') == [("invoices.pdf", 2)]
    assert top(index, '"99 total"') == []
    assert top(index, '"total 99') == [("invoices.pdf", 2)]  # an unclosed quote runs to the end


def test_a_file_name_fragment_finds_its_file(index):
    assert top(index, "IMG_2043") == [("IMG_2043.JPG", None)]
    assert top(index, "img2043") == [("IMG_2043.JPG", None)]
    assert top(index, "2043") == [("IMG_2043.JPG", None)]
    assert top(index, "dsc") == [("DSC-0042.jpg", None)]
    assert {name for name, _ in top(index, "img")} == {"IMG_2043.JPG", "IMG_2044.JPG"}
    assert {name for name, _ in top(index, "notes")} == {"einkauf.txt", "voyage.txt", "zhang.txt", "tokyo.txt"}


def test_descriptions_and_camera_names_are_words(index):
    assert top(index, "birthday") == [("IMG_2043.JPG", None)]
    assert top(index, "pixel") == [("IMG_2043.JPG", None)]
    assert top(index, "EOS") == [("IMG_2044.JPG", None)]


def test_cjk_two_character_words_and_folded_latin(index):
    assert top(index, "发票") == [("zhang.txt", None)]
    assert top(index, "我的发票") == [("zhang.txt", None)]  # a longer run: the phrase of its bigrams
    assert top(index, "查收") == [("zhang.txt", None)] and top(index, "票请") == []  # punctuation ends a run
    assert top(index, "東京") == [("tokyo.txt", None)]
    assert top(index, "cafe besancon") == [("voyage.txt", None)]  # accents folded
    assert top(index, "MULLER kase") == [("einkauf.txt", None)]  # case folded
    assert top(index, "发") == []  # one character of a run is no word of it


def test_filters_apply_to_word_hits(index, library):
    assert top(index, "4711", kind="image") == []
    assert top(index, "img", under=library / "photos") != []
    assert top(index, "4711", under=library / "notes") == []
    assert top(index, "img", camera="pixel") == [("IMG_2043.JPG", None)]
    assert top(index, "img", before="1900-01-01") == []


def test_hybrid_fuses_both_and_words_mode_needs_no_model(index_dir, index):
    hybrid = index.search("4711", k=20, mode="hybrid")
    semantic = index.search("4711", k=20, mode="semantic")
    assert {r.id for r in semantic} <= {r.id for r in hybrid}
    assert all(r.score is not None for r in hybrid)  # a word hit gets its embedding score too
    assert hybrid[0].matched == ["4711"] and all(r.matched is None for r in hybrid[1:])
    plain = SearchIndex(index_dir)  # no embedder given: loading one would fail (no model id on the hub)
    assert [r.page for r in plain.search("4711", mode="words")] == [2] and plain._embedder is None


def test_rrf_sums_reciprocal_ranks():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "d"]])
    assert [key for key, _ in fused] == ["c", "a", "b", "d"]
    assert fused[0][1] == pytest.approx(1 / 63 + 1 / 61)


def test_a_segment_ranks_by_the_weighted_score_it_reports(tmp_path):
    """The name counts double: the best by that weighted score comes first, not the best by FTS5's equal weights."""
    path = tmp_path / "seg.words"
    write_words(path, [(1, "cake party", "photos of the day"), (2, "holiday", "cake and more cake on the table"),
                       *((i, f"other {i}", "nothing to see here") for i in range(3, 40))])
    words = SegmentWords(path)
    ranked = words.search('"cake"', limit=10)
    assert [i for i, _ in ranked] == [1, 2] and ranked[0][1] > ranked[1][1]
    assert words.search('"cake"', limit=1) == ranked[:1]
    words.close()


def test_queries_are_never_fts5_syntax():
    assert query_expression('NEAR(a b) OR "x" AND -') == '"NEAR(a" AND "b)" AND "OR" AND "x" AND "AND"'
    assert query_expression("!!! ...") is None
    assert "IMG 2043" in name_words("/p/IMG_2043.JPG", "/p/IMG_2043.JPG")


def test_cli_json_and_tsv_say_what_matched(index_dir):
    found = cli("search", "4711", "--index", str(index_dir), "--mode", "words", "--json", "--no-server")
    assert found.returncode == 0, found.stderr
    (record,) = json.loads(found.stdout)
    assert record["page"] == 2 and record["matched"] == ["4711"] and record["score"] is None
    table = cli("search", "4711", "--index", str(index_dir), "--mode", "words", "--no-server")
    assert table.stdout.rstrip("\n").endswith("invoices.pdf\tmatched: 4711, p. 2"), table.stdout


def test_a_words_search_imports_no_torch(index_dir):
    """Words need no model: a `--mode words` search stays a one-second command, without torch's import."""
    run = ("import sys\nfrom qvlsearch.cli import main\n"
           "sys.argv = ['qvlsearch', 'search', '4711', '--index', sys.argv[1], '--mode', 'words', '--no-server']\n"
           "try:\n    main()\nexcept SystemExit as end:\n"
           "    print(end.code, 'torch' in sys.modules, file=sys.stderr)\n")
    found = subprocess.run([sys.executable, "-c", run, str(index_dir)], capture_output=True, text=True, env=ENV,
                           timeout=120)
    assert "invoices.pdf" in found.stdout and found.stderr.split()[-2:] == ["0", "False"], found.stderr


def test_bad_modes_and_words_queries_are_one_line_errors(index, library):
    with pytest.raises(InputError, match="mode must be one of hybrid, semantic, words, got 'fuzzy'"):
        index.search("x", mode="fuzzy")
    with pytest.raises(InputError, match="--mode words needs query text"):
        index.search({"image": str(library / "photos" / "DSC-0042.jpg")}, mode="words")
    with pytest.raises(InputError, match="--min-score is an embedding score"):
        index.search("x", mode="words", min_score=0.5)


def test_edits_and_deletes_reach_the_words_across_commits_and_merges(tmp_path, checkpoints, embedder):
    root = tmp_path / "notes"
    root.mkdir()
    for i in range(12):
        (root / f"note{i:02d}.txt").write_text(f"plain note number {i}\n")
    (root / "edit.txt").write_text("the old marmalade recipe\n")
    (root / "gone.txt").write_text("a quince tart\n")
    options = IndexOptions(model=str(checkpoints["embedder"]), commit_every=1)  # a commit per file: merges happen
    Indexer(tmp_path / "i", options, embedder=embedder).run([root])
    assert top(SearchIndex(tmp_path / "i"), "marmalade") == [("edit.txt", None)]
    (root / "edit.txt").write_text("the new gooseberry recipe, longer\n")
    (root / "gone.txt").unlink()
    Indexer(tmp_path / "i", options, embedder=embedder).run([root])
    index = SearchIndex(tmp_path / "i")
    assert top(index, "marmalade") == [] and top(index, "quince") == [] and top(index, "gone") == []
    assert top(index, "gooseberry") == [("edit.txt", None)]
    assert len(top(index, "plain note", k=50)) == 12
    store = assert_consistent(tmp_path / "i")
    store.optimize()
    index = SearchIndex(tmp_path / "i")
    assert len(index.snapshot.segments) == 1 and index.snapshot.segments[0].words is not None
    assert top(index, "marmalade") == [] and top(index, "quince") == []
    assert top(index, "gooseberry") == [("edit.txt", None)] and len(top(index, "plain note", k=50)) == 12
    assert_consistent(tmp_path / "i")


def test_an_index_made_before_words_gains_them_without_embedding(tmp_path, index_dir, library, checkpoints,
                                                                  embedder):
    path = tmp_path / "i"
    shutil.copytree(index_dir, path)
    options = IndexOptions(model=str(checkpoints["embedder"]))
    manifest = read_manifest(path)  # as a qvlsearch before words wrote it: no words files, no words in the manifest
    for segment in manifest["segments"]:
        (path / "segments" / f"{segment['name']}.words").unlink()
        del segment["words"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="has no words yet"):
        SearchIndex(path).search("4711", mode="words")
    vectors_before = {s["name"] for s in manifest["segments"]}
    again = Indexer(path, options, embedder=embedder)
    summary = again.run([library])
    assert again.model_runs == 0 and summary.unchanged == summary.total  # nothing embedded again
    assert {s["name"] for s in read_manifest(path)["segments"]} == vectors_before  # the segments stay, words beside
    index = SearchIndex(path)
    assert top(index, "4711") == [("invoices.pdf", 2)] and top(index, "发票") == [("zhang.txt", None)]
    assert top(index, "IMG_2043") == [("IMG_2043.JPG", None)]
    assert_consistent(path)


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from qvlsearch.store import Store, now
    path, settings = sys.argv[1], {"model": "synthetic", "model_revision": None, "dim": 8, "quantize": "none",
                                   "index_type": "flat", "instruction": "", "min_pixels": 0, "max_pixels": 0,
                                   "total_pixels": 0, "fps": 1.0, "max_frames": 1}
    rng = np.random.default_rng(int(sys.argv[2]))
    try:
        store = Store.open(path)
    except Exception:
        store = Store.create(path, settings, 8)
    for step in range(400):
        for _ in range(20):
            item_id = store.new_id()
            store.put({"id": item_id, "path": f"/x/{item_id}", "path_bytes": b"/x/%d" % item_id, "root": "/x",
                       "kind": "text", "status": "ok", "indexed_at": now(), "words": f"note{item_id} shared"},
                      rng.normal(size=8))
        live = sorted(store.rows)
        store.remove(rng.choice(live, len(live) // 8, replace=False).tolist())
        store.commit()
        print("commit", flush=True)
""")


def test_sigkill_during_commits_leaves_words_and_vectors_of_one_generation(tmp_path):
    path = tmp_path / "i"
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(attempt)], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for _ in range(3 + 4 * attempt):  # some commits (and merges) happened: the kill lands within the work
            proc.stdout.readline()
        time.sleep(0.05 * attempt)
        proc.kill()
        proc.wait()
        snapshot = Snapshot(path)
        live = set(snapshot.items["id"].to_pylist())
        by_words = set()
        for segment in snapshot.segments:
            rows = segment.words.db.execute("SELECT rowid, text FROM words").fetchall()
            assert sorted(i for i, _ in rows) == sorted(segment.ok_ids.tolist())  # a row's words beside its vector
            assert all(text == f"note{i} shared" for i, text in rows)
            by_words |= {i for i, _ in segment.words.search('"shared"', 10**6)}
        assert by_words & live == live and len(live) == read_manifest(path)["counts"]["ok"]
        index = SearchIndex(path)
        some = sorted(live)[:: max(1, len(live) // 5)]
        for item_id in some:
            assert [r.id for r in index.search(f"note{item_id}", mode="words")] == [item_id]
    Store.open(path).tidy()
    names = {p.name for p in (path / "segments").iterdir()}
    manifest = read_manifest(path)
    assert {f"{s['name']}.words" for s in manifest["segments"]} <= names


def test_merges_carry_words_and_drop_the_deleted(tmp_path):
    store = Store.create(tmp_path / "i", SETTINGS, 8)
    rng = np.random.default_rng(3)
    ids = []
    for _ in range(12):  # ten one-row segments of a tier merge into one
        item_id = store.new_id()
        ids.append(store.put({"id": item_id, "path": f"/x/{item_id}.txt", "path_bytes": b"/x/%d.txt" % item_id,
                              "root": "/x", "kind": "text", "status": "ok", "indexed_at": now(),
                              "words": f"alpha{item_id}"}, rng.normal(size=8)))
        store.commit()
    assert len(store.manifest["segments"]) < 12 and all(s["words"] for s in store.manifest["segments"])
    store.remove(ids[:3])
    store.commit()
    store.optimize()
    index = SearchIndex(tmp_path / "i")
    assert [r.id for r in index.search(f"alpha{ids[0]}", mode="words")] == []
    assert [r.id for r in index.search(f"alpha{ids[5]}", mode="words")] == [ids[5]]
    (segment,) = index.snapshot.segments
    assert segment.words.db.execute("SELECT count(*) FROM words").fetchone()[0] == 9
    shutil.rmtree(tmp_path / "i")
