"""The segmented store: commits that cost what changed, tombstones, merging, sealing, readers during writes,
schema-1 upgrades, and faults (SIGKILL, a full disk, a damaged segment). Real Parquet, .npy and FAISS files."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from schema1 import write_schema1_index
from test_index import ENV, assert_consistent, cli, vectors_by_path

from qvlsearch.indexer import Indexer, IndexOptions
from qvlsearch.search import SearchIndex
from qvlsearch.store import Snapshot, Store, StoredVectors, StoreError, now, read_manifest, segments, writer
from qvlsearch.store.files import sync_view

SETTINGS = {"model": "synthetic", "model_revision": None, "dim": 32, "quantize": "none", "index_type": "flat",
            "instruction": "", "min_pixels": 0, "max_pixels": 0, "total_pixels": 0, "fps": 1.0, "max_frames": 1}


def add(store: Store, count: int, rng: np.random.Generator, full_dim: int = 32, root: str = "/x") -> list[int]:
    """`count` synthetic ok rows with random unit vectors; returns their ids."""
    ids = []
    for _ in range(count):
        vector = rng.normal(size=full_dim)
        item_id = store.new_id()
        ids.append(store.put({"id": item_id, "path": f"{root}/{item_id}.txt", "path_bytes": f"{root}/{item_id}.txt"
                              .encode(), "root": root, "kind": "text", "status": "ok", "indexed_at": now()},
                             vector / np.linalg.norm(vector)))
    return ids


def exact_search(index_dir: Path, query: np.ndarray, k: int) -> list[int]:
    """The true top k over the live stored vectors, by brute force."""
    snapshot = Snapshot(index_dir, with_index=False)
    ids = snapshot.items.filter(pc.equal(snapshot.items["status"], "ok"))["id"].to_numpy()
    vectors = StoredVectors(snapshot).get(ids)[:, : snapshot.manifest["dim"]]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return ids[np.argsort(-(vectors @ query[0]), kind="stable")[:k]].tolist()


def found(index_dir: Path, query: np.ndarray, k: int) -> list[int]:
    return SearchIndex(index_dir).raw_search(query, k)[1].tolist()


def test_many_small_commits_keep_few_segments_and_exact_results(tmp_path):
    store = Store.create(tmp_path / "i", SETTINGS, 32)
    rng = np.random.default_rng(0)
    for _ in range(250):
        add(store, 4, rng)
        store.commit()
    segment_rows = [s["rows"] for s in store.manifest["segments"]]
    assert sum(segment_rows) == 1000
    # ten segments of a tier merge into one of the next: at most 9 a tier (1-9, 10-99, 100-999, 1000+ rows)
    assert len(segment_rows) <= 4 * (writer.SEGMENTS_PER_TIER - 1)
    assert_consistent(tmp_path / "i")
    for _ in range(5):
        query = rng.normal(size=(1, 32)).astype(np.float32)
        query /= np.linalg.norm(query)
        assert found(tmp_path / "i", query, 10) == exact_search(tmp_path / "i", query, 10)


def test_deleted_rows_never_come_back_and_a_mostly_deleted_segment_is_rewritten(tmp_path):
    rng = np.random.default_rng(1)
    store = Store.create(tmp_path / "i", SETTINGS, 32)
    ids = add(store, 300, rng)
    store.commit()
    gone = set(rng.choice(ids, 100, replace=False).tolist())
    store.remove(gone)
    store.commit()
    assert store.manifest["segments"][0]["deleted"] == 100  # a tombstone file, nothing rewritten
    assert len(store.manifest["deletes"]) == 1
    for _ in range(5):
        query = rng.normal(size=(1, 32)).astype(np.float32)
        query /= np.linalg.norm(query)
        hits = found(tmp_path / "i", query, 300)
        assert len(hits) == 200 and not gone & set(hits)
        assert hits[:10] == exact_search(tmp_path / "i", query, 10)
    # the next writer's commit rewrites the segment (a third deleted > 20%) without the deleted rows
    store = Store.open(tmp_path / "i")
    add(store, 1, rng)
    store.commit()
    assert sorted(s["rows"] for s in store.manifest["segments"]) == [1, 200]
    assert all(s["deleted"] == 0 for s in store.manifest["segments"])
    assert_consistent(tmp_path / "i")


@pytest.mark.parametrize("index_type, sealed", [("hnsw", "HNSW32"), ("ivf", "IVF"), ("IVF4,SQ8", "IVF4,SQ8")])
def test_large_segments_are_sealed_with_the_index_type(tmp_path, monkeypatch, index_type, sealed):
    monkeypatch.setattr(segments, "SEAL_ROWS", 100)
    rng = np.random.default_rng(2)
    store = Store.create(tmp_path / "i", {**SETTINGS, "index_type": index_type}, 32)
    for count in (150, 120, 20):
        add(store, count, rng)
        store.commit()
    kinds = [s["index"] for s in store.manifest["segments"]]
    assert kinds[0].startswith(sealed) and kinds[1].startswith(sealed) and kinds[2] == "Flat"
    if "IVF" in sealed:  # one set of IVF lists, trained once, shared by every sealed segment
        assert store.manifest["trained"]["factory"] == kinds[0] == kinds[1]
    snapshot = assert_consistent(tmp_path / "i")
    assert snapshot.manifest["counts"]["ok"] == 290
    hits = 0
    for _ in range(10):
        query = rng.normal(size=(1, 32)).astype(np.float32)
        query /= np.linalg.norm(query)
        hits += len(set(found(tmp_path / "i", query, 5)) & set(exact_search(tmp_path / "i", query, 5)))
    assert hits >= 40  # approximate structures, on a small sample


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("texts") / "notes"
    words = ("cat", "dog", "boat", "lake", "tree", "cake", "camera", "chess", "bee", "flower", "city", "snow")
    rng = random.Random(0)
    for i in range(2000):
        folder = root / f"f{i // 200:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"note{i:04d}.txt").write_text(f"note {i}: " + " ".join(rng.choice(words) for _ in range(8)))
    return root


def folder_state(path: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_ino, p.stat().st_size) for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("quantize, index_type", [("none", "flat"), ("int8", "flat"), ("none", "hnsw")])
def test_adding_10_files_to_2000_writes_under_10_percent(tmp_path, texts, checkpoints, embedder, quantize,
                                                       index_type):
    corpus = tmp_path / "notes"
    shutil.copytree(texts, corpus)
    options = IndexOptions(model=str(checkpoints["embedder"]), quantize=quantize, index_type=index_type)
    Indexer(tmp_path / "i", options, embedder=embedder).run([corpus])
    before = folder_state(tmp_path / "i")
    for i in range(10):
        (corpus / f"new{i}.txt").write_text(f"a new note number {i} about a cat and a boat")
    summary = Indexer(tmp_path / "i", options, embedder=embedder).run([corpus])
    assert summary.added == 10 and summary.unchanged == 2000
    after = folder_state(tmp_path / "i")
    written = sum(size for p, (ino, size) in after.items() if before.get(p, (None, None))[0] != ino
                  and p.parent.name not in ("items", "deleted"))  # the view holds links, not bytes
    total = sum(size for p, (_, size) in after.items() if p.parent.name not in ("items", "deleted"))
    assert written <= 0.10 * total, (written, total)
    assert_consistent(tmp_path / "i")
    if quantize == "none" and index_type == "flat":  # exact: the same as an index built at once
        Indexer(tmp_path / "scratch", options, embedder=embedder).run([corpus])
        for query in ("a cat", "snow in the city", "note 17"):
            vector = embedder.embed([{"text": query}], dim=64)
            hits = {}
            for name in ("scratch", "i"):
                index = SearchIndex(tmp_path / name)
                scores, ids = index.raw_search(vector, 10)
                hits[name] = [(index.result(0, int(i), float(s)).path, float(s))
                              for s, i in zip(scores, ids, strict=True)]
            assert [p for p, _ in hits["i"]] == [p for p, _ in hits["scratch"]]
            np.testing.assert_allclose([s for _, s in hits["i"]], [s for _, s in hits["scratch"]], atol=1e-5)


def index_then_write_schema1(tmp_path: Path, corpus: Path, options: IndexOptions, embedder,
                             names: list[str]) -> None:
    """Index `corpus` into tmp_path/new, then write the same rows and vectors as 0.1.0 (schema 1) indexes
    tmp_path/NAME."""
    Indexer(tmp_path / "new", options, embedder=embedder).run([corpus])
    snapshot = Snapshot(tmp_path / "new")
    rows = snapshot.items.to_pylist()
    ok = [r["id"] for r in rows if r["status"] == "ok"]
    vectors = dict(zip(ok, StoredVectors(snapshot).get(np.array(ok)), strict=True))
    settings = {k: snapshot.manifest[k] for k in writer.SETTINGS_KEYS}
    for name in names:
        write_schema1_index(tmp_path / name, settings, snapshot.manifest["full_dim"], rows, vectors)


def test_a_schema1_index_is_read_then_upgraded_without_the_model(tmp_path, texts, checkpoints, embedder,
                                                                  monkeypatch):
    corpus = tmp_path / "notes"
    shutil.copytree(texts / "f00", corpus)
    options = IndexOptions(model=str(checkpoints["embedder"]))
    index_then_write_schema1(tmp_path, corpus, options, embedder, ["old"])
    query = embedder.embed([{"text": "a cat on a boat"}], dim=64)
    want = SearchIndex(tmp_path / "new").raw_search(query, 10)
    read = SearchIndex(tmp_path / "old").raw_search(query, 10)  # read as it is: one segment
    assert read[1].tolist() == want[1].tolist()
    monkeypatch.setattr(writer, "GRACE_SECONDS", 0.0)
    summary = Indexer(tmp_path / "old", options).run([corpus])  # no embedder: it must not need one
    assert summary.unchanged == 200 and summary.added == 0
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    assert manifest["schema_version"] == 2 and manifest["counts"]["ok"] == 200
    assert not list((tmp_path / "old").glob("items*.parquet")) and not list((tmp_path / "old").glob("*.npz"))
    upgraded, new = SearchIndex(tmp_path / "old"), SearchIndex(tmp_path / "new")
    hits = upgraded.raw_search(query, 10)  # ids differ: the run gave every row its date and place columns
    assert ([upgraded.result(0, int(i), 0).path for i in hits[1]]
            == [new.result(0, int(i), 0).path for i in want[1]])
    np.testing.assert_allclose(hits[0], want[0], atol=1e-6)
    assert_consistent(tmp_path / "old")


def test_a_schema1_index_takes_moments_after_the_upgrade(tmp_path, checkpoints, embedder):
    """0.1.0 had no moments: the upgraded index takes the default, or the value asked, for the videos to come."""
    from test_index import SAMPLE_DATA

    corpus = tmp_path / "notes"
    shutil.copytree(SAMPLE_DATA / "notes", corpus)
    options = IndexOptions(model=str(checkpoints["embedder"]))
    index_then_write_schema1(tmp_path, corpus, options, embedder, ["default", "asked"])
    shutil.copy(SAMPLE_DATA / "videos" / "red, then blue, then a moving checkerboard.mp4", corpus / "parts.mp4")  # 30 s
    Indexer(tmp_path / "default", options, embedder=embedder).run([corpus])
    asked = cli("index", str(corpus), "--index", str(tmp_path / "asked"), "--model", str(checkpoints["embedder"]),
                "--moment-seconds", "15")
    assert asked.returncode == 0, asked.stderr
    for name, seconds, moments in (("default", 10.0, 3), ("asked", 15.0, 2)):
        store = assert_consistent(tmp_path / name)
        assert store.manifest["schema_version"] == 2 and store.manifest["moment_seconds"] == seconds
        video = [r for r in store.rows.values() if r["path"].endswith("parts.mp4")]
        assert len(video) == 1 + moments and sum(r["start_s"] is not None for r in video) == moments
    refused = cli("index", str(corpus), "--index", str(tmp_path / "asked"), "--moment-seconds", "20")
    assert refused.returncode == 2 and "moment_seconds: index has 15.0, asked 20.0" in refused.stderr
    assert "reindex" not in refused.stderr  # it cannot change moments


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from qvlsearch.store import Store, writer, now
    writer.GRACE_SECONDS = float(sys.argv[2])
    path, rng = sys.argv[1], np.random.default_rng(int(sys.argv[3]))
    settings = {"model": "synthetic", "model_revision": None, "dim": 32, "quantize": "none", "index_type": "flat",
                "instruction": "", "min_pixels": 0, "max_pixels": 0, "total_pixels": 0, "fps": 1.0, "max_frames": 1}
    try:
        store = Store.open(path)
        store.tidy()
    except Exception:
        store = Store.create(path, settings, 32)
    for step in range(int(sys.argv[4])):
        for _ in range(int(sys.argv[5])):
            vector = rng.normal(size=32)
            item_id = store.new_id()
            store.put({"id": item_id, "path": f"/x/{item_id}", "path_bytes": b"/x/%d" % item_id, "root": "/x",
                       "kind": "text", "status": "ok", "indexed_at": now()}, vector / np.linalg.norm(vector))
        if step % 3 == 2:
            live = sorted(store.rows)
            store.remove(rng.choice(live, len(live) // 10, replace=False).tolist())
        store.commit()
        print("commit", store.manifest["generation"], flush=True)
    if len(sys.argv) > 6:
        store.optimize()
        print("optimized", flush=True)
""")


def test_readers_never_fail_while_the_writer_commits_and_merges(tmp_path):
    """Superseded files go at once here (no grace period): readers that lose the race open the new generation."""
    path = tmp_path / "i"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "0", "3", "400", "5"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    opened, failures, generations = 0, [], set()
    query = np.ones((1, 32), dtype=np.float32) / np.sqrt(32)
    while proc.poll() is None:
        if not (path / "manifest.json").exists():
            time.sleep(0.01)
            continue
        try:
            index = SearchIndex(path)
            counts = index.manifest["counts"]
            assert index.items.num_rows == counts["items"] and len(index) == counts["ok"]  # one whole generation
            scores, ids = index.raw_search(query, 10)
            assert len(ids) == min(10, counts["ok"]) and set(ids.tolist()) <= set(index.ids.tolist())
            opened += 1
            generations.add(index.manifest["generation"])
        except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
            failures.append(repr(exc))
    assert proc.returncode == 0, proc.stderr.read()
    assert not failures, failures[:3]
    assert opened > 50 and len(generations) > 20
    merged = Snapshot(path).manifest
    assert len(merged["segments"]) < 40 and merged["counts"]["ok"] == len(Snapshot(path))


@pytest.mark.parametrize("during", ["commits", "optimize"])
def test_sigkill_during_commits_and_merges_leaves_the_last_generation(tmp_path, during):
    path = tmp_path / "i"
    setup = subprocess.run([sys.executable, "-c", WRITER, str(path), "60", "1", "30", "300"], env=ENV,
                           capture_output=True, text=True)
    assert setup.returncode == 0, setup.stderr
    rng = random.Random(5)
    for attempt in range(3):
        args = ["40", "200"] if during == "commits" else ["1", "1", "optimize"]
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "60", str(attempt + 7), *args], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        proc.stdout.readline()  # a first commit happened: the kill lands within the work
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()  # SIGKILL; TerminateProcess on Windows
        proc.wait()
        assert_consistent(path, view=False)
    finish = subprocess.run([sys.executable, "-c", WRITER, str(path), "0", "99", "1", "1", "optimize"], env=ENV,
                            capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr
    snapshot = assert_consistent(path)
    assert len(snapshot.manifest["segments"]) == 1
    names = {p.name for p in (path / "segments").iterdir()}
    assert names == {f"{snapshot.manifest['segments'][0]['name']}.{ext}"
                     for ext in ("parquet", "npy", "faiss", "words")}


def test_a_full_disk_is_one_line_and_the_index_stays_at_its_last_commit(tmp_path, checkpoints, monkeypatch, capsys):
    from qvlsearch import cli as qvl_cli

    root = tmp_path / "notes"
    root.mkdir()
    (root / "a.txt").write_text("first note")
    args = ["qvlsearch", "index", str(root), "--index", str(tmp_path / "i"), "--model", str(checkpoints["embedder"])]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as done:
        qvl_cli.main()
    assert done.value.code == 0
    generation = Snapshot(tmp_path / "i").manifest["generation"]
    (root / "b.txt").write_text("second note")

    def disk_full(path, vectors):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(segments, "save_npy", disk_full)
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        qvl_cli.main()
    err = capsys.readouterr().err
    assert done.value.code == 2
    ours = [line for line in err.splitlines() if line.startswith("qvlsearch:")]
    assert len(ours) == 1 and "No space left on device" in ours[0] and "intact at its last commit" in ours[0]
    assert "Traceback" not in err
    assert Snapshot(tmp_path / "i").manifest["generation"] == generation
    assert not [p for p in (tmp_path / "i" / "segments").iterdir() if p.name.startswith(".")]  # no temporary left
    monkeypatch.undo()
    monkeypatch.setattr(sys, "argv", [*args, "--json"])
    with pytest.raises(SystemExit) as done:
        qvl_cli.main()
    assert done.value.code == 0 and json.loads(capsys.readouterr().out)["added"] == 1


def test_a_damaged_segment_is_named_then_dropped_by_optimize_and_embedded_again(tmp_path, checkpoints):
    root = tmp_path / "notes"
    root.mkdir()
    model = ["--model", str(checkpoints["embedder"])]
    for batch in range(2):
        for i in range(3):
            (root / f"n{batch}{i}.txt").write_text(f"note {batch} {i}")
        assert cli("index", str(root), "--index", str(tmp_path / "i"), *model).returncode == 0
    first = Snapshot(tmp_path / "i").manifest["segments"][0]["name"]
    (tmp_path / "i" / "segments" / f"{first}.parquet").write_bytes(b"PAR1 not really parquet")
    searched = cli("search", "note", "--index", str(tmp_path / "i"))
    assert searched.returncode == 2 and searched.stderr.count("\n") == 1
    assert f"{first}.parquet" in searched.stderr and "qvlsearch optimize" in searched.stderr
    optimized = cli("optimize", "--index", str(tmp_path / "i"))
    assert optimized.returncode == 0 and "dropped damaged segment" in optimized.stderr and first in optimized.stderr
    again = cli("index", str(root), "--index", str(tmp_path / "i"), *model, "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["added"] == 3
    assert len(vectors_by_path(tmp_path / "i")) == 6
    assert_consistent(tmp_path / "i")


def test_optimize_and_info_report_segments(tmp_path):
    rng = np.random.default_rng(4)
    store = Store.create(tmp_path / "i", SETTINGS, 32)
    for _ in range(3):
        add(store, 5, rng)
        store.commit()
    store.remove(list(store.rows)[:4])
    store.commit()
    info = json.loads(cli("info", "--index", str(tmp_path / "i"), "--json").stdout)
    assert [s["rows"] for s in info["segments"]] == [5, 5, 5] and sum(s["deleted"] for s in info["segments"]) == 4
    result = cli("optimize", "--index", str(tmp_path / "i"))
    assert result.returncode == 0 and "3 segments into 1, 4 deleted rows dropped" in result.stderr
    info = json.loads(cli("info", "--index", str(tmp_path / "i"), "--json").stdout)
    assert [(s["rows"], s["deleted"]) for s in info["segments"]] == [(11, 0)]
    assert info["manifest"]["counts"]["ok"] == 11


def test_a_store_error_is_raised_for_a_missing_index(tmp_path):
    with pytest.raises(StoreError, match="no index at"):
        Snapshot(tmp_path / "nothing")


def test_changes_across_segments_and_merges_end_as_a_fresh_index_would(tmp_path, checkpoints, embedder):
    """Commits of one file each: many segments and merges; then edits, deletes, moves and copies."""
    from make_media import make_image
    from test_index import SAMPLE_DATA

    corpus = tmp_path / "c"
    shutil.copytree(SAMPLE_DATA / "photos", corpus / "photos")
    shutil.copytree(SAMPLE_DATA / "notes", corpus / "notes")
    options = IndexOptions(model=str(checkpoints["embedder"]), commit_every=1)
    Indexer(tmp_path / "i", options, embedder=embedder).run([corpus])
    assert Snapshot(tmp_path / "i").manifest["generation"] > 20  # one commit a file, merges among them
    (corpus / "photos" / "cat.jpg").rename(corpus / "notes" / "cat moved.jpg")
    shutil.copy(corpus / "photos" / "bee.jpg", corpus / "bee copy.jpg")
    (corpus / "photos" / "cake.jpg").unlink()
    make_image(corpus / "photos" / "tree.webp", size=(80, 60), color=(10, 200, 10))
    (corpus / "notes" / "cats.txt").write_text("now about dogs")
    summary = Indexer(tmp_path / "i", options, embedder=embedder).run([corpus])
    assert (summary.moved, summary.added, summary.removed, summary.updated) == (1, 1, 1, 2)
    store = assert_consistent(tmp_path / "i")
    assert store.manifest["segments"] and sum(s["deleted"] for s in store.manifest["segments"]) >= 1
    Indexer(tmp_path / "fresh", options, embedder=embedder).run([corpus])
    got, want = vectors_by_path(tmp_path / "i"), vectors_by_path(tmp_path / "fresh")
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_allclose(got[path], want[path], atol=2e-3)  # float16, batched differently
    for query in ("a cat", "dogs"):
        vector = embedder.embed([{"text": query}], dim=64)
        a, b = SearchIndex(tmp_path / "i"), SearchIndex(tmp_path / "fresh")
        assert ([a.result(0, int(i), 0).path for i in a.raw_search(vector, 5)[1]]
                == [b.result(0, int(i), 0).path for i in b.raw_search(vector, 5)[1]])


def test_unchanged_files_do_not_cut_a_run_into_one_file_commits(tmp_path, checkpoints, embedder):
    root = tmp_path / "notes"
    root.mkdir()
    for i in range(12):
        (root / f"a{i:02d}.txt").write_text(f"note {i}")
    options = IndexOptions(model=str(checkpoints["embedder"]), commit_every=5)
    Indexer(tmp_path / "i", options, embedder=embedder).run([root])
    before = len(Snapshot(tmp_path / "i").manifest["segments"])
    for name in ("z1.txt", "z2.txt"):  # sorted after the 12 unchanged files
        (root / name).write_text(name)
    Indexer(tmp_path / "i", options, embedder=embedder).run([root])
    segments = Snapshot(tmp_path / "i").manifest["segments"]
    assert len(segments) == before + 1 and segments[-1]["rows"] == 2


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A filesystem of 4 MiB of its own, to fill up for real (tmpfs: mounting needs root, as here and in CI)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def fill(disk: Path, free: int) -> None:
    """Leave `free` bytes free on `disk` (a filler file takes the rest)."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    stat = os.statvfs(disk)
    filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - free))


MERGE = textwrap.dedent("""
    import sys, numpy as np
    from qvlsearch.store import Store, StoreError, now
    store, rng = Store.open(sys.argv[1]), np.random.default_rng(9)
    for _ in range(100):
        item_id, vector = store.new_id(), rng.normal(size=512)
        store.put({"id": item_id, "path": f"/x/{item_id}", "path_bytes": b"/x/%d" % item_id, "root": "/x",
                   "kind": "text", "status": "ok", "indexed_at": now()}, vector / np.linalg.norm(vector))
    try:
        store.commit()
    except StoreError as exc:
        sys.exit(f"qvlsearch: {exc}")
""")


@pytest.mark.parametrize("merge", ["optimize", "commit"])
def test_a_disk_that_fills_up_during_a_merge_is_one_line_and_the_next_run_is_fine(small_disk, merge):
    """The merged vectors (about 1 MB here) do not fit: an error, not a bus error (SIGBUS) from a memory map."""
    path = small_disk / "i"
    store = Store.create(path, SETTINGS, 512)
    rng = np.random.default_rng(8)
    for _ in range(9):  # nine segments of 100 rows: the tenth makes a merge
        add(store, 100, rng, full_dim=512)
        store.commit()
    generation = store.manifest["generation"]
    fill(small_disk, 400 * 1024)  # room for a segment of 100 rows, not for a merge of 900 or 1000
    if merge == "optimize":
        result = cli("optimize", "--index", str(path))
    else:
        result = subprocess.run([sys.executable, "-c", MERGE, str(path)], capture_output=True, text=True, env=ENV)
    assert result.returncode == (2 if merge == "optimize" else 1), (result.returncode, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("qvlsearch: cannot write to")
    assert "No space left on device" in result.stderr and "intact at its last commit" in result.stderr
    assert Snapshot(path).manifest["generation"] == generation
    assert not [p for p in (path / "segments").iterdir() if p.name.startswith(".")]  # no temporary file left
    (small_disk / "filler").unlink()
    if merge == "optimize":
        assert cli("optimize", "--index", str(path)).returncode == 0
    else:
        again = subprocess.run([sys.executable, "-c", MERGE, str(path)], capture_output=True, text=True, env=ENV)
        assert again.returncode == 0, again.stderr
    snapshot = assert_consistent(path)
    assert len(snapshot.manifest["segments"]) == 1
    assert snapshot.manifest["counts"]["ok"] == (900 if merge == "optimize" else 1000)


def readable(path: Path) -> bool:
    try:
        return segments.read_faiss(path, "none").ntotal >= 0
    except RuntimeError:
        return False


@pytest.mark.parametrize("rows, view", [(10, "links"), (300, "copies")])
def test_a_commit_on_a_disk_that_fills_up_switches_whole_or_not_at_all(small_disk, monkeypatch, caplog, rows, view):
    """With every amount of free space, page by page: a commit is a StoreError and the index at its last commit, or
    it is done; never a FAISS exception, a FAISS file that does not read back, or an error after the commit."""
    if view == "copies":  # a filesystem without hard links (exFAT, SMB): the view outside tools read is copies
        def no_links(source, target):
            raise OSError(errno.EPERM, os.strerror(errno.EPERM), str(source))

        monkeypatch.setattr(os, "link", no_links)
    path = small_disk / "i"
    store = Store.create(path, SETTINGS, 32)
    rng = np.random.default_rng(10)
    add(store, 50, rng)
    store.commit()
    generation = store.manifest["generation"]
    store.remove(list(store.rows)[:5])
    add(store, rows, rng)
    for pages in range(200):
        store.tidy()  # as the next run starts: the files of a failed commit go
        fill(small_disk, pages * 4096)
        try:
            store.commit()
            break
        except StoreError as exc:
            assert "intact at its last commit" in str(exc) and "\n" not in str(exc)
            assert read_manifest(path)["generation"] == generation
            assert all(readable(p) for p in (path / "segments").glob("seg-*.faiss"))
            assert_consistent(path)
    else:
        pytest.fail("the commit never fitted")
    assert store.manifest["generation"] == generation + 1 and pages > 3
    assert_consistent(path, view=view == "links")
    if view == "copies" and not view_in_step(path):  # the commit stood, its view did not fit: a warning said so
        assert [r for r in caplog.records if r.getMessage().startswith(f"could not tidy {path}: No space left")]
    (small_disk / "filler").unlink()
    store.tidy()
    snapshot = assert_consistent(path)
    assert snapshot.manifest["counts"]["ok"] == 45 + rows


def view_in_step(path: Path) -> bool:
    """The items/ and deleted/ folders outside tools read hold exactly the committed generation's files."""
    manifest = read_manifest(path)
    return ({p.name for p in (path / "items").glob("seg-*.parquet")} == {s["name"] + ".parquet"
                                                                         for s in manifest["segments"]}
            and {p.name for p in (path / "deleted").glob("del-*.parquet")} == set(manifest["deletes"]))


def test_a_view_that_does_not_fit_is_a_warning_and_the_next_tidy_catches_up(small_disk, monkeypatch, caplog):
    """Where the view is copies (no hard links) and the disk is full after a commit, the commit stands: tidying
    warns in one line instead of failing, and the next tidy with room brings the view in step."""
    def no_links(source, target):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), str(source))

    monkeypatch.setattr(os, "link", no_links)
    path = small_disk / "i"
    store = Store.create(path, SETTINGS, 32)
    add(store, 300, np.random.default_rng(12))
    store.commit()
    assert view_in_step(path)
    for copy in (path / "items").glob("seg-*.parquet"):  # as a writer killed between its manifest and its view
        copy.unlink()
    fill(small_disk, 0)
    store.tidy()
    warning = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"could not tidy {path}")]
    assert len(warning) == 1 and "No space left" in warning[0] and "\n" not in warning[0]
    assert not view_in_step(path)
    assert_consistent(path, view=False)
    (small_disk / "filler").unlink()
    store.tidy()
    assert view_in_step(path)
    assert assert_consistent(path).manifest["counts"]["ok"] == 300


@pytest.mark.parametrize("operation", ["commit", "optimize"])
def test_ctrl_c_while_the_manifest_and_view_switch_waits_for_both(tmp_path, monkeypatch, operation):
    """Ctrl-C that lands after the new manifest is written takes effect once this writer's state and the view
    outside tools read are in step with it: never a view one commit behind, never a writer that would write
    the same generation again."""
    path = tmp_path / "i"
    store = Store.create(path, SETTINGS, 32)
    add(store, 20, np.random.default_rng(13))
    store.commit()
    add(store, 5, np.random.default_rng(14))
    linked = []

    def sync_view_with_ctrl_c(*args):
        if not linked:
            signal.raise_signal(signal.SIGINT)  # as a terminal's Ctrl-C: a signal, handled between bytecodes
        linked.append(args)
        sync_view(*args)

    monkeypatch.setattr(writer, "sync_view", sync_view_with_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        getattr(store, operation)()
    assert len(linked) == 2  # the items view and the deleted view, both, before the KeyboardInterrupt
    assert view_in_step(path)
    assert store.manifest == read_manifest(path) and not store.dirty
    assert assert_consistent(path).manifest["counts"]["ok"] == 25


def test_optimize_and_rebuild_keep_out_the_rows_this_writer_deleted(tmp_path):
    rng = np.random.default_rng(11)
    store = Store.create(tmp_path / "i", SETTINGS, 32)
    ids = add(store, 20, rng)
    store.commit()
    store.remove(ids[:3])
    store.commit()
    store.optimize()
    assert Snapshot(tmp_path / "i").items["id"].to_pylist() == ids[3:]
    store.remove(ids[3:5])
    store.commit()
    store.rebuild(quantize="int8")
    assert_consistent(tmp_path / "i")
    snapshot = Snapshot(tmp_path / "i")
    assert snapshot.manifest["counts"]["ok"] == 15 and snapshot.items["id"].to_pylist() == ids[5:]


def test_a_slow_reader_reads_its_generation_after_a_merge_deleted_its_files(tmp_path, monkeypatch):
    """A search that loads its model for long reads metadata after a merge (no grace period here)."""
    monkeypatch.setattr(writer, "GRACE_SECONDS", 0.0)
    rng = np.random.default_rng(12)
    store = Store.create(tmp_path / "i", SETTINGS, 32)
    for _ in range(9):
        add(store, 3, rng)
        store.commit()
    snapshot, index = Snapshot(tmp_path / "i"), SearchIndex(tmp_path / "i")
    before = snapshot.columns(["path", "indexed_at"])
    store.remove(list(store.rows)[:2])
    add(store, 3, rng)
    store.commit()  # ten segments merge into one; the nine go at once
    assert len(store.manifest["segments"]) == 1
    assert not (tmp_path / "i" / "segments" / f"{snapshot.manifest['segments'][0]['name']}.parquet").exists()
    assert snapshot.columns(["path", "indexed_at"]).equals(before)
    assert index.metadata.num_rows == 27 and index.item_columns(["path"])["path"].equals(before["path"])


def test_a_server_follows_an_index_rebuilt_to_the_same_generation(tmp_path):
    from qvlsearch.server import ServedIndex

    rng = np.random.default_rng(13)

    def build(root: str) -> None:
        store = Store.create(tmp_path / "i", SETTINGS, 32)
        for _ in range(2):
            add(store, 3, rng, root=root)
            store.commit()

    build("/first")
    served = ServedIndex(SearchIndex(tmp_path / "i"))
    assert served.roots() == ["/first"]
    generation = served.index.manifest["generation"]
    shutil.rmtree(tmp_path / "i")
    build("/second")
    assert read_manifest(tmp_path / "i")["generation"] == generation
    with served.newest() as index:
        assert all(path.startswith("/second/") for path in index.items["path"].to_pylist())
    assert served.roots() == ["/second"]
