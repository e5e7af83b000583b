"""What an index run will cost: the work by kind and the measured rates on a terminal and in --json, a dry run's
sample that writes nothing, and the bfloat16 warning on a CPU without native bf16 (real files, the tiny model)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from make_media import make_image, make_pdf, make_video
from PIL import Image
from terminal import raw_terminal

from qvlsearch.estimate import CostMeter, bf16_warning, duration_text, levers_line, native_bf16
from qvlsearch.indexer import Indexer, IndexOptions

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """3 photos, a 2-page PDF, a 6-second video and a text."""
    root = tmp_path_factory.mktemp("library")
    for i in range(3):
        make_image(root / f"photo{i}.png", size=(96, 64), color=(i * 80, 40, 40))
    make_pdf(root / "two pages.pdf", [Image.new("RGB", (90, 120), c) for c in ("white", "gray")])
    make_video(root / "clip.mp4", frames=36, fps=6)
    (root / "note.txt").write_text("a note about the garden")
    return root


def folder_state(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(folder.rglob("*"))}


def test_the_estimate_on_a_terminal(tmp_path, library, checkpoints):
    code, shown = raw_terminal("index", str(library), "--index", str(tmp_path / "i"), "--model",
                               str(checkpoints["embedder"]), columns=100, env=ENV, stream="stderr")
    assert code == 0, shown
    assert "qvlsearch: to embed: 3 photos, 1 video (0.1 minutes), 2 PDF pages, 1 text" in shown
    measured = [line for line in shown.replace("\r", "\n").splitlines() if "qvlsearch: measured" in line]
    assert len(measured) == 4, shown  # a line as each kind is first measured: the estimate refined
    assert all(name in measured[-1] for name in ("a photo", "a video", "a PDF page", "a text", "expected")), shown
    assert "not measured yet" not in measured[-1] and "indexing" in shown and "files/s" in shown


def test_dry_run_samples_each_kind_and_writes_nothing(tmp_path, library, checkpoints, embedder):
    index_dir = tmp_path / "i"
    Indexer(index_dir, IndexOptions(model=str(checkpoints["embedder"])), embedder=embedder).run(
        [library / "photo0.png"])
    before = folder_state(index_dir)
    result = subprocess.run([sys.executable, "-m", "qvlsearch", "index", str(library), "--index", str(index_dir),
                             "--model", str(checkpoints["embedder"]), "--dry-run", "--sample", "1", "--json"],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["added"] == 5 and summary["unchanged"] == 1
    assert summary["planned"] == {"image": 2, "video": 1, "pdf": 2, "text": 1}
    assert summary["embedded"] == {"image": 1, "video": 1, "pdf": 1, "text": 1}  # the sample: one of each kind
    assert set(summary["seconds_per_item"]) == {"image", "video", "pdf", "text"}
    assert all(seconds > 0 for seconds in summary["seconds_per_item"].values())
    assert "qvlsearch: to embed: 2 photos" in result.stderr and "qvlsearch: measured" in result.stderr
    assert folder_state(index_dir) == before  # nothing written, not even the lock
    lines: list[str] = []
    new = Indexer(tmp_path / "new", IndexOptions(model=str(checkpoints["embedder"])), dry_run=True, sample=2,
                  embedder=embedder, say=lines.append)
    assert new.run([library]).cost["embedded"] == {"image": 2, "video": 1, "pdf": 2, "text": 1}
    assert not (tmp_path / "new").exists() and lines[0].startswith("to embed: 3 photos")


def test_a_run_reports_its_rates_in_json(tmp_path, library, checkpoints, embedder):
    summary = Indexer(tmp_path / "i", IndexOptions(model=str(checkpoints["embedder"]), moment_seconds=0),
                      embedder=embedder).run([library]).to_json()
    assert summary["planned"] is None  # no terminal, no plan: the rates are measured all the same
    assert summary["embedded"] == {"image": 3, "video": 1, "pdf": 2, "text": 1}
    assert set(summary["seconds_per_item"]) == {"image", "video", "pdf", "text"}
    assert json.loads(json.dumps(summary)) == summary


def test_the_time_left_and_the_levers_on_a_cpu():
    meter = CostMeter()
    meter.plan(["image"] * 1000 + ["pdf"] * 10)
    meter.done, meter.seconds = {"image": 2}, {"image": 84.0}  # 42 s a photo, pages not measured yet
    assert meter.seconds_left() == pytest.approx(998 * 42)
    assert meter.unmeasured() == ["pdf"] and "not counting PDF pages" in meter.estimate_line()
    assert "expected 11 h 40 min in all" in meter.estimate_line() and duration_text(75) == "1 min 15 s"
    assert "--max-pixels 401408" in levers_line(meter, "cpu") and "qvlsearch eval" in levers_line(meter, "cpu")
    assert "--max-pixels 200704 (" in levers_line(meter, "cpu", max_pixels=401408)
    assert "--max-pixels" not in levers_line(meter, "cpu", max_pixels=200704).split(";")[0]
    assert levers_line(meter, "cuda") is None
    meter.seconds = {"image": 2.0}
    assert levers_line(meter, "cpu") is None  # 17 minutes: not long


def test_bfloat16_on_a_cpu_without_native_bf16_warns_once(checkpoints, caplog):
    """One warning line with the measured factor where the CPU lacks AMX and AVX-512 BF16 (the AMD EPYC build
    machine); none where it has them (an Intel Xeon with AMX, where bfloat16 may be the faster choice)."""
    from qvlsearch import Embedder

    assert native_bf16({"avx2", "avx512_bf16"}) and native_bf16({"amx_bf16"}) and not native_bf16({"avx2", "fma"})
    assert "measured 7× slower than float32" in bf16_warning({"avx2", "fma"}) and bf16_warning({"amx_bf16"}) is None
    with caplog.at_level(logging.WARNING, logger="qvlsearch"):
        Embedder(str(checkpoints["embedder"]), device="cpu", dtype="bfloat16")
        Embedder(str(checkpoints["embedder"]), device="cpu")  # float32: nothing to say
    warnings = [r.getMessage() for r in caplog.records if "bfloat16" in r.getMessage()]
    if native_bf16() is False:
        assert len(warnings) == 1 and "× slower" in warnings[0] and "measured" in warnings[0], warnings
    else:
        assert warnings == []
