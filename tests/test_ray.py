"""`qvlsearch index --ray`: the same pipeline with the model work on a real local Ray instance."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from conftest import SAMPLE_DATA
from make_media import make_image
from PIL import Image
from test_index import ENV, assert_consistent, run_index

from qvlsearch.indexer import IndexOptions
from qvlsearch.store import Snapshot, StoredVectors

ray = pytest.importorskip("ray")
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def ray_instance(tmp_path_factory) -> Path:
    """One local Ray instance for the session; its workers run tests/ray_hooks.py's faults when told.
    Returns the marker file whose existence makes the next model replica to run a batch die."""
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])
    marker = tmp_path_factory.mktemp("ray") / "crash-once"
    os.environ["QVLSEARCH_TEST_CRASH_ONCE"] = str(marker)  # the workers' environment is the one at ray.init
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"worker_process_setup_hook": "ray_hooks.crash_when_told"})
    yield marker
    ray.shutdown()


@pytest.fixture(scope="module")
def options(checkpoints) -> IndexOptions:
    return IndexOptions(model=str(checkpoints["embedder"]), commit_every=5)


@pytest.fixture(scope="module")
def ray_options(options) -> IndexOptions:
    return dataclasses.replace(options, ray=True, ray_workers=2)


def vectors_by_unit(index_dir: Path) -> dict[tuple, np.ndarray]:
    """Stored vectors by (path, page, start_s): a PDF has a row per page, a video per moment."""
    snapshot = Snapshot(index_dir, with_index=False)
    ok = snapshot.items.filter(pc.equal(snapshot.items["status"], "ok"))
    units = zip(ok["path"].to_pylist(), ok["page"].to_pylist(), ok["start_s"].to_pylist(), strict=True)
    return dict(zip(units, StoredVectors(snapshot).get(ok["id"].to_numpy()), strict=True))


def assert_same_vectors(got: dict, want: dict) -> None:
    """Within 1e-5 or one float16 step: vectors are stored as float16, and a vector's last float32 bit
    may depend on the batch it ran in."""
    for unit, vector in want.items():
        np.testing.assert_allclose(got[unit].astype(np.float32), vector.astype(np.float32),
                                   rtol=2**-10, atol=1e-5, err_msg=str(unit))


def assert_same_index(got_dir: Path, want_dir: Path) -> None:
    """Same rows (one per file, PDF page or video moment), statuses and errors; the same vectors."""
    got, want = assert_consistent(got_dir), assert_consistent(want_dir)
    fields = ("path", "page", "start_s", "end_s", "kind", "status", "error", "content_hash", "width", "height",
              "frames", "tokens")

    def rows(store) -> list[tuple]:
        return sorted(tuple(str(r[k]) for k in fields) for r in store.rows.values())

    assert rows(got) == rows(want)
    got_vectors, want_vectors = vectors_by_unit(got_dir), vectors_by_unit(want_dir)
    assert got_vectors.keys() == want_vectors.keys()
    assert_same_vectors(got_vectors, want_vectors)



def untimed(summary):
    """A run's summary less what depends on the clock (its seconds, the measured rates)."""
    return dataclasses.replace(summary, seconds=0, cost=None)

def test_ray_index_equals_the_local_one_and_follows_changes(tmp_path, options, ray_options, embedder, ray_instance):
    corpus = tmp_path / "corpus"
    shutil.copytree(SAMPLE_DATA, corpus)
    local = run_index(tmp_path / "local", [corpus], options, embedder)
    on_ray = run_index(tmp_path / "ray", [corpus], ray_options)
    assert on_ray.summary.failed == local.summary.failed == 1  # broken/corrupt.jpg, with the same error
    assert untimed(on_ray.summary) == untimed(local.summary)
    assert_same_index(tmp_path / "ray", tmp_path / "local")

    again = run_index(tmp_path / "ray", [corpus], ray_options)
    assert again.embedder is None and again.model_runs == 0  # nothing sent to Ray; Ray not even joined
    assert again.summary.unchanged == again.summary.total - 1 and again.summary.failed == 1

    (corpus / "photos" / "cat.jpg").rename(corpus / "renamed cat.jpg")  # move
    (corpus / "photos" / "cake.jpg").unlink()  # delete
    make_image(corpus / "photos" / "tree.webp", size=(80, 60), color=(10, 200, 10))  # modify
    (corpus / "notes" / "new.txt").write_text("a new note about owls\n")  # add
    local = run_index(tmp_path / "local", [corpus], options, embedder)
    changed = run_index(tmp_path / "ray", [corpus], ray_options)
    s = changed.summary
    assert (s.moved, s.added, s.removed, s.updated) == (1, 1, 1, 1) and changed.model_runs == 2
    assert untimed(s) == untimed(local.summary)
    assert_same_index(tmp_path / "ray", tmp_path / "local")


def test_a_replica_that_dies_is_restarted_and_a_file_that_kills_every_worker_is_its_error(
        tmp_path, options, ray_options, embedder, ray_instance):
    corpus = tmp_path / "corpus"
    shutil.copytree(SAMPLE_DATA / "photos", corpus)
    make_image(corpus / "poison.png", color=(1, 2, 3))
    marker = ray_instance
    marker.touch()
    on_ray = run_index(tmp_path / "ray", [corpus], ray_options)
    assert not marker.exists()  # a replica did die in the middle of a batch
    s = on_ray.summary
    assert s.total == 16 and s.added == 15 and s.failed == 1
    assert s.failures[0][0].endswith("poison.png") and "worker died on each of" in s.failures[0][1]

    (corpus / "poison.png").unlink()
    local = run_index(tmp_path / "local", [corpus], options, embedder)
    assert local.summary.added == 15
    ray_vectors, local_vectors = vectors_by_unit(tmp_path / "ray"), vectors_by_unit(tmp_path / "local")
    assert set(local_vectors) <= set(ray_vectors)  # nothing lost
    assert_same_vectors(ray_vectors, local_vectors)


@pytest.mark.skipif(sys.platform == "win32", reason="Ctrl-C to a process group (killpg, SIGSTOP): POSIX")
def test_ctrl_c_exits_130_and_keeps_committed_work(tmp_path, checkpoints):
    rng = np.random.default_rng(0)
    for i in range(150):  # distinct noise photos: enough model work to be interrupted in the middle
        Image.fromarray(rng.integers(0, 255, (384, 384, 3), dtype=np.uint8)).save(tmp_path / f"noise{i:03d}.jpg")
    index_dir = tmp_path / "i"
    proc = subprocess.Popen([sys.executable, "-m", "qvlsearch", "index", str(tmp_path), "--index", str(index_dir),
                             "--model", str(checkpoints["embedder"]), "--commit-every", "5", "--ray",
                             "--ray-workers", "1", "--batch-size", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and proc.poll() is None:  # until a commit with vectors in it
        manifest = index_dir / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text())["counts"].get("ok", 0) > 0:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the whole process group
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.fail("the run finished before it could be interrupted; make the corpus larger")
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "qvlsearch: interrupted"
    # the commit stands, and the view for outside tools with it (Ctrl-C waits while they switch)
    kept = assert_consistent(index_dir).manifest["counts"]["ok"]
    assert 0 < kept < 150


def test_without_ray_installed_ray_exits_2_with_the_pip_line(tmp_path, checkpoints):
    fake = tmp_path / "no-ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    make_image(tmp_path / "r" / "a.png")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(fake.parent), ENV.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "qvlsearch", "index", str(tmp_path / "r"), "--index",
                             str(tmp_path / "i"), "--model", str(checkpoints["embedder"]), "--ray"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("qvlsearch: --ray needs Ray Data, which is not installed; run: "
                                     "pip install 'qvlsearch[ray]'")
    assert not (tmp_path / "i").exists()

