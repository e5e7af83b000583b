"""Installs without decord (the optional `decord` extra): videos are read by PyAV, and asking for decord's reader
says how to install it. Each check runs in a subprocess whose imports cannot find decord."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VIDEO = ROOT / "sample_data" / "videos" / "cat pan.mp4"

# Wraps every import finder so that decord is not found, as where it is not installed: find_spec gives None and
# `import decord` raises ModuleNotFoundError.
HIDE_DECORD = '''
import sys


class _WithoutDecord:
    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "decord":
            return None
        return self._finder.find_spec(name, path, target)

    def __getattr__(self, name):
        return getattr(self._finder, name)


sys.meta_path[:] = [_WithoutDecord(finder) for finder in sys.meta_path]
'''


@pytest.fixture
def without_decord(tmp_path) -> dict[str, str]:
    """The environment of a subprocess that cannot import decord."""
    folder = tmp_path / "hide"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(HIDE_DECORD)
    env = {k: v for k, v in os.environ.items() if k != "FORCE_QWENVL_VIDEO_READER"}
    return {**env, "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)]), "HF_HUB_OFFLINE": "1"}


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)


def test_decord_is_hidden(without_decord):
    done = run(["-c", "import importlib.util, qwen_vl_utils; assert importlib.util.find_spec('decord') is None; "
                      "import decord"], without_decord)
    assert "ModuleNotFoundError: No module named 'decord'" in done.stderr


def test_without_decord_a_video_is_read_by_pyav(without_decord):
    code = ("import json, sys; from qvlsearch.media import VisionOptions, content_parts, load_media; "
            "from qvlsearch.moments import video_duration; "
            "media = load_media(content_parts({'video': sys.argv[1]}, VisionOptions())); "
            "print(json.dumps([media.videos[0][1]['video_backend'], video_duration(sys.argv[1]), "
            "'decord' in sys.modules]))")
    done = run(["-c", code, str(VIDEO)], without_decord)
    assert done.returncode == 0, done.stderr
    backend, duration, imported = json.loads(done.stdout)
    assert backend == "pyav" and duration > 1 and not imported


def test_without_decord_a_video_is_embedded(without_decord, checkpoints):
    done = run(["-m", "qvlsearch", "embed", "--video", str(VIDEO), "--model", str(checkpoints["embedder"]),
                "--device", "cpu", "--no-server"], without_decord)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["vector"]) > 0


@pytest.mark.parametrize("video", sorted((ROOT / "sample_data" / "videos").glob("*.mp4")), ids=lambda p: p.stem)
def test_moment_windows_use_decords_duration(video):
    decord = pytest.importorskip("decord", reason="the qvlsearch[decord] extra")
    from qvlsearch.moments import video_duration

    reader = decord.VideoReader(str(video))
    assert video_duration(str(video)) == pytest.approx(len(reader) / reader.get_avg_fps(), rel=1e-9)


def test_asking_for_decord_without_it_says_how_to_install_it(without_decord):
    done = run(["-c", "import sys; from qvlsearch.media import VisionOptions, content_parts, load_media; "
                      "load_media(content_parts({'video': sys.argv[1]}, VisionOptions()))",
                str(VIDEO)], {**without_decord, "FORCE_QWENVL_VIDEO_READER": "decord"})
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "decord is not installed" in last and "pip install 'qvlsearch[decord]'" in last


# --- Apple Silicon (MPS): this machine has none, so these check the way there and the refusal ------------------


def test_mps_runs_float16_and_auto_prefers_cuda_then_mps_then_cpu():
    import torch

    from qvlsearch.qwen import pick_device, pick_dtype

    assert pick_dtype(torch.device("mps"), None) == torch.float16
    assert pick_dtype(torch.device("mps"), "float32") == torch.float32
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert pick_device("auto").type == expected


def test_asking_for_mps_without_it_is_one_line_and_exit_2():
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    done = subprocess.run([sys.executable, "-m", "qvlsearch", "embed", "a cat", "--device", "mps", "--no-server"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == ("qvlsearch: device mps asked for, but this machine has no Apple Silicon GPU that "
                                   "PyTorch can use (MPS); use --device cpu")


# --- the platform wheel check (tools/check_wheels.py; `make wheels` asks the package index) ----------------------


def test_the_wheel_check_evaluates_markers_for_each_target():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import check_wheels
    finally:
        sys.path.remove(str(ROOT / "tools"))
    from packaging.requirements import Requirement

    dependencies = [Requirement(line) for line in check_wheels.default_dependencies(ROOT / "pyproject.toml")]
    wanted = {platform: {r.name for r in dependencies if check_wheels.applies(r, check_wheels.environment(
        platform, "3.12"), set())} for platform in check_wheels.PLATFORMS}
    assert "faiss-gpu" in wanted["Linux x86_64"] and "faiss-cpu" not in wanted["Linux x86_64"]
    for platform in ("macOS arm64", "Linux aarch64", "Windows amd64"):
        assert "faiss-cpu" in wanted[platform] and "faiss-gpu" not in wanted[platform]
    assert all("decord" not in names for names in wanted.values())  # the `decord` extra only
    extra = Requirement("decord>=0.6; (sys_platform == 'linux' and platform_machine == 'x86_64') "
                        "or sys_platform == 'win32'")
    assert [check_wheels.applies(extra, check_wheels.environment(platform, "3.10"), set())
            for platform in check_wheels.PLATFORMS] == [False, False, True, True]
    torch_cuda = Requirement('nvidia-cublas-cu12; platform_system == "Linux" and platform_machine == "x86_64"')
    assert not check_wheels.applies(torch_cuda, check_wheels.environment("macOS arm64", "3.13"), set())


# --- Windows, by reading: what can be checked here ---------------------------------------------------------------


def test_a_model_served_from_a_windows_folder_is_named_by_its_last_part():
    from qvlsearch.server import ApiError, named

    named("tiny", "C:\\models\\tiny", "embedding")
    named("tiny", "C:\\models\\tiny\\", "embedding")
    named("Qwen3-VL-Embedding-2B", "Qwen/Qwen3-VL-Embedding-2B", "embedding")
    with pytest.raises(ApiError):
        named("models", "C:\\models\\tiny", "embedding")
