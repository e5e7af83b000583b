"""Date taken, GPS position and camera: read from real EXIF and container tags, stored at index time."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PHOTOS, SAMPLE_DATA
from make_media import make_photo, set_creation_time
from PIL import ExifTags, Image
from test_index import vectors_by_path

from qvlsearch.errors import InputError
from qvlsearch.indexer import METADATA_VERSION, Indexer, IndexOptions
from qvlsearch.metadata import exif_date, read_metadata
from qvlsearch.store import ITEM_SCHEMA, Store
from qvlsearch.store.segments import read_items

UTC = dt.timezone.utc
NOTHING = {"taken_at": None, "lat": None, "lon": None, "camera": None}
# mtimes: the dates of the files that carry none (the others' mtimes are later than any date here)
MODIFIED = {"future.jpg": dt.datetime(2020, 2, 2, tzinfo=UTC), "odd.jpg": dt.datetime(2023, 6, 1, tzinfo=UTC),
            "plain.jpg": dt.datetime(2018, 1, 1, tzinfo=UTC), "note.txt": dt.datetime(2017, 3, 3, tzinfo=UTC)}
TAKEN = {"sydney.jpg": dt.datetime(2021, 7, 14, 0, 30, tzinfo=UTC),
         "paris.jpg": dt.datetime(2019, 5, 1, 18, tzinfo=UTC), "clip.mp4": dt.datetime(2022, 3, 4, 5, 6, 7, tzinfo=UTC)}
DATES = {**MODIFIED, **TAKEN}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def album(tmp_path_factory) -> Path:
    """Photos with full, partial, odd and no EXIF; a video with a creation time; a text."""
    root = tmp_path_factory.mktemp("album")
    make_photo(root / "sydney.jpg", taken="2021:07:14 10:30:00", offset="+10:00", gps=(-33.8568, 151.2153),
               camera=("Canon", "Canon EOS R5"), source=PHOTOS / "cat.jpg")
    make_photo(root / "paris.jpg", taken="2019:05:01 18:00:00", gps=(48.8584, 2.2945), camera=("NIKON", "Z 6"),
               source=PHOTOS / "bee.jpg")
    make_photo(root / "future.jpg", taken="2999:01:01 00:00:00", camera=("", "Pixel 8"), source=PHOTOS / "cake.jpg")
    odd = Image.Exif()
    odd.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = 12  # a number, not a date
    odd.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.OffsetTimeOriginal] = "later"
    gps = odd.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitude] = (1.0, 2.0)  # two values, not three
    gps[ExifTags.GPS.GPSLongitude] = (500.0, 0.0, 0.0)
    Image.open(PHOTOS / "books.jpg").save(root / "odd.jpg", exif=odd)
    shutil.copy(PHOTOS / "camera.jpg", root / "plain.jpg")
    set_creation_time(SAMPLE_DATA / "videos" / "cat pan.mp4", root / "clip.mp4", "2022-03-04T05:06:07.000000Z",
                      location="+48.8577+002.2950/")
    (root / "note.txt").write_text("a note about cameras\n")
    for name, modified in MODIFIED.items():
        os.utime(root / name, (modified.timestamp(), modified.timestamp()))
    return root


def test_read_metadata_from_exif_and_container_tags(album, tmp_path):
    sydney = read_metadata(str(album / "sydney.jpg"), "image")
    assert sydney["taken_at"] == dt.datetime(2021, 7, 14, 0, 30, tzinfo=UTC)  # 10:30 at +10:00
    assert sydney["lat"] == pytest.approx(-33.8568, abs=1e-6) and sydney["lon"] == pytest.approx(151.2153, abs=1e-6)
    assert sydney["camera"] == "Canon EOS R5"  # the make is not repeated
    paris = read_metadata(str(album / "paris.jpg"), "image")
    assert paris["taken_at"] == dt.datetime(2019, 5, 1, 18, tzinfo=UTC)  # no offset: the camera's clock as UTC
    assert paris["camera"] == "NIKON Z 6"
    assert read_metadata(str(album / "future.jpg"), "image") == {**NOTHING, "camera": "Pixel 8"}
    assert read_metadata(str(album / "odd.jpg"), "image") == NOTHING
    assert read_metadata(str(album / "plain.jpg"), "image") == NOTHING
    clip = read_metadata(str(album / "clip.mp4"), "video")
    assert clip == {"taken_at": dt.datetime(2022, 3, 4, 5, 6, 7, tzinfo=UTC), "lat": 48.8577, "lon": 2.295,
                    "camera": None}
    assert read_metadata(str(album / "note.txt"), "text") == NOTHING
    assert read_metadata(str(SAMPLE_DATA / "broken" / "corrupt.jpg"), "image") == NOTHING
    assert read_metadata(str(album / "note.txt"), "video") == NOTHING  # not a container: empty, no error
    png = make_photo(tmp_path / "scan.png", taken="2020:01:02 03:04:05", camera=("Epson", "V600"))
    assert read_metadata(str(png), "image") == {**NOTHING, "taken_at": dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC),
                                                "camera": "Epson V600"}


def rows_by_name(store: Store) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in store.rows.values()}


def test_index_stores_metadata_and_odd_exif_fails_nothing(tmp_path, album, checkpoints, embedder):
    summary = Indexer(tmp_path / "i", IndexOptions(model=str(checkpoints["embedder"])), embedder=embedder).run([album])
    assert summary.failed == 0 and summary.added == 7
    rows = rows_by_name(Store.open(tmp_path / "i"))
    assert rows["sydney.jpg"]["taken_at"] == dt.datetime(2021, 7, 14, 0, 30, tzinfo=UTC)
    assert (rows["paris.jpg"]["lat"], rows["paris.jpg"]["camera"]) == (pytest.approx(48.8584, abs=1e-6), "NIKON Z 6")
    assert rows["clip.mp4"]["taken_at"] == dt.datetime(2022, 3, 4, 5, 6, 7, tzinfo=UTC)
    for name in ("odd.jpg", "plain.jpg", "note.txt"):
        assert {k: rows[name][k] for k in NOTHING} == NOTHING and rows[name]["status"] == "ok"


def test_an_older_index_gains_the_columns_on_its_next_run_without_the_model(tmp_path, album, checkpoints, embedder):
    options = IndexOptions(model=str(checkpoints["embedder"]))
    Indexer(tmp_path / "i", options, embedder=embedder).run([album])
    store = Store.open(tmp_path / "i")
    vectors = vectors_by_path(tmp_path / "i")
    for row in list(store.rows.values()):  # what an index written before the columns existed holds
        store.put({**row, **NOTHING}, store.vector(row["id"]))
    store.manifest.pop("metadata_version")
    store.commit()
    assert all(r["taken_at"] is None for r in Store.open(tmp_path / "i").rows.values())
    before = store.manifest["generation"]

    # no embedder: it would load the model if it needed one; every 2 files a commit, not all rows held at once
    again = Indexer(tmp_path / "i", dataclasses.replace(options, commit_every=2))
    summary = again.run([album / "sydney.jpg"])  # one root of several: the other files are read too
    assert again.embedder is None and again.model_runs == 0 and summary.unchanged == 1
    store = Store.open(tmp_path / "i")
    rows = rows_by_name(store)
    assert rows["sydney.jpg"]["camera"] == "Canon EOS R5" and rows["paris.jpg"]["camera"] == "NIKON Z 6"
    assert rows["clip.mp4"]["lat"] == 48.8577
    assert vectors_by_path(tmp_path / "i").keys() == vectors.keys()
    for path, vector in vectors_by_path(tmp_path / "i").items():
        np.testing.assert_array_equal(vector, vectors[path])
    assert store.manifest["metadata_version"] == METADATA_VERSION
    generation = store.manifest["generation"]
    assert generation >= before + 3  # committed as it went (the album's 6 files)
    Indexer(tmp_path / "i", options).run([album])  # marked: not read again
    assert Store.open(tmp_path / "i").manifest["generation"] == generation


def test_an_item_table_without_the_new_columns_reads_them_as_nulls(tmp_path):
    old_schema = pa.schema([f for f in ITEM_SCHEMA if f.name not in NOTHING])
    row = {"id": 1, "path": "/a.jpg", "path_bytes": b"/a.jpg", "root": "/", "kind": "image", "size": 1,
           "mtime_ns": 1, "status": "ok"}
    pq.write_table(pa.Table.from_pylist([row], schema=old_schema), tmp_path / "old.parquet")
    table = read_items(tmp_path / "old.parquet")
    assert table.schema == ITEM_SCHEMA
    assert {k: table.to_pylist()[0][k] for k in NOTHING} == NOTHING
    assert read_items(tmp_path / "old.parquet", ["id", "camera"]).to_pylist() == [{"id": 1, "camera": None}]


@pytest.fixture(scope="module")
def album_index(tmp_path_factory, album, checkpoints, embedder):
    from qvlsearch.search import SearchIndex

    path = tmp_path_factory.mktemp("album-index") / "index"
    Indexer(path, IndexOptions(model=str(checkpoints["embedder"])), embedder=embedder).run([album])
    return SearchIndex(path, embedder=embedder)


def names(results) -> list[str]:
    return [Path(r.path).name for r in results]


def test_date_filters_use_the_date_taken_else_the_mtime(album_index):
    search = album_index.search
    assert sorted(names(search("x", k=10, after="2020-01-01"))) == ["clip.mp4", "future.jpg", "odd.jpg",
                                                                     "sydney.jpg"]
    assert sorted(names(search("x", k=10, before="2020-01-01"))) == ["note.txt", "paris.jpg", "plain.jpg"]
    assert names(search("x", k=10, after="2021-07-14T00:30:00Z", before=dt.date(2022, 1, 1))) == ["sydney.jpg"]
    assert names(search("x", k=10, after="2021-07-14T02:30:01+02:00", before="2022-01-01")) == []
    two = search("x", k=2, after="2020-01-01")  # the filter applies before the cut: still k hits
    assert len(two) == 2 and set(names(two)) <= {"clip.mp4", "future.jpg", "odd.jpg", "sydney.jpg"}


def test_place_and_camera_filters(album_index):
    search = album_index.search
    assert sorted(names(search("x", k=10, near="48.8584,2.2945,5"))) == ["clip.mp4", "paris.jpg"]
    assert names(search("x", k=10, near=(-33.86, 151.21, 1))) == ["sydney.jpg"]
    assert names(search("x", k=10, near="0,0,1000")) == []  # no file without a position is ever near
    assert names(search("x", k=10, camera="canon")) == ["sydney.jpg"]
    assert names(search("x", k=10, camera="Z 6", near="48.8584,2.2945,5", kind="image")) == ["paris.jpg"]
    assert names(search("x", k=10, camera="pixel")) == ["future.jpg"]


def test_sort_by_date_orders_the_same_hits_newest_first(album_index):
    by_score = album_index.search("a cat", k=5, mode="semantic")  # ranked by score, which --min-score cuts
    by_date = album_index.search("a cat", k=5, sort="date", mode="semantic")
    assert sorted(names(by_date)) == sorted(names(by_score)) and [r.rank for r in by_date] == [1, 2, 3, 4, 5]
    assert names(by_date) == sorted(names(by_score), key=lambda name: DATES[name], reverse=True)
    cut = by_score[2].score  # --min-score applies first, then the date order
    assert names(album_index.search("a cat", k=5, min_score=cut, sort="date", mode="semantic")) == sorted(
        names(by_score[:3]), key=lambda name: DATES[name], reverse=True)


def test_json_records_gain_date_place_and_camera_only_when_known(album_index):
    records = {Path(r.path).name: r.to_json() for r in album_index.search("x", k=10)}
    sydney = records["sydney.jpg"]
    assert list(sydney) == ["rank", "path", "kind", "score", "id", "taken_at", "lat", "lon", "camera"]
    assert sydney["taken_at"] == "2021-07-14T00:30:00+00:00" and sydney["camera"] == "Canon EOS R5"
    assert list(records["plain.jpg"]) == ["rank", "path", "kind", "score", "id"]
    assert list(records["clip.mp4"]) == ["rank", "path", "kind", "score", "id", "duration_s", "taken_at", "lat", "lon"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qvlsearch", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def test_cli_filters_and_malformed_values(album_index):
    base = ["search", "anything", "--index", str(album_index.path), "--jsonl"]
    found = cli(*base, "--camera", "nikon", "--after", "2019-05-01", "--before", "2019-05-02", "--sort", "date")
    assert found.returncode == 0, found.stderr
    [record] = [json.loads(line) for line in found.stdout.splitlines()]
    assert Path(record["path"]).name == "paris.jpg" and record["taken_at"] == "2019-05-01T18:00:00+00:00"
    assert cli(*base, "--near", "10,10,1").returncode == 1  # nothing there
    for option, value, example in (("--after", "2024-13-01", "2024-05-31"), ("--before", "last week", "2024-05-31"),
                                   ("--near", "48.85,2.29", "48.8584,2.2945,5"), ("--near", "95,0,1", "48.8584"),
                                   ("--sort", "size", "score, date")):
        bad = cli(*base, option, value)
        assert bad.returncode == 2 and example in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_a_bad_offset_or_date_costs_only_that_field(tmp_path):
    """An offset that is none is ignored (the clock as UTC, as without one); GPS and camera stay."""
    full = {"taken": "2021:07:14 10:30:00", "gps": (-33.8568, 151.2153), "camera": ("Canon", "Canon EOS R5")}
    for offset, taken in (("+24:00", dt.datetime(2021, 7, 14, 10, 30)), ("+10:60", dt.datetime(2021, 7, 14, 10, 30)),
                          ("-15:00", dt.datetime(2021, 7, 14, 10, 30)), ("+05:45", dt.datetime(2021, 7, 14, 4, 45)),
                          ("-12:00", dt.datetime(2021, 7, 14, 22, 30))):
        found = read_metadata(str(make_photo(tmp_path / "photo.jpg", offset=offset, **full)), "image")
        assert found["taken_at"] == taken.replace(tzinfo=UTC), offset
        assert found["camera"] == "Canon EOS R5" and found["lat"] == pytest.approx(-33.8568, abs=1e-6), offset
    ancient = make_photo(tmp_path / "ancient.jpg", **{**full, "taken": "0001:01:01 00:30:00"}, offset="+01:00")
    found = read_metadata(str(ancient), "image")
    assert found["taken_at"] is None and found["camera"] == "Canon EOS R5" and found["lon"] is not None


def test_the_fraction_of_a_second_is_read_beside_the_date():
    """SubSecTimeOriginal, as phones write it for burst frames: digits of a fraction; anything else is ignored."""
    for fraction, microsecond in (("35", 350000), ("007", 7000), ("1234567", 123456), ("", 0), ("x1", 0),
                                  ("٣", 0), (None, 0), (b"35", 0)):
        when = exif_date("2023:08:01 12:00:00", "+02:00", fraction)
        assert when == dt.datetime(2023, 8, 1, 10, 0, 0, microsecond, tzinfo=UTC), fraction


def test_dates_at_the_ends_of_the_calendar_and_text_that_is_not_utf8(album_index):
    everything = sorted(names(album_index.search("x", k=10)))
    assert sorted(names(album_index.search("x", k=10, after="0001-01-01T00:00+01:00"))) == everything
    assert sorted(names(album_index.search("x", k=10, before="9999-12-31T23:00-05:00"))) == everything
    assert names(album_index.search("x", k=10, after="9999-12-31T23:00-05:00")) == []
    for option, value in (("camera", "Canon\ud800"), ("under", "/photos/\ud800")):
        with pytest.raises(InputError, match=f"--{option}: .* lone surrogate"):
            album_index.search("x", **{option: value})
    base = ["search", "anything", "--index", str(album_index.path), "--jsonl"]
    assert cli(*base, "--after", "0001-01-01T00:00+01:00").returncode == 0
    assert cli(*base, "--before", "9999-12-31T23:00-05:00").returncode == 0
    bad = cli(*base, "--camera", "Canon\udcff")  # a byte that is not UTF-8 on the command line
    assert bad.returncode == 2 and "--camera" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
