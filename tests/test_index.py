"""`qvlsearch index`: real folders, real FAISS and Parquet, the tiny model, and real processes killed."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE_DATA
from make_media import make_audio_only, make_image, make_video
from PIL import Image
from terminal import raw_terminal

from qvlsearch.indexer import Indexer, IndexOptions, lock_index
from qvlsearch.store import Snapshot, Store, StoredVectors, StoreError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def options(checkpoints) -> IndexOptions:
    return IndexOptions(model=str(checkpoints["embedder"]), commit_every=5, device="cpu")


def run_index(index_dir: Path, roots: list[Path], options: IndexOptions, embedder=None, **kwargs) -> Indexer:
    indexer = Indexer(index_dir, options, embedder=embedder, **kwargs)
    indexer.run(roots)
    return indexer


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qvlsearch", *args], capture_output=True, text=True, env=ENV,
                          timeout=300, **kwargs)


def assert_consistent(index_dir: Path, view: bool = True) -> Store:
    """The committed generation is readable and agrees with itself, and with the view outside tools read
    (which a killed writer may leave one commit behind, not an interrupted one: `view=False`, until the next
    writer)."""
    snapshot = Snapshot(index_dir)
    manifest = snapshot.manifest
    ok_ids = snapshot.items.filter(pc.equal(snapshot.items["status"], "ok"))["id"].to_numpy()
    assert len(snapshot) == len(ok_ids) == manifest["counts"]["ok"]
    assert snapshot.items.num_rows == manifest["counts"]["items"]
    for segment, entry in zip(snapshot.segments, manifest.get("segments", [{"index": "legacy"}]), strict=True):
        assert segment.index.ntotal == len(segment.ok_ids) == len(segment.vectors)
        if segment.words is not None:  # the words of exactly its ok rows
            rows = segment.words.db.execute("SELECT rowid FROM words").fetchall()
            assert sorted(i for (i,) in rows) == sorted(segment.ok_ids.tolist())
        if entry["index"] == "Flat" and segment.index.ntotal:
            expected = np.asarray(segment.vectors, dtype=np.float32)[:, :manifest["dim"]]
            expected /= np.linalg.norm(expected, axis=1, keepdims=True)
            np.testing.assert_allclose(segment.index.reconstruct_n(0, segment.index.ntotal), expected, atol=1e-6)
    live = set(np.concatenate([np.setdiff1d(s.ok_ids, s.ok_ids[s.deleted_rows]) for s in snapshot.segments]
                              or [np.zeros(0, np.int64)]).tolist())
    assert live == set(ok_ids.tolist())
    if not view:
        return Store.open(index_dir)
    # the documented one-liner for outside tools: the items/ folder less the deleted/ ids
    idx = index_dir
    outside = pq.read_table(f"{idx}/items").filter(~pc.field("id").isin(pq.read_table(f"{idx}/deleted")["id"]))
    assert sorted(outside["id"].to_pylist()) == snapshot.items["id"].to_pylist()
    return Store.open(index_dir)


def vectors_by_path(index_dir: Path) -> dict[str, np.ndarray]:
    snapshot = Snapshot(index_dir, with_index=False)
    ok = snapshot.items.filter(pc.equal(snapshot.items["status"], "ok"))
    return dict(zip(ok["path"].to_pylist(), StoredVectors(snapshot).get(ok["id"].to_numpy()), strict=True))


@pytest.fixture()
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    shutil.copytree(SAMPLE_DATA / "photos", root / "photos")
    shutil.copytree(SAMPLE_DATA / "notes", root / "notes")
    shutil.copy(SAMPLE_DATA / "videos" / "bouncing red ball.mp4", root / "ball.mp4")
    return root


def test_first_run_writes_a_complete_index(tmp_path, corpus, options, embedder):
    index_dir = tmp_path / "index"
    summary = run_index(index_dir, [corpus], options, embedder).summary
    files = [p for p in corpus.rglob("*") if p.is_file()]
    assert summary.added == summary.total == len(files) and summary.failed == 0
    store = assert_consistent(index_dir)
    manifest = store.manifest
    assert manifest["model"] == options.model and manifest["dim"] == manifest["full_dim"] == 64
    assert manifest["model_revision"].startswith("config-sha256:")
    assert manifest["counts"]["by_kind"] == {"image": 15, "text": 6, "video": 1}
    table = pq.read_table(index_dir / "items").to_pylist()  # no deletes yet: the folder is the item table
    video = next(r for r in table if r["kind"] == "video")
    assert video["frames"] >= 2 and video["duration_s"] == pytest.approx(5.0) and video["tokens"] > 0
    cat = next(r for r in table if r["path"].endswith("/cat.jpg"))
    assert (cat["width"], cat["height"]) == Image.open(corpus / "photos" / "cat.jpg").size
    assert cat["root"] == str(corpus) and len(cat["content_hash"]) == 32 and cat["status"] == "ok"


def test_stored_vectors_are_the_embedders(tmp_path, corpus, options, embedder):
    by_path = vectors_by_path(run_index(tmp_path / "i", [corpus], options, embedder).index_dir)
    note = corpus / "notes" / "cats.txt"
    expected = embedder.embed([
        {"image": str(corpus / "photos" / "bee.jpg"), "instruction": options.instruction},
        {"text": note.read_text(), "instruction": options.instruction},
        {"video": str(corpus / "ball.mp4"), "instruction": options.instruction},
    ])
    got = [by_path[str(corpus / "photos" / "bee.jpg")], by_path[str(note)], by_path[str(corpus / "ball.mp4")]]
    np.testing.assert_allclose(np.stack(got).astype(np.float32), expected, atol=2e-3)  # stored as float16


def test_unchanged_tree_embeds_nothing_and_never_loads_the_model(tmp_path, corpus, options, embedder):
    run_index(tmp_path / "i", [corpus], options, embedder)
    generation = Store.open(tmp_path / "i").manifest["generation"]
    again = run_index(tmp_path / "i", [corpus], options)  # no embedder given: it would load one if needed
    assert again.embedder is None and again.model_runs == 0
    assert again.summary.unchanged == again.summary.total and again.summary.added == 0
    assert Store.open(tmp_path / "i").manifest["generation"] == generation  # nothing rewritten


def test_modify_delete_move_copy(tmp_path, corpus, options, embedder):
    index_dir = tmp_path / "i"
    run_index(index_dir, [corpus], options, embedder)
    before = vectors_by_path(index_dir)
    (corpus / "photos" / "cat.jpg").rename(corpus / "renamed cat.jpg")  # move
    shutil.copy(corpus / "photos" / "bee.jpg", corpus / "notes" / "bee copy.jpg")  # copy
    (corpus / "photos" / "cake.jpg").unlink()  # delete
    make_image(corpus / "photos" / "tree.webp", size=(80, 60), color=(10, 200, 10))  # modify
    indexer = run_index(index_dir, [corpus], options, embedder)
    s = indexer.summary
    assert (s.moved, s.added, s.removed, s.updated, s.failed) == (1, 1, 1, 1, 0)
    assert indexer.model_runs == 1  # only the modified file went through the model
    after = assert_consistent(index_dir)
    by_path = vectors_by_path(index_dir)
    np.testing.assert_array_equal(by_path[str(corpus / "renamed cat.jpg")], before[str(corpus / "photos" / "cat.jpg")])
    paths = {r["path"] for r in after.rows.values()}
    assert str(corpus / "photos" / "cake.jpg") not in paths and str(corpus / "photos" / "cat.jpg") not in paths
    np.testing.assert_array_equal(by_path[str(corpus / "notes" / "bee copy.jpg")],
                                  by_path[str(corpus / "photos" / "bee.jpg")])
    tree = by_path[str(corpus / "photos" / "tree.webp")].astype(np.float32)
    assert not np.allclose(tree, before[str(corpus / "photos" / "tree.webp")].astype(np.float32))


def test_several_roots_share_one_index(tmp_path, corpus, options, embedder):
    index_dir = tmp_path / "i"
    run_index(index_dir, [corpus / "photos"], options, embedder)
    run_index(index_dir, [corpus / "notes"], options, embedder)
    store = assert_consistent(index_dir)
    assert {r["root"] for r in store.rows.values()} == {str(corpus / "photos"), str(corpus / "notes")}
    assert store.manifest["counts"]["items"] == 21


def test_bad_inputs_become_error_rows_and_the_run_completes(tmp_path, options, embedder):
    root = tmp_path / "bad"
    make_image(root / "good.png")
    make_image(root / "really a png.jpg", size=(40, 40))  # wrong extension, same kind: fine
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000))
    data = (SAMPLE_DATA / "photos" / "cat.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "zero.png").write_bytes(b"")
    (root / "text.jpg").write_text("I am text\n")
    (root / "binary.txt").write_bytes(os.urandom(500).replace(b"\x00", b"") + b"\x00")
    Image.new("1", (20000, 20000)).save(root / "bomb.png")
    (root / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    make_video(root / "one frame.mp4", frames=1)
    make_audio_only(root / "no frames.mp4")
    (root / os.fsdecode(b"caf\xe9 latin1.png")).write_bytes((root / "good.png").read_bytes())
    (root / "loop").mkdir()
    (root / "loop" / "back").symlink_to(root)
    summary = run_index(tmp_path / "i", [root], IndexOptions(**{**options.__dict__, "follow_symlinks": True}),
                        embedder).summary
    store = assert_consistent(tmp_path / "i")
    rows = {Path(r["path"]).name: r for r in store.rows.values()}
    errors = {name: r["error"] for name, r in rows.items() if r["status"] == "error"}
    assert rows["good.png"]["status"] == rows["really a png.jpg"]["status"] == "ok"
    assert rows["caf\\xe9 latin1.png"]["status"] == "ok"
    assert rows["caf\\xe9 latin1.png"]["path_bytes"].endswith(b"caf\xe9 latin1.png")
    assert "not a readable image" in errors["corrupt.jpg"]
    assert "truncated" in errors["truncated.jpg"] or "not a readable image" in errors["truncated.jpg"]
    assert errors["zero.png"] == "empty file"
    assert "content is text" in errors["text.jpg"]
    assert "unknown content" in errors["binary.txt"]
    assert "decompression bomb" in errors["bomb.png"]
    assert errors["dangling.jpg"] == "broken symbolic link"
    assert "at least 2" in errors["one frame.mp4"]
    assert errors["no frames.mp4"] == "has no video stream"
    assert errors["back"] == "symbolic link loop"
    assert summary.failed == len(errors) == 10
    assert all("\n" not in e for e in errors.values())


def test_unreadable_file_as_an_unprivileged_process(tmp_path, checkpoints):
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to drop root's read-everything capability")
    root = tmp_path / "perm"
    make_image(root / "ok.png")
    make_image(root / "secret.png").chmod(0)
    drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]
    result = subprocess.run([*drop, sys.executable, "-m", "qvlsearch", "index", str(root), "--index",
                             str(tmp_path / "i"), "--model", str(checkpoints["embedder"]), "--json"],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["failed"] == 1
    store = assert_consistent(tmp_path / "i")
    secret = next(r for r in store.rows.values() if r["path"].endswith("secret.png"))
    assert secret["status"] == "error" and "permission denied" in secret["error"]


def test_other_settings_are_refused_with_a_way_out(tmp_path, corpus, options, embedder):
    run_index(tmp_path / "i", [corpus / "notes"], IndexOptions(**{**options.__dict__, "dim": 32}), embedder)
    with pytest.raises(StoreError, match=r"dim: index has 32, asked 48.*qvlsearch reindex"):
        run_index(tmp_path / "i", [corpus / "notes"], IndexOptions(**{**options.__dict__, "dim": 48}), embedder)
    with pytest.raises(StoreError, match="quantize"):
        run_index(tmp_path / "i", [corpus / "notes"],
                  IndexOptions(**{**options.__dict__, "dim": 32, "quantize": "int8"}), embedder)
    # options left out follow the index: a cron job need not repeat them
    again = run_index(tmp_path / "i", [corpus / "notes"], options, embedder)
    assert again.summary.unchanged == 6


def test_reindex_changes_dim_quantization_and_type_without_the_model(tmp_path, corpus, options, embedder):
    run_index(tmp_path / "i", [corpus], options, embedder)
    # 22 items make one small segment, searched exactly whatever the index type (see test_store.py for sealing)
    for args, factory in ((["--dim", "32", "--quantize", "int8", "--index-type", "hnsw"], "SQ8"),
                          (["--quantize", "binary"], "BinaryFlat"),
                          (["--quantize", "none", "--index-type", "ivf"], "Flat")):
        result = cli("reindex", "--index", str(tmp_path / "i"), *args)
        assert result.returncode == 0, result.stderr
        store = assert_consistent(tmp_path / "i")
        assert [s["index"] for s in store.manifest["segments"]] == [factory]
        assert Snapshot(tmp_path / "i").segments[0].index.ntotal == 22
    assert store.manifest["dim"] == 32


def test_second_writer_is_refused_and_wait_waits(tmp_path, corpus, checkpoints):
    index_dir = tmp_path / "i"
    lock = lock_index(index_dir, wait=False)
    try:
        result = cli("index", str(corpus / "notes"), "--index", str(index_dir), "--model", str(checkpoints["embedder"]))
        assert result.returncode == 2
        assert f"(pid {os.getpid()}) is writing to {index_dir}" in result.stderr and "--wait" in result.stderr
        waiter = subprocess.Popen([sys.executable, "-m", "qvlsearch", "index", str(corpus / "notes"), "--index",
                                   str(index_dir), "--model", str(checkpoints["embedder"]), "--wait", "--json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        assert select.select([waiter.stderr], [], [], 120)[0], "the waiter never said that it waits"
        said = waiter.stderr.readline()  # written once it has found the lock taken, and waits
        assert said == f"qvlsearch: waiting for another qvlsearch index (pid {os.getpid()}) writing to {index_dir}\n"
        assert waiter.poll() is None and not (index_dir / "manifest.json").exists()
    finally:
        lock.release()
    out, _ = waiter.communicate(timeout=300)
    assert waiter.returncode == 0 and json.loads(out)["added"] == 6


def test_stale_lock_of_a_killed_writer_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"from qvlsearch.indexer import lock_index; import time; "
                               f"held = lock_index(__import__('pathlib').Path({str(tmp_path)!r}), False); "
                               "print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(StoreError, match="is writing"):
        lock_index(tmp_path, wait=False)
    holder.kill()
    holder.wait()
    lock_index(tmp_path, wait=False).release()


def generation(index_dir: Path) -> int:
    """The committed generation (0 before the first commit)."""
    try:
        return json.loads((index_dir / "manifest.json").read_text())["generation"]
    except FileNotFoundError:
        return 0


def test_sigkill_inside_indexing_then_resume_equals_an_uninterrupted_run(tmp_path, corpus, checkpoints):
    args = ["index", str(corpus), "--model", str(checkpoints["embedder"]), "--commit-every", "3", "--workers", "1",
            "--batch-size", "1"]
    assert cli(*args, "--index", str(tmp_path / "clean")).returncode == 0
    clean = vectors_by_path(tmp_path / "clean")
    killed = tmp_path / "killed"
    for commits in (1, 2, 3):  # run n is killed just after its n-th commit (3n files), with files still to do
        proc = subprocess.Popen([sys.executable, "-m", "qvlsearch", *args, "--index", str(killed)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        start, deadline = generation(killed), time.monotonic() + 120
        while generation(killed) < start + commits and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.kill()  # SIGKILL; TerminateProcess (exit status 1) on Windows
        assert proc.wait() == (1 if sys.platform == "win32" else -signal.SIGKILL), "the run ended before it was killed"
        store = assert_consistent(killed, view=False)  # the view catches up at the next run
        assert 0 < len(store.rows) < len(clean)
    done = len(store.rows)
    result = cli(*args, "--index", str(killed), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["unchanged"], summary["added"]) == (done, len(clean) - done)  # committed work was not redone
    assert_consistent(killed)
    got = vectors_by_path(killed)
    assert got.keys() == clean.keys()
    for path, vector in clean.items():
        np.testing.assert_allclose(got[path].astype(np.float32), vector.astype(np.float32), atol=2e-3)


@pytest.mark.parametrize("decoders", ["threads", "processes"])
@pytest.mark.skipif(sys.platform == "win32", reason="Ctrl-C to a process group (killpg, SIGSTOP): POSIX")
def test_ctrl_c_commits_and_exits_130(tmp_path, checkpoints, decoders):
    rng = np.random.default_rng(0)
    for i in range(200):  # distinct noise photos: enough model work to be interrupted in the middle
        Image.fromarray(rng.integers(0, 255, (384, 384, 3), dtype=np.uint8)).save(tmp_path / f"noise{i:03d}.jpg")
    proc = subprocess.Popen([sys.executable, "-m", "qvlsearch", "index", str(tmp_path), "--index", str(tmp_path / "i"),
                             "--model", str(checkpoints["embedder"]), "--commit-every", "10", "--workers", "1",
                             "--batch-size", "2", *(["--processes"] if decoders == "processes" else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if run in a `&` job
    deadline = time.monotonic() + 120
    while generation(tmp_path / "i") == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGSTOP)  # frozen after its first commit: it cannot finish before the Ctrl-C
    assert proc.poll() is None and Store.open(tmp_path / "i").manifest["counts"]["items"] < 200
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the whole process group, worker processes too
    os.killpg(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["qvlsearch: interrupted"]  # and no worker's traceback
    assert_consistent(tmp_path / "i")  # Ctrl-C waits while a commit's manifest and view switch


def test_cli_json_summary_strict_and_info(tmp_path, checkpoints):
    root = tmp_path / "r"
    make_image(root / "a.png")
    (root / "b.jpg").write_text("not an image")
    base = ["index", str(root), "--index", str(tmp_path / "i"), "--model", str(checkpoints["embedder"])]
    result = cli(*base, "--json")
    assert result.returncode == 0
    summary = json.loads(result.stdout)
    assert {k: summary[k] for k in ("added", "updated", "moved", "removed", "unchanged", "failed", "total")} == {
        "added": 1, "updated": 0, "moved": 0, "removed": 0, "unchanged": 0, "failed": 1, "total": 2}
    assert summary["failures"][0]["path"].endswith("b.jpg")
    assert cli(*base, "--strict", "--quiet").returncode == 1
    quiet = cli(*base, "--quiet")
    assert quiet.stdout == "" and "indexed" not in quiet.stderr
    info = json.loads(cli("info", "--index", str(tmp_path / "i"), "--json").stdout)
    assert info["manifest"]["counts"]["items"] == 2 and info["failed"][0]["path"].endswith("b.jpg")
    assert info["roots"] == [{"path": str(root), "files": 2}]  # what it was built from, failed files too
    text = cli("info", "--index", str(tmp_path / "i")).stdout
    assert "failed:" in text and f"\nroot:      {root} (2 files)\n" in text
    assert cli("index", str(tmp_path / "nope"), "--index", str(tmp_path / "i")).returncode == 2
    missing = cli("info", "--index", str(tmp_path / "none"))
    assert missing.returncode == 2 and "no index at" in missing.stderr


def folder_state(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry below a folder: its mode, mtime and (for a file) content."""
    return {str(p.relative_to(folder)): (p.stat().st_mode, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(folder.rglob("*"))}


def test_dry_run_writes_nothing(tmp_path, corpus, options, embedder):
    indexer = run_index(tmp_path / "new", [corpus], options, embedder, dry_run=True)
    assert indexer.summary.added == indexer.summary.total == 22 and indexer.model_runs == 0
    assert not (tmp_path / "new").exists()  # no folder, no lock
    index_dir = tmp_path / "i"
    run_index(index_dir, [corpus / "notes"], options, embedder)
    (index_dir / "lock").unlink()
    (index_dir / "lock.pid").unlink()
    (index_dir / ".items-000009.parquet.tmp").write_bytes(b"left by a killed writer")  # the clean-up's business
    (corpus / "notes" / "cats.txt").unlink()
    before = folder_state(index_dir)
    dry = run_index(index_dir, [corpus], options, dry_run=True).summary
    assert (dry.added, dry.removed, dry.unchanged) == (16, 1, 5)
    assert folder_state(index_dir) == before


def test_default_index_folder_comes_from_the_environment(tmp_path, checkpoints):
    root = tmp_path / "r"
    make_image(root / "a.png")
    env = {**ENV, "XDG_DATA_HOME": str(tmp_path / "data"), "QVLSEARCH_MODEL": str(checkpoints["embedder"])}
    env.pop("QVLSEARCH_INDEX", None)
    args = [sys.executable, "-m", "qvlsearch", "index", str(root), "--quiet"]
    assert subprocess.run(args, env=env, timeout=300).returncode == 0
    assert_consistent(tmp_path / "data" / "qvlsearch" / "index")
    env["QVLSEARCH_INDEX"] = str(tmp_path / "elsewhere")
    assert subprocess.run(args, env=env, timeout=300).returncode == 0
    assert_consistent(tmp_path / "elsewhere")


def test_progress_bar_only_on_a_terminal(tmp_path, checkpoints):
    root = tmp_path / "r"
    for i in range(3):
        make_image(root / f"{i}.png", color=(i * 60, 0, 0))
    code, on_terminal = raw_terminal("index", str(root), "--index", str(tmp_path / "i"), "--model",
                                     str(checkpoints["embedder"]), columns=100, env=ENV, stream="stderr")
    assert code == 0 and "indexing" in on_terminal and "files/s" in on_terminal
    # a line says the model loads (a large one takes a while), on a line of its own above the bar
    loading = f"qvlsearch: loading the model {checkpoints['embedder']} on cpu"
    assert re.search(r"(\n|\r|\x1b\[2K)" + re.escape(loading), on_terminal), on_terminal
    piped = cli("index", str(root), "--index", str(tmp_path / "j"), "--model", str(checkpoints["embedder"]))
    assert "files/s" not in piped.stderr and piped.stderr.strip().startswith("indexed 3 files")
    assert "loading the model" not in piped.stderr


def test_worker_processes_index_the_same_vectors(tmp_path, corpus, options, embedder):
    threads = vectors_by_path(run_index(tmp_path / "t", [corpus], options, embedder).index_dir)
    in_processes = run_index(tmp_path / "p", [corpus], dataclasses.replace(options, processes=True, workers=2))
    assert in_processes.embedder.worker_processes is not None
    assert_consistent(in_processes.index_dir)
    got = vectors_by_path(in_processes.index_dir)
    assert got.keys() == threads.keys()
    for path, vector in threads.items():
        np.testing.assert_array_equal(got[path], vector)


def test_clean_up_deletes_only_files_the_index_wrote(tmp_path, checkpoints):
    root = tmp_path / "r"
    make_image(root / "a.png")
    index_dir = tmp_path / "i"
    base = ["index", str(root), "--index", str(index_dir), "--model", str(checkpoints["embedder"]), "--quiet"]
    assert cli(*base).returncode == 0
    theirs = {".nomedia": b"", "index-cover.jpg": b"a cover", "items-list.txt": b"a list", "vectors-2024.npz": b"v",
              "items-000001.parquet": b"looks like 0.1.0's", "seg-000001.parquet": b"looks like ours",
              "segments/seg-000001.parquet.bak": b"a backup", "segments/notes.txt": b"a note"}
    for name, data in theirs.items():
        (index_dir / name).write_bytes(data)
    (index_dir / ".thumbnails").mkdir()
    (index_dir / ".thumbnails" / "t.jpg").write_bytes(b"thumb")
    (index_dir / "segments" / "seg-000099.faiss").mkdir()  # a folder is never deleted, whatever its name
    (index_dir / "segments" / "seg-000098.npy").symlink_to(root / "a.png")  # nor a link
    leftovers = ["segments/seg-000042.parquet", "segments/.seg-000042.npy.tmp", ".manifest.json.tmp",
                 "items/.seg-000042.parquet.tmp"]
    for name in leftovers:  # what a writer killed in the middle of a commit leaves
        (index_dir / name).write_bytes(b"partial")
    make_image(root / "b.png", color=(1, 2, 3))
    result = cli(*base)
    assert result.returncode == 0, result.stderr
    assert {name: (index_dir / name).read_bytes() for name in theirs} == theirs
    assert (index_dir / ".thumbnails" / "t.jpg").read_bytes() == b"thumb"
    assert (index_dir / "segments" / "seg-000099.faiss").is_dir()
    assert (index_dir / "segments" / "seg-000098.npy").is_symlink() and (root / "a.png").exists()
    assert not [name for name in leftovers if (index_dir / name).exists()]
    assert assert_consistent(index_dir).manifest["counts"]["ok"] == 2


def test_a_new_index_goes_only_into_a_new_or_empty_folder(tmp_path, checkpoints):
    root = tmp_path / "r"
    make_image(root / "a.png")
    pictures = tmp_path / "Pictures"
    make_image(pictures / "cover.jpg")
    (pictures / ".nomedia").write_bytes(b"")
    before = sorted(p.name for p in pictures.iterdir())
    model = ["--model", str(checkpoints["embedder"])]
    refused = cli("index", str(root), "--index", str(pictures), *model)
    assert refused.returncode == 2 and refused.stderr.startswith(f"qvlsearch: --index {pictures} is not an index")
    assert len(refused.stderr.strip().splitlines()) == 1 and "new or empty folder" in refused.stderr
    assert sorted(p.name for p in pictures.iterdir()) == before  # not even a lock file
    a_file = cli("index", str(root), "--index", str(pictures / "cover.jpg"), *model)
    assert a_file.returncode == 2 and "is a file" in a_file.stderr and len(a_file.stderr.strip().splitlines()) == 1
    # an empty folder is fine, and so is what a first run killed before its first commit leaves
    started = tmp_path / "started"
    (started / "segments").mkdir(parents=True)
    for name in ("lock", "lock.pid", "segments/.seg-000001.npy.tmp", "segments/seg-000001.parquet"):
        (started / name).write_bytes(b"")
    assert cli("index", str(root), "--index", str(started), *model).returncode == 0
    assert sorted(p.name for p in started.iterdir()) == ["deleted", "items", "lock", "lock.pid", "manifest.json",
                                                         "segments"]
    segment = Snapshot(started).manifest["segments"][0]["name"]
    assert sorted(p.name for p in (started / "segments").iterdir()) == [f"{segment}.{ext}"
                                                                       for ext in ("faiss", "npy", "parquet", "words")]


def test_items_view_is_copied_where_hard_links_fail(tmp_path, corpus, options, embedder, monkeypatch):
    def no_hard_links(*args, **kwargs):  # as on exFAT or an SMB share
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    index_dir = tmp_path / "i"
    run_index(index_dir, [corpus / "notes"], options, embedder)
    run_index(index_dir, [corpus / "photos"], options, embedder)
    assert_consistent(index_dir)
    for view in (index_dir / "items").iterdir():
        assert view.stat().st_nlink == 1
        assert pq.read_table(view).equals(pq.read_table(index_dir / "segments" / view.name))


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The stderr of a run that failed as a usage or setup error must: exit 2, one `qvlsearch: ` line."""
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("qvlsearch: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_a_damaged_item_table_is_one_line(tmp_path, checkpoints):
    root = tmp_path / "r"
    make_image(root / "a.png")
    index_dir = tmp_path / "i"
    base = ["--index", str(index_dir)]
    assert cli("index", str(root), *base, "--model", str(checkpoints["embedder"])).returncode == 0
    table = index_dir / "segments" / f"{Snapshot(index_dir).manifest['segments'][0]['name']}.parquet"
    table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])  # a disk that lost the end of it
    for args in (["info"], ["search", "x"], ["index", str(root), "--model", str(checkpoints["embedder"])]):
        assert "cannot read the item table" in one_line_error(cli(*args, *base))


def test_bad_index_types_and_devices_fail_before_any_model_work(tmp_path, corpus, checkpoints):
    model = ["--model", str(checkpoints["embedder"])]
    bogus = cli("index", str(corpus), "--index", str(tmp_path / "i"), "--index-type", "Foo", *model)
    assert "--index-type" in one_line_error(bogus) and "Foo" in bogus.stderr
    assert not (tmp_path / "i" / "manifest.json").exists()
    no_pq = cli("index", str(corpus), "--index", str(tmp_path / "i"), "--index-type", "IVF4,PQ7", *model)
    assert "works at dim 64" in one_line_error(no_pq)
    for device in ("gpu", "cuda:9"):
        assert "device" in one_line_error(cli("index", str(corpus), "--index", str(tmp_path / "d"), "--device",
                                              device, *model))
    assert not (tmp_path / "d").exists()
    assert cli("index", str(corpus / "notes"), "--index", str(tmp_path / "i"), *model).returncode == 0
    generation = json.loads((tmp_path / "i" / "manifest.json").read_text())["generation"]
    assert "bogus" in one_line_error(cli("reindex", "--index", str(tmp_path / "i"), "--index-type", "bogus"))
    assert json.loads((tmp_path / "i" / "manifest.json").read_text())["generation"] == generation
    assert "no index at" in one_line_error(cli("reindex", "--index", str(tmp_path / "none")))
    assert not (tmp_path / "none").exists()


def test_a_file_root_is_that_file_and_a_folder_root_that_folder(tmp_path, options, embedder):
    root = tmp_path / "dir"
    for name in ("a.md", "a.md copy.md", "ab/c.md", "a/d.md"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"the note {name}\n")
    index_dir = tmp_path / "i"
    run_index(index_dir, [root], options, embedder)
    (root / "a.md").write_text("a.md, edited\n")
    (root / "a" / "d.md").unlink()
    again = run_index(index_dir, [root / "a.md"], options, embedder).summary
    assert (again.updated, again.removed) == (1, 0)
    again = run_index(index_dir, [root / "a"], options, embedder).summary  # "a/" is not "ab/" nor "a.md"
    assert (again.removed, again.total) == (1, 0)
    paths = sorted(os.path.relpath(r["path"], root) for r in assert_consistent(index_dir).rows.values())
    assert paths == ["a.md", "a.md copy.md", "ab/c.md"]


def test_a_folder_that_cannot_be_read_keeps_its_rows(tmp_path, checkpoints):
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to drop root's read-everything capability")
    root = tmp_path / "disk"
    make_image(root / "top.png")
    make_image(root / "sub" / "one.png", color=(9, 9, 9))
    make_image(root / "sub" / "two.png", color=(99, 9, 9))
    index_dir = tmp_path / "i"
    drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]
    args = [sys.executable, "-m", "qvlsearch", "index", str(root), "--index", str(index_dir), "--model",
            str(checkpoints["embedder"]), "--json"]
    assert subprocess.run(args, env=ENV, capture_output=True, timeout=300).returncode == 0
    everything = sorted(r["path"] for r in assert_consistent(index_dir).rows.values())
    try:
        for unreadable in (root / "sub", root):  # a sub-folder, then the root itself (say, a disk not mounted)
            unreadable.chmod(0)
            result = subprocess.run([*drop, *args], env=ENV, capture_output=True, text=True, timeout=300)
            unreadable.chmod(0o755)
            assert result.returncode == 0, result.stderr
            summary = json.loads(result.stdout)
            assert summary["removed"] == 0 and summary["failures"] == [
                {"path": str(unreadable), "error": "cannot read folder: permission denied"}]
            rows = assert_consistent(index_dir).rows.values()
            assert sorted(r["path"] for r in rows if r["status"] == "ok") == everything
    finally:
        for folder in (root, root / "sub"):
            folder.chmod(0o755)


def test_a_copy_reuses_the_vector_of_its_own_content(tmp_path, options, embedder):
    """Copy IMG.jpg to IMG_orig.jpg, then edit IMG.jpg: the copy must keep the original's vector."""

    class OneAtATime:
        """The real embedder, fed so that each file's vector is stored before the next file is looked at."""

        def embed_iter(self, items, batch_size=None):
            for index, item in enumerate(items):
                (result,) = embedder.embed_iter([item])
                yield dataclasses.replace(result, index=index)

    root = tmp_path / "photos"
    root.mkdir()
    shutil.copy(SAMPLE_DATA / "photos" / "cat.jpg", root / "IMG.jpg")
    index_dir = tmp_path / "i"
    run_index(index_dir, [root], options, embedder)
    before = vectors_by_path(index_dir)
    shutil.copy(root / "IMG.jpg", root / "IMG_orig.jpg")
    make_image(root / "IMG.jpg", size=(64, 48), color=(200, 30, 30))  # edited; "IMG.jpg" sorts before the copy
    indexer = run_index(index_dir, [root], options, OneAtATime())
    assert (indexer.summary.added, indexer.summary.updated, indexer.model_runs) == (1, 1, 1)
    assert_consistent(index_dir)
    after = vectors_by_path(index_dir)
    np.testing.assert_array_equal(after[str(root / "IMG_orig.jpg")], before[str(root / "IMG.jpg")])
    assert not np.array_equal(after[str(root / "IMG.jpg")], before[str(root / "IMG.jpg")])



def test_a_copy_of_a_file_that_became_an_error_row_keeps_the_old_content_vector(tmp_path, options, embedder):
    root = tmp_path / "photos"
    root.mkdir()
    shutil.copy(SAMPLE_DATA / "photos" / "bee.jpg", root / "BEE.jpg")
    index_dir = tmp_path / "i"
    run_index(index_dir, [root], options, embedder)
    before = vectors_by_path(index_dir)
    shutil.copy(root / "BEE.jpg", root / "BEE_copy.jpg")
    (root / "BEE.jpg").write_text("not an image any more\n")  # "BEE.jpg" sorts first: its error row comes first
    indexer = run_index(index_dir, [root], options)  # no embedder: nothing needs the model
    assert (indexer.summary.added, indexer.summary.failed, indexer.model_runs) == (1, 1, 0)
    assert_consistent(index_dir)
    after = vectors_by_path(index_dir)
    np.testing.assert_array_equal(after[str(root / "BEE_copy.jpg")], before[str(root / "BEE.jpg")])


def test_a_local_model_is_stored_as_its_resolved_path(tmp_path, checkpoints, options, embedder):
    model = checkpoints["embedder"]
    root = tmp_path / "r"
    make_image(root / "a.png")
    index = ["--index", str(tmp_path / "i")]
    assert cli("index", str(root), *index, "--model", f"./{model.name}", cwd=model.parent).returncode == 0
    assert json.loads((tmp_path / "i" / "manifest.json").read_text())["model"] == str(model.resolve())
    for spelled, cwd in ((model.name, model.parent), (str(model), tmp_path), (os.path.relpath(model, root), root)):
        again = cli("index", str(root), *index, "--model", spelled, "--json", cwd=cwd)
        assert again.returncode == 0 and json.loads(again.stdout)["unchanged"] == 1, again.stderr
    found = cli("search", "a photo", *index, "--paths", cwd=tmp_path)  # the model loads from another folder
    assert found.returncode == 0 and found.stdout == f"{root / 'a.png'}\n", found.stderr
    assert cli("search", "a photo", *index, "--model", f"./{model.name}", cwd=model.parent).returncode == 0
    # a pathlib.Path from Python is the same setting as its string
    run_index(tmp_path / "p", [root], dataclasses.replace(options, model=Path(model)), embedder)
    assert run_index(tmp_path / "p", [root], options, embedder).summary.unchanged == 1
    assert run_index(tmp_path / "p", [root], dataclasses.replace(options, model=Path(model))).summary.unchanged == 1


def test_binary_codes_need_a_dim_that_is_a_multiple_of_8_before_any_work(tmp_path, checkpoints):
    root = tmp_path / "r"
    make_image(root / "a.png")
    model = ["--model", str(checkpoints["embedder"])]
    refused = cli("index", str(root), "--index", str(tmp_path / "i"), "--quantize", "binary", "--dim", "36", *model)
    assert "--dim must be a multiple of 8 with binary quantization" in one_line_error(refused)
    assert not (tmp_path / "i").exists()
    assert cli("index", str(root), "--index", str(tmp_path / "i"), "--dim", "36", *model).returncode == 0
    assert cli("reindex", "--index", str(tmp_path / "b"), "--quantize", "binary").returncode == 2  # no index there
    generation = json.loads((tmp_path / "i" / "manifest.json").read_text())["generation"]
    for change in (["--quantize", "binary"], ["--quantize", "binary", "--dim", "44"]):
        refused = cli("reindex", "--index", str(tmp_path / "i"), *change)
        assert "multiple of 8" in one_line_error(refused)
    assert cli("reindex", "--index", str(tmp_path / "i"), "--quantize", "binary", "--dim", "40").returncode == 0
    assert "multiple of 8" in one_line_error(cli("reindex", "--index", str(tmp_path / "i"), "--dim", "36"))
    assert json.loads((tmp_path / "i" / "manifest.json").read_text())["generation"] == generation + 1


def test_an_index_folder_that_cannot_be_made_is_one_line_and_a_failed_first_run_leaves_nothing(tmp_path,
                                                                                              checkpoints):
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to drop root's write-everywhere capability")
    root = tmp_path / "r"
    make_image(root / "a.png")
    model = ["--model", str(checkpoints["embedder"])]
    (tmp_path / "a-file").write_text("")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]
    for folder, reason, user in ((tmp_path / "a-file" / "index", "Not a directory", []),
                                 (Path("/proc/qvlsearch-index"), "No such file or directory", []),
                                 (locked / "index", "Permission denied", drop)):
        result = subprocess.run([*user, sys.executable, "-m", "qvlsearch", "index", str(root), "--index", str(folder),
                                 *model], capture_output=True, text=True, env=ENV, timeout=300)
        assert one_line_error(result) == (f"qvlsearch: cannot create the index folder {folder}: {reason}; pass "
                                          "--index a folder you can write to\n")
    assert list(locked.iterdir()) == []
    # a first run that fails after taking the lock (no such model, an index type FAISS cannot build at this
    # width) takes away the folders it made, and in a folder that was there, the files
    missing_model = cli("index", str(root), "--index", str(tmp_path / "new" / "index"), "--model",
                        str(tmp_path / "no-model"))
    assert "cannot load model" in one_line_error(missing_model)
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "IVF4,PQ7" in one_line_error(cli("index", str(root), "--index", str(empty), "--index-type", "IVF4,PQ7",
                                            *model))
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize(("option", "value", "rule"), [
    ("--fps", "0", "a number above 0"), ("--max-frames", "1", "an integer of at least 2"),
    ("--max-frames", "0", "an integer of at least 2"),
    ("--moment-seconds", "-5", "0 (no moments) or a number of seconds of at least 1"),
    ("--max-pixels", "10", "an integer from 4096 to 16777216"),
    ("--min-pixels", "8192", "an integer from 1 to the largest image size (4096)"),
    ("--total-pixels", "1000", "an integer of at least 131072"), ("--max-pages", "0", "an integer of at least 1"),
    ("--dim", "16", "an integer of at least 32"), ("--commit-every", "0", "an integer of at least 1"),
])
def test_settings_out_of_range_are_refused_before_anything_is_written(tmp_path, checkpoints, option, value, rule):
    root = tmp_path / "r"
    make_image(root / "a.png")
    extra = ["--max-pixels", "4096"] if option == "--min-pixels" else []
    result = cli("index", str(root), "--index", str(tmp_path / "i"), option, value, *extra, "--model",
                 str(checkpoints["embedder"]))
    number = float(value) if option in ("--fps", "--moment-seconds") else int(value)
    assert one_line_error(result) == f"qvlsearch: {option} must be {rule}, got {number!r}\n"
    assert not (tmp_path / "i").exists()
