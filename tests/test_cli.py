"""The command line as a user and a script see it: real processes, real tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

from conftest import PHOTOS

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qvlsearch", *args], input=stdin, capture_output=True, text=True, env=ENV, timeout=300
    )


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


COMMANDS = ["embed", "index", "info", "reindex", "optimize", "search", "rerank", "serve", "dupes", "eval"]


def test_flags_show_no_type_or_default_in_help():
    for command in ["", *COMMANDS]:
        shown = subprocess.run([sys.executable, "-m", "qvlsearch", *([command] if command else []), "--help"],
                               capture_output=True, text=True, env={**ENV, "COLUMNS": "200"}, timeout=60).stdout
        assert "--help" in shown and "<bool>" not in shown and "[default: no-" not in shown, (command, shown)


def test_verbose_after_the_command_too(checkpoints):
    model = str(checkpoints["embedder"])
    for args in (["-v", "embed", "x", "--model", model], ["embed", "x", "--model", model, "-v"],
                 ["embed", "x", "--model", model, "--verbose"]):
        assert "qvlsearch: loading the model" in run(*args).stderr, args
    assert "loading the model" not in run("embed", "x", "--model", model).stderr
