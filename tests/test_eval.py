"""`qvlsearch eval`: a labelled query set whose answers are known (queries that are indexed files), the
stored vectors of a real index, the tiny embedder and reranker."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTOS, SAMPLE_DATA
from make_media import make_pdf
from PIL import Image
from rich.cells import cell_len
from terminal import on_terminal

from qvlsearch.evaluate import (
    EvalInputError,
    Query,
    evaluate,
    metrics,
    parse_media_settings,
    parse_settings,
    read_qrels,
    read_queries,
)
from qvlsearch.indexer import Indexer, IndexOptions
from qvlsearch.pages import PdfPage
from qvlsearch.search import SearchIndex

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
INDEX_INSTRUCTION = "Represent the user's input."
IMAGES = ["cat.jpg", "cake.jpg", "bee.jpg", "books.jpg", "tree.webp", "camera.jpg"]
NOTES = ["cats.txt", "chess.txt", "bees and flowers.txt"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """A folder of files, and queries.jsonl + qrels.tsv beside it: each query is one of the files (embedded
    with the index's instruction, so that the file itself is its one right answer at full width)."""
    root = tmp_path_factory.mktemp("labelled")
    shutil.copytree(PHOTOS, root / "photos")
    shutil.copytree(SAMPLE_DATA / "notes", root / "notes")
    queries = [{"id": f"img-{name}", "image": str(root / "photos" / name), "instruction": INDEX_INSTRUCTION}
               for name in IMAGES]
    queries += [{"id": f"note-{name}", "text": (root / "notes" / name).read_text(), "instruction": INDEX_INSTRUCTION}
                for name in NOTES]
    queries.append({"id": "lost", "text": "a photo that was deleted"})
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    qrels = ["query-id\tcorpus-id\tscore"] + [f"img-{name}\tphotos/{name}\t1" for name in IMAGES]
    qrels += [f"note-{name}\tnotes/{name}\t1" for name in NOTES]
    qrels += ["img-cat.jpg\tphotos/gone.jpg\t1",  # a file not in the index: counted, reported
              "lost\tphotos/deleted.jpg\t1",  # the only answer of "lost" is not in the index: not evaluated
              "nobody\tphotos/cat.jpg\t1"]  # a query id not in the queries file
    (root / "qrels.tsv").write_text("\n".join(qrels) + "\n")
    return root


@pytest.fixture(scope="module")
def index(tmp_path_factory, labelled, checkpoints, embedder, reranker) -> SearchIndex:
    path = tmp_path_factory.mktemp("eval") / "index"
    Indexer(path, IndexOptions(model=str(checkpoints["embedder"])), embedder=embedder).run(
        [labelled / "photos", labelled / "notes"])
    return SearchIndex(path, embedder=embedder, reranker=reranker)


def test_metrics_of_one_ranking_by_hand():
    figures = metrics([5, 3, 9, 4], {3: 2, 9: 1, 7: 1}, k=10)
    assert figures["recall@1"] == 0 and figures["recall@5"] == pytest.approx(2 / 3)
    dcg = 2 / math.log2(3) + 1 / math.log2(4)
    ideal = 2 + 1 / math.log2(3) + 1 / math.log2(4)
    assert figures["ndcg@10"] == pytest.approx(dcg / ideal) and figures["mrr@10"] == 0.5
    assert set(metrics([1], {1: 1}, k=3)) == {"recall@1", "recall@3", "ndcg@3", "mrr@3"}


def test_known_answers_score_one_at_full_width_and_missing_files_are_reported(index, labelled):
    queries, qrels = read_queries(labelled / "queries.jsonl"), read_qrels(labelled / "qrels.tsv")
    full = index.manifest["full_dim"]
    report = evaluate(index, queries, qrels, settings=parse_settings("32,full", "none,int8,binary", index.manifest),
                      modes=["semantic"])
    assert report.queries == 10 and report.evaluated == 9 and report.judgements == 12
    assert report.missing_files == [str(labelled / "photos" / "deleted.jpg"), str(labelled / "photos" / "gone.jpg")]
    assert report.unknown_queries == ["nobody"]
    rows = {(s.dim, s.quantize): s for s in report.settings}
    assert list(rows) == [(32, "none"), (32, "int8"), (32, "binary"), (full, "none"), (full, "int8"),
                          (full, "binary")]
    for quantize in ("none", "int8", "binary"):  # each query's own file first, at full width
        assert rows[(full, quantize)].metrics == {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0,
                                                  "ndcg@10": 1.0, "mrr@10": 1.0}
    for setting in report.settings:
        assert all(0 <= v <= 1 for v in setting.metrics.values()) and setting.latency_ms > 0
    # a setting's figures do not depend on the settings before it (answers ranked below the top matter here)
    cats = {q.id: {str(labelled / "photos" / "black kitty.jpeg"): 1, str(labelled / "notes" / "cats.txt"): 1}
            for q in queries}
    after_32 = evaluate(index, queries, cats, settings=[(32, "none"), (full, "none")]).settings[3:]
    alone = evaluate(index, queries, cats, settings=[(full, "none")]).settings
    assert [s.mode for s in alone] == ["semantic", "words", "hybrid"]  # the three modes side by side
    assert [s.metrics for s in after_32] == [s.metrics for s in alone]


def figures_from_search(index, queries, qrels, **options) -> dict[str, float]:
    """The same figures computed from `SearchIndex.search`, the way a user's searches rank (by file)."""
    paths = set(index.items["path"].to_pylist())
    per_query = []
    for q in queries:
        relevant = {p: g for p, g in qrels.get(q.id, {}).items() if p in paths}
        if relevant:
            hits = index.search(q.item, k=10, instruction=q.item["instruction"], **options)
            per_query.append(metrics(list(dict.fromkeys(h.path for h in hits)), relevant, 10))
    return {name: float(np.mean([m[name] for m in per_query])) for name in per_query[0]}


def test_a_file_with_several_rows_is_found_by_any_of_them(tmp_path, checkpoints, embedder, reranker):
    """A query whose top hit is the right PDF's page 1 finds that PDF at rank 1, whichever row the others are;
    the PDF's other pages do not count again, nor push other files down the ranking."""
    root = tmp_path / "files"
    pages = [Image.new("RGB", (300, 400), color) for color in ((220, 0, 0), (0, 200, 0), (0, 0, 220))]
    for x in range(0, 300, 40):
        pages[1].paste((255, 255, 255), (x, 0, x + 10, 400))
    make_pdf(root / "doc.pdf", pages)
    for name in IMAGES[:3]:
        shutil.copy(PHOTOS / name, root / name)
    Indexer(tmp_path / "i", IndexOptions(model=str(checkpoints["embedder"])), embedder=embedder).run([root])
    index = SearchIndex(tmp_path / "i", embedder=embedder, reranker=reranker)
    assert sorted(index.items["page"].to_pylist(), key=str) == [1, 2, 3, None, None, None]
    PdfPage(str(root / "doc.pdf"), 1).render(index.manifest["max_pixels"]).save(tmp_path / "page1.png")
    query = Query("page1", {"image": str(tmp_path / "page1.png"), "instruction": INDEX_INSTRUCTION})
    [top] = index.search(query.item, k=1, instruction=INDEX_INSTRUCTION)
    assert (top.path, top.page) == (str(root / "doc.pdf"), 1)
    full = index.manifest["dim"]
    report = evaluate(index, [query], {"page1": {str(root / "doc.pdf"): 1}}, settings=[(full, "none")])
    assert report.settings[0].metrics == {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0, "ndcg@10": 1.0,
                                          "mrr@10": 1.0}
    # with the PDF and a photo relevant, the figures are those of the search's hits taken file by file
    both = {"page1": {str(root / "doc.pdf"): 1, str(root / IMAGES[2]): 1}}
    for rerank in (False, True):
        report = evaluate(index, [query], both, settings=[(full, "none")], rerank=rerank, rerank_top=4,
                          modes=["semantic"])
        assert report.settings[-1].metrics == pytest.approx(figures_from_search(
            index, [query], both, mode="semantic", **({"rerank": True, "rerank_top": 4} if rerank else {})))
    assert report.settings[0].metrics["recall@5"] == 1.0  # 4 files: both are in the top 5 files


def test_figures_match_what_search_finds_with_and_without_reranking(index, labelled):
    queries = [q for q in read_queries(labelled / "queries.jsonl") if q.id != "lost"]
    # other answers than the query's own file, so that the ranking below the top matters
    qrels = {q.id: {str(labelled / "photos" / "cat.jpg"): 1, str(labelled / "photos" / "black kitty.jpeg"): 2,
                    str(labelled / "notes" / "cats.txt"): 1} for q in queries}
    report = evaluate(index, queries, qrels, settings=[(index.manifest["dim"], "none")], rerank=True, rerank_top=6,
                      modes=["semantic"])
    plain, reranked = report.settings
    assert plain.rerank_top is None and reranked.rerank_top == 6
    assert plain.metrics == pytest.approx(figures_from_search(index, queries, qrels, mode="semantic"))
    assert reranked.metrics == pytest.approx(figures_from_search(index, queries, qrels, mode="semantic", rerank=True,
                                                                 rerank_top=6))
    assert report.rerank_ms > 0


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qvlsearch", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def test_cli_table_json_and_malformed_input(index, labelled, tmp_path):
    base = ["eval", str(labelled / "queries.jsonl"), "--qrels", str(labelled / "qrels.tsv"), "--index",
            str(index.path), "--dims", "64,32", "--quantize", "none,binary"]
    tsv = cli(*base)
    assert tsv.returncode == 0, tsv.stderr
    lines = [line.split("\t") for line in tsv.stdout.splitlines()]
    assert lines[0] == ["dim", "quantize", "mode", "rerank_top", "recall@1", "recall@5", "recall@10", "ndcg@10",
                        "mrr@10", "latency_ms"]
    assert [row[:4] for row in lines[1:]] == [[dim, quantize, mode, "-"] for dim in ("64", "32")
                                              for quantize in ("none", "binary")
                                              for mode in ("semantic", "words", "hybrid")]
    assert "2 files named in" in tsv.stderr and "9 of 10 queries evaluated" in tsv.stderr
    report = json.loads(cli(*base, "--json").stdout)
    assert report["evaluated"] == 9 and len(report["missing_files"]) == 2 and len(report["settings"]) == 12

    bad_queries = tmp_path / "queries.jsonl"
    bad_queries.write_text('{"id": "q1", "text": "cat"}\n{"text": "no id"}\n')
    bad_qrels = tmp_path / "qrels.tsv"
    bad_qrels.write_text("q1\tphotos/cat.jpg\t1\nq1 photos/cake.jpg 1\n")
    for args, expected in (
            (["eval", str(bad_queries), "--qrels", str(labelled / "qrels.tsv")], f"{bad_queries}:2:"),
            (["eval", str(labelled / "queries.jsonl"), "--qrels", str(bad_qrels)], f"{bad_qrels}:2:"),
            (base[:-4] + ["--dims", "64,huge"], "--dims: 'huge'"),
            (base[:-4] + ["--quantize", "pq"], "--quantize: 'pq'")):
        result = cli(*args, "--index", str(index.path))
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert '{"id": "q1", "text":' in cli("eval", str(bad_queries), "--qrels", str(labelled / "qrels.tsv"),
                                         "--index", str(index.path)).stderr
    assert "q1<TAB>photos/cat.jpg<TAB>1" in cli("eval", str(labelled / "queries.jsonl"), "--qrels", str(bad_qrels),
                                                "--index", str(index.path)).stderr
    with pytest.raises(EvalInputError, match="multiple of 8"):
        parse_settings("36", "binary", index.manifest)


def test_the_table_fits_the_terminal_with_whole_headers(index, labelled):
    """At 80 and 60 columns every header is whole and every line fits; the figures that do not fit continue in a
    block below, each row named by its setting again."""
    base = ["eval", str(labelled / "queries.jsonl"), "--qrels", str(labelled / "qrels.tsv"), "--index",
            str(index.path), "--dims", "64,32", "--quantize", "none,binary"]
    names = cli(*base).stdout.splitlines()[0].split("\t")
    for columns in (80, 60):
        code, out = on_terminal(*base, columns=columns, env=ENV)
        assert code == 0 and all(cell_len(line) <= columns for line in out.splitlines()), out
        blocks = [block.splitlines() for block in out.rstrip("\n").split("\n\n")]
        headers = [h for block in blocks for h in block[0].split()]
        assert [h for h in names if h in headers] == names and set(headers) <= set(names), out
        for block in blocks:
            assert block[0].split()[:4] == ["dim", "quantize", "mode", "rerank_top"] and len(block) == 13, out
            assert [row.split()[:3] for row in block[1:]] == [[dim, quantize, mode] for dim in ("64", "32")
                                                              for quantize in ("none", "binary")
                                                              for mode in ("semantic", "words", "hybrid")]


def test_media_settings_embed_the_labelled_files_again_and_only_them(index, labelled):
    """--max-pixels: one row per setting, the index's own first; at each, the 9 labelled files (of the more the index
    holds) are embedded again, once: a second run reads them from the cache."""
    queries, qrels = read_queries(labelled / "queries.jsonl"), read_qrels(labelled / "qrels.tsv")
    own = index.manifest["max_pixels"]
    settings = parse_media_settings("200704,50176", None, None, index.manifest)
    assert [s.max_pixels for s in settings] == [own, 200704, 50176]
    first = evaluate(index, queries, qrels, settings=parse_settings(None, None, index.manifest),
                     media_settings=settings)
    rows = [row.to_json() for row in first.media_settings]
    assert [(r["max_pixels"], r["index_setting"]) for r in rows] == [(own, True), (200704, False), (50176, False)]
    assert len(index) > 9 and all(r["embedded"] == 9 and r["cached"] == 0 and r["seconds_per_item"] > 0
                                    for r in rows)
    assert len(list((Path(index.path) / "cache" / "eval").glob("*.npz"))) == 9 * 3  # one entry a file and setting
    assert first.media_settings[0].metrics == first.settings[0].metrics  # the own setting: the stored vectors
    again = evaluate(index, queries, qrels, settings=parse_settings(None, None, index.manifest),
                     media_settings=settings)
    assert [(r.embedded, r.cached) for r in again.media_settings] == [(0, 9)] * 3
    assert [r.metrics for r in again.media_settings] == [r.metrics for r in first.media_settings]
    tsv = cli("eval", str(labelled / "queries.jsonl"), "--qrels", str(labelled / "qrels.tsv"), "--index",
              str(index.path), "--max-pixels", "200704,50176")
    lines = [line.split("\t") for line in tsv.stdout.splitlines()]
    assert tsv.returncode == 0 and lines[0][:4] == ["max_pixels", "fps", "max_frames", "index_setting"], tsv.stderr
    assert lines[0][-1] == "seconds_per_item" and [row[0] for row in lines[1:]] == [str(own), "200704", "50176"]
    with pytest.raises(EvalInputError, match="--max-pixels: 'big'"):
        parse_media_settings("big", None, None, index.manifest)
