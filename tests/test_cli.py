"""The command line as a user and a script see it: real processes, real tiny model."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from conftest import PHOTOS, SAMPLE_DATA

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qvlsearch", *args], input=stdin, capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=300)


def refused(result: subprocess.CompletedProcess) -> str:
    """The one `qvlsearch: ` line of a run refused as a usage error (exit 2)."""
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("qvlsearch: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


NOTES = {"cats.txt": 2001, "bees and flowers.txt": 2002, "chess.txt": 2003}  # each with its mtime's year


@pytest.fixture(scope="module")
def notes_index(tmp_path_factory, checkpoints) -> Path:
    """An index of three notes (in notes/ beside it), last modified on June 1 of 2001, 2002 and 2003."""
    root = tmp_path_factory.mktemp("notes-index") / "notes"
    root.mkdir()
    for name, year in NOTES.items():
        shutil.copy(SAMPLE_DATA / "notes" / name, root / name)
        stamp = dt.datetime(year, 6, 1, tzinfo=dt.timezone.utc).timestamp()
        os.utime(root / name, (stamp, stamp))
    index = root.parent / "index"
    assert run("index", str(root), "--index", str(index), "--model", str(checkpoints["embedder"])).returncode == 0
    return index


def test_help_lists_commands_and_does_not_import_torch():
    result = run("--help")
    assert result.returncode == 0 and "embed" in result.stdout
    probe = "import sys, qvlsearch.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_version():
    assert run("--version").stdout.startswith("qvlsearch ")


def test_embed_prints_json_lines(checkpoints):
    result = run(
        "embed", "a cat", "--image", str(PHOTOS / "cat.jpg"), "--dim", "32", "--model", str(checkpoints["embedder"])
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["index"] == 0 and len(record["vector"]) == 32
    assert abs(sum(x * x for x in record["vector"]) - 1) < 1e-4
    assert "Loading weights" not in result.stderr


def test_embed_stdin_reports_bad_items_and_exits_1(checkpoints):
    lines = '{"text": "a"}\n{"image": "missing.jpg"}\n{"video": 3}\n'
    result = run("embed", "-", "--model", str(checkpoints["embedder"]), stdin=lines)
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert "vector" in records[0] and "no such file" in records[1]["error"] and "video must be" in records[2]["error"]
    assert result.stderr.count("qvlsearch: item") == 2


def test_missing_model_and_bad_options_exit_2_with_one_line(tmp_path):
    result = run("embed", "x", "--model", str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("qvlsearch: cannot load model") and "Traceback" not in result.stderr
    assert run("embed", "--no-such-option").returncode == 2


def test_a_model_that_is_not_there_fails_at_once_in_one_line(tmp_path):
    """No cached model and no network: one line naming the download command, without the Hub's retries."""
    missing = "Qwen/Qwen3-VL-Embedding-2B-not-cached"
    offline = run("index", str(PHOTOS), "--index", str(tmp_path / "index"), "--model", missing)
    assert offline.returncode == 2 and offline.stderr.count("\n") == 1
    assert f"`hf download {missing}`" in offline.stderr and "HF_HUB_OFFLINE is set" in offline.stderr
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    started = time.monotonic()
    unreachable = subprocess.run([sys.executable, "-m", "qvlsearch", "embed", "x", "--model", missing],
                                 capture_output=True, text=True, timeout=60,
                                 env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert time.monotonic() - started < 20  # the Hub's five retries took 27 s
    assert unreachable.returncode == 2 and unreachable.stderr.count("\n") == 1
    assert "http://127.0.0.1:9 cannot be reached" in unreachable.stderr and "hf download" in unreachable.stderr
    assert "Retrying" not in unreachable.stderr


def test_palette_images_with_transparency_load_without_warnings(tmp_path):
    from PIL import Image

    from qvlsearch.media import VisionOptions, content_parts, load_media

    image = Image.new("P", (64, 64), 1)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.save(tmp_path / "palette.png", transparency=bytes([0, 128]))  # colour 1: blue at half opacity
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        media = load_media(content_parts({"image": str(tmp_path / "palette.png")}, VisionOptions()))
    assert media.images[0].mode == "RGB" and media.images[0].getpixel((0, 0)) == (127, 127, 255)  # over white


def test_library_warnings_reach_stderr_only_with_verbose():
    probe = ("import sys, warnings; from qvlsearch.cli import main_options\n"
             "main_options(verbose=sys.argv[1] == 'v'); warnings.warn('a library talks', UserWarning)")
    quiet, verbose = (subprocess.run([sys.executable, "-c", probe, flag], capture_output=True, text=True, timeout=60)
                      for flag in ("q", "v"))
    assert quiet.stderr == "" and "a library talks" in verbose.stderr


def test_settings_are_checked_for_library_users_and_items_too(checkpoints):
    from qvlsearch import Embedder, InputError
    from qvlsearch.errors import SettingError
    from qvlsearch.indexer import Indexer, IndexOptions
    from qvlsearch.limits import LIMITS
    from qvlsearch.media import vision_process

    started = time.monotonic()
    with pytest.raises(SettingError, match=r"^max_pixels must be an integer from 4096 to 16777216, got 10$"):
        Embedder(str(checkpoints["embedder"]), max_pixels=10)
    with pytest.raises(InputError, match=r"^fps must be a number above 0, got 0$"):
        Indexer("unused", IndexOptions(model=str(checkpoints["embedder"]), fps=0))
    assert time.monotonic() - started < 1  # refused before any model is loaded
    token = (16 * vision_process.SPATIAL_MERGE_SIZE) ** 2  # the limits restate qwen-vl-utils' own
    assert LIMITS["max_pixels"] == {"low": vision_process.IMAGE_MIN_TOKEN_NUM * token,
                                    "high": vision_process.IMAGE_MAX_TOKEN_NUM * token}
    assert LIMITS["total_pixels"]["low"] == vision_process.VIDEO_MIN_TOKEN_NUM * token
    assert LIMITS["max_frames"]["low"] == vision_process.FRAME_FACTOR
    lines = '{"text": "a", "fps": 0}\n{"text": "b", "max_frames": 1}\n{"text": "c", "fps": 2}\n'
    result = run("embed", "-", "--model", str(checkpoints["embedder"]), stdin=lines)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 1 and "vector" in records[2]
    assert records[0]["error"] == "item 0: fps must be a number above 0, got 0"
    assert records[1]["error"] == "item 1: max_frames must be an integer of at least 2, got 1"


def test_eval_refuses_dims_under_32(tmp_path, notes_index):
    (tmp_path / "q.jsonl").write_text('{"id": "q1", "text": "cats"}\n')
    (tmp_path / "qrels.tsv").write_text(f"q1\t{notes_index.parent / 'notes' / 'cats.txt'}\t1\n")
    result = run("eval", str(tmp_path / "q.jsonl"), "--qrels", str(tmp_path / "qrels.tsv"), "--index",
                 str(notes_index), "--dims", "16,full")
    assert "--dims: '16' is not a dimension qvlsearch searches at; give numbers from 32 to 64" in refused(result)


def test_embed_uses_the_index_model_and_needs_an_input(checkpoints, notes_index):
    model = ["--model", str(checkpoints["embedder"])]
    expected = json.loads(run("embed", "a cat", *model).stdout)["vector"]
    for how in ({"env": {"QVLSEARCH_INDEX": str(notes_index)}}, {}):
        args = ("--index", str(notes_index)) if not how else ()
        result = run("embed", "a cat", *args, **how)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["vector"] == expected
    assert "nothing to embed" in refused(run("embed", *model))
    assert "nothing to embed" in refused(run("embed", "", "--instruction", "Represent it.", *model))
    assert "no items on stdin" in refused(run("embed", "-", *model, stdin="\n"))


def test_search_queries_take_json_and_paths_and_refuse_what_they_ignored(tmp_path, notes_index):
    index = ["--index", str(notes_index), "-k", "2"]
    (tmp_path / "queries.txt").write_text("cats\nchess\n")
    queries = ["--queries", str(tmp_path / "queries.txt")]
    as_json = run("search", *queries, *index, "--json")
    assert as_json.returncode == 0, as_json.stderr
    lines = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [line["query"] for line in lines] == ["cats", "chess"]
    assert all(len(line["results"]) == 2 and line["results"][0]["rank"] == 1 for line in lines)
    paths = run("search", *queries, *index, "--paths").stdout.splitlines()
    found = {r["path"] for line in lines for r in line["results"]}
    assert sorted(paths) == sorted(found) and len(paths) == len(set(paths))  # each file once
    assert "a query TEXT cannot go with it" in refused(run("search", "cats", *queries, *index))
    assert "--contact-sheet cannot go with it" in refused(
        run("search", *queries, *index, "--contact-sheet", str(tmp_path / "sheet.jpg")))


def test_search_names_a_mistyped_folder_and_shows_the_date_it_sorts_by(tmp_path, notes_index):
    index = ["--index", str(notes_index)]
    folder = notes_index.parent / "no-such-folder"
    assert refused(run("search", "cats", *index, "--under", str(folder))) == (
        f"qvlsearch: --under {folder}: no such folder\n")
    result = run("search", "cats", *index, "--sort", "date")
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [row[2] for row in rows] == [f"{year}-06-01T00:00:00" for year in (2003, 2002, 2001)]
    assert [Path(row[4]).name for row in rows] == ["chess.txt", "bees and flowers.txt", "cats.txt"]


def test_rerank_with_an_image_query_takes_every_file_as_a_candidate(checkpoints):
    reranker = ["--reranker", str(checkpoints["reranker"])]
    files = [str(PHOTOS / name) for name in ("bee.jpg", "cake.jpg")]
    result = run("rerank", "--image", str(PHOTOS / "cat.jpg"), *files, *reranker, "--json")
    assert result.returncode == 0, result.stderr
    assert sorted(r["path"] for r in json.loads(result.stdout)) == files
    assert "give a query" in refused(run("rerank", *reranker, stdin=files[0] + "\n"))


COMMANDS = ["embed", "index", "info", "reindex", "optimize", "search", "rerank", "serve", "dupes", "eval"]


def test_help_shows_flags_as_flags_and_defaults_one_way():
    """One pass over every --help: no <bool> on flags, each default as [default: ...] (none in the prose),
    --json/--jsonl/--paths each saying it excludes the others, ivfpq among index's --index-type."""
    shown = {}
    for command in ["", *COMMANDS]:
        shown[command] = " ".join(subprocess.run(
            [sys.executable, "-m", "qvlsearch", *([command] if command else []), "--help"], capture_output=True,
            text=True, env={**ENV, "COLUMNS": "300"}, timeout=60).stdout.replace("│", " ").split())
        text = shown[command]
        assert "--help" in text and "<bool>" not in text and "[default: no-" not in text, (command, text)
        assert "(default" not in text and "default:" not in text.replace("[default:", ""), (command, text)
    for command in ("search", "rerank", "dupes"):
        assert "(not with --jsonl or --paths)" in shown[command] and "(not with --json or --jsonl)" in shown[command]
        assert "(not with --json or --paths)" in shown[command] or command == "dupes"
    assert "flat, hnsw, ivf, ivfpq or a FAISS factory string. [default: (the index's, else flat)]" in shown["index"]


def test_json_jsonl_and_paths_together_are_one_line(tmp_path):
    index = ["--index", str(tmp_path)]
    for command in (["search", "cats", *index], ["rerank", "cats", "a.jpg"], ["dupes", *index]):
        for chosen in (["--json", "--paths"], ["--jsonl", "--json"], ["--paths", "--jsonl"]):
            result = run(*command, *chosen)
            assert result.returncode == 2 and result.stderr == "qvlsearch: choose one of --json, --jsonl and --paths\n"
        result = run(*command, "--json", "-0")
        assert result.returncode == 2 and result.stderr == "qvlsearch: -0/--null goes with --paths\n"


def test_verbose_after_the_command_too(checkpoints):
    model = str(checkpoints["embedder"])
    for args in (["-v", "embed", "x", "--model", model], ["embed", "x", "--model", model, "-v"],
                 ["embed", "x", "--model", model, "--verbose"]):
        assert "qvlsearch: loading the model" in run(*args).stderr, args
    assert "loading the model" not in run("embed", "x", "--model", model).stderr


def test_index_again_follows_the_index_model(tmp_path, checkpoints, notes_index):
    """A nightly `qvlsearch index DIR` needs no --model: it takes the index's; another model is refused."""
    index = tmp_path / "index"
    shutil.copytree(notes_index, index)
    notes = str(notes_index.parent / "notes")
    for how in ({"args": ("--index", str(index))}, {"env": {"QVLSEARCH_INDEX": str(index)}}):
        result = run("index", notes, "--json", *how.get("args", ()), env=how.get("env"))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["unchanged"] == 3
    other = str(checkpoints["reranker"])
    for how in ({"args": ("--model", other)}, {"env": {"QVLSEARCH_MODEL": other}}):
        result = run("index", notes, "--index", str(index), *how.get("args", ()), env=how.get("env"))
        assert f"index has {str(checkpoints['embedder'])!r}, asked {other!r}" in refused(result)
    new = run("index", notes, "--index", str(tmp_path / "new"))  # a new index: the default model (not cached here)
    assert "hf download Qwen/Qwen3-VL-Embedding-2B" in refused(new) and not (tmp_path / "new").exists()


def test_every_usage_error_is_one_line():
    """Click's errors and the commands' own, alike: `qvlsearch: ...` on one line, exit 2; no command: the help."""
    cases = {("search",): "qvlsearch: give a query: TEXT, '-', --image, --video or --queries FILE\n",
             ("search", "cats", "--json", "--paths"): "qvlsearch: choose one of --json, --jsonl and --paths\n",
             ("rerank", "cats", "--reranker", "unused"): "qvlsearch: no candidates: give files as arguments or on "
                                                         "stdin\n",
             ("search", "cats", "--sort", "name"): "qvlsearch: --sort must be one of score, date, got 'name'\n",
             ("embed", "--no-such-option"): "qvlsearch: No such option: --no-such-option",
             ("search", "cats", "-k", "0"): "qvlsearch: Invalid value for '-k' / '--top-k'",
             ("index",): "qvlsearch: Missing argument 'paths'; see `",
             ("no-such-command",): "qvlsearch: No such command 'no-such-command'; see `"}
    for args, start in cases.items():
        assert refused(run(*args, stdin="")).startswith(start), args
    assert run("embed", "--no-such-option").stderr.endswith(" embed --help`\n")  # where to read more
    bare = run()
    assert bare.returncode == 2 and "Usage: " in bare.stdout and "Commands" in bare.stdout


def test_search_options_are_checked_before_the_index_is_read(tmp_path):
    """search.check_filters: every filter option is refused in one line before any index is read or model loaded."""
    missing = ["--index", str(tmp_path / "no-index")]
    for option, words in ((["--camera", "\udcff"], "--camera: '\\udcff' is not valid text"),
                          (["--sort", "name"], "--sort must be one of score, date, got 'name'"),
                          (["--under", str(tmp_path / "typo")], "no such folder"),
                          (["--kind", "photo"], "kind must be one of"),
                          (["--after", "yesterday"], "--after: 'yesterday' is not a date")):
        assert words in refused(run("search", "cats", *missing, *option)), option
        if option[0] in ("--kind", "--under"):
            assert words in refused(run("dupes", *missing, *option)), option
    from qvlsearch.errors import SettingError
    from qvlsearch.search import check_filters

    with pytest.raises(SettingError, match=r"^sort must be one of score, date, got 'name'$"):
        check_filters(sort="name")
