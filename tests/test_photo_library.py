"""A phone's and a camera's library: Live Photos, RAW+JPEG pairs, Takeout and XMP sidecars, bursts apart
from copies. Every file is made here (PyAV, Pillow), indexed with the tiny model."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PHOTOS
from make_media import apple_makernote, make_burst, make_live_video, make_photo, make_still
from PIL import Image
from test_index import vectors_by_path
from typer.testing import CliRunner

from qvlsearch.cli import app
from qvlsearch.companions import makernote_identifier, related_paths
from qvlsearch.dupes import find_duplicates
from qvlsearch.indexer import Indexer, IndexOptions
from qvlsearch.search import SearchIndex
from qvlsearch.sidecars import SidecarError, SidecarFolder, read_sidecar, sidecar_names, xmp_degrees
from qvlsearch.store.reader import Snapshot
from qvlsearch.tables import print_results

UTC = dt.timezone.utc
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
TINY_THRESHOLD = 0.8  # what the tiny checkpoint's cosine of a burst's frames and of a resized copy pass
XMP_TEMPLATE = """<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:exif="http://ns.adobe.com/exif/1.0/"
    xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/"
    exif:DateTimeOriginal="{taken}" exif:GPSLatitude="51,30.5N" exif:GPSLongitude="0,7.5W">
   <dc:description><rdf:Alt><rdf:li xml:lang="x-default">Tower Bridge at dusk</rdf:li></rdf:Alt></dc:description>
   <dc:subject><rdf:Bag><rdf:li>london</rdf:li><rdf:li>bridge</rdf:li></rdf:Bag></dc:subject>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>"""
BOMB = """<?xml version="1.0"?>
<!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
 <!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">
 <!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;">]>
<x:xmpmeta xmlns:x="adobe:ns:meta/">&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;</x:xmpmeta>"""
def write_xmp(path: Path, taken: str) -> Path:
    path.write_text(XMP_TEMPLATE.format(taken=taken))
    return path


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """A phone's export: Live Photos (a pair, and a still and video whose identifiers differ), a RAW+JPEG pair,
    Takeout JSON in its name forms, an XMP sidecar, an XML bomb, and a burst beside a copy."""
    root = tmp_path_factory.mktemp("phone")
    make_still(root / "IMG_0001.JPG", PHOTOS / "cat.jpg", makernote_id="5C4B-LIVE")
    make_live_video(root / "IMG_0001.MOV", "5C4B-LIVE")
    make_still(root / "IMG_0002.jpg", PHOTOS / "bee.jpg", xmp_id="AAAA-1111")
    make_live_video(root / "IMG_0002.mov", "BBBB-2222")  # another capture's video: two items
    make_photo(root / "DSC_0003.JPG", taken="2022:02:02 10:00:00", source=PHOTOS / "books.jpg")
    (root / "DSC_0003.dng").write_bytes(b"II*\x00" + bytes(256))  # the RAW: named beside the JPEG, never read
    takeout = {"photoTakenTime": {"timestamp": "1431000000"}, "geoData": {"latitude": 48.8584, "longitude": 2.2945},
               "geoDataExif": {"latitude": 0.0, "longitude": 0.0}, "description": "Eiffel tower"}
    shutil.copy(PHOTOS / "camera.jpg", root / "IMG_1234.jpg")
    (root / "IMG_1234.jp.json").write_text(json.dumps(takeout))  # a name Takeout cut short
    long_name = "Holiday in the mountains with the whole family.jpg"
    shutil.copy(PHOTOS / "bee.jpg", root / long_name)
    (root / (long_name[:41] + ".json")).write_text(json.dumps({  # cut to 46 characters, ".json" included
        "photoTakenTime": {"timestamp": "1262304000"}, "geoData": {"latitude": 0.0, "longitude": 0.0},
        "geoDataExif": {"latitude": 46.55, "longitude": 7.98}}))
    Image.open(PHOTOS / "tree.webp").save(root / "tree.webp")  # without its EXIF
    make_photo(root / "own.jpg", taken="2019:05:01 18:00:00", source=PHOTOS / "cat.jpg")
    (root / "own.jpg.json").write_text(json.dumps({"photoTakenTime": {"timestamp": "946684800"}}))  # the file wins
    (root / "tree.webp.supplemental-metadata.json").write_text(json.dumps({"photoTakenTime": {
        "timestamp": "946684800"}}))
    shutil.copy(PHOTOS / "cake.jpg", root / "PXL_5-edited.jpg")
    (root / "PXL_5.jpg.json").write_text(json.dumps({"photoTakenTime": {"timestamp": "1600000000"}}))
    shutil.copy(PHOTOS / "camera lens.jpg", root / "lightroom.jpg")
    write_xmp(root / "lightroom.xmp", "2020-06-01T20:30:00+01:00")
    shutil.copy(PHOTOS / "books.jpg", root / "bomb.jpg")
    (root / "bomb.jpg.xmp").write_text(BOMB)
    (root / "burst").mkdir()
    make_burst(root / "burst", PHOTOS / "cake.jpg", within_a_second=True)
    return root


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, library, checkpoints, embedder):
    path = tmp_path_factory.mktemp("phone-index") / "index"
    summary = Indexer(path, IndexOptions(model=str(checkpoints["embedder"]), moment_seconds=1),
                      embedder=embedder).run([library])
    return path, summary, SearchIndex(path, embedder=embedder)


def rows_by_name(index_dir: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for row in Snapshot(index_dir, with_index=False).items.to_pylist():
        rows.setdefault(Path(row["path"]).name, []).append(row)
    return rows


def test_a_live_photo_is_one_item_that_names_its_video(indexed, library, capsys):
    path, summary, index = indexed
    rows = rows_by_name(path)
    assert "IMG_0001.MOV" not in rows  # no row of its own: no hit, no moments
    assert [r["live_video"] for r in rows["IMG_0001.JPG"]] == [str(library / "IMG_0001.MOV")]
    hits = {Path(r.path).name: r for r in index.search("a cat", k=100)}
    assert "IMG_0001.MOV" not in hits
    assert hits["IMG_0001.JPG"].to_json()["live_video"] == str(library / "IMG_0001.MOV")
    print_results([hits["IMG_0001.JPG"].to_json(), hits["IMG_0002.jpg"].to_json()])
    table = capsys.readouterr().out.splitlines()
    assert "live IMG_0001.MOV" in table[1] and "live" not in table[2]


def test_a_still_and_a_video_of_other_captures_are_two_items(indexed):
    rows = rows_by_name(indexed[0])
    assert rows["IMG_0002.jpg"][0]["live_video"] is None
    assert len(rows["IMG_0002.mov"]) > 1  # the whole video and its moments
    assert all(r["status"] == "ok" for r in rows["IMG_0002.mov"])


def test_a_raw_and_jpeg_pair_is_the_jpeg_naming_the_raw(indexed, library):
    rows = rows_by_name(indexed[0])
    assert "DSC_0003.dng" not in rows
    assert [(r["status"], r["raw_file"]) for r in rows["DSC_0003.JPG"]] == [("ok", str(library / "DSC_0003.dng"))]
    assert not [name for name in rows if name.endswith((".json", ".xmp"))]  # sidecars are never items


def test_takeout_and_xmp_sidecars_give_dates_places_and_words(indexed):
    index = indexed[2]

    def names(**filters) -> set[str]:
        return {Path(r.path).name for r in index.search("x", k=100, **filters)}

    assert names(after="2015-05-07", before="2015-05-08") == {"IMG_1234.jpg"}  # Takeout's photoTakenTime
    assert "IMG_1234.jpg" in names(near="48.8584,2.2945,1")  # geoData (its geoDataExif 0,0 means none)
    assert names(after="2010-01-01T00:00Z", before="2010-01-01T00:00:01Z") == {
        "Holiday in the mountains with the whole family.jpg"}  # a name cut to 46 characters
    assert names(near="46.55,7.98,1") == {"Holiday in the mountains with the whole family.jpg"}  # geoDataExif
    assert names(before="2000-01-02") == {"tree.webp"}  # the supplemental-metadata form; own.jpg has its own date
    assert names(after="2020-09-13", before="2020-09-14") == {"PXL_5-edited.jpg"}  # the original's JSON
    assert names(after="2020-06-01T19:30Z", before="2020-06-01T19:30:01Z") == {"lightroom.jpg"}  # XMP, +01:00
    assert names(near="51.5083,-0.125,1") == {"lightroom.jpg"}  # 51,30.5N 0,7.5W
    lightroom = next(r for r in index.search("x", k=100) if r.path.endswith("lightroom.jpg")).to_json()
    assert (lightroom["description"], lightroom["keywords"]) == ("Tower Bridge at dusk", ["london", "bridge"])
    takeout = next(r for r in index.search("x", k=100) if r.path.endswith("IMG_1234.jpg")).to_json()
    assert takeout["description"] == "Eiffel tower"


def test_an_xml_bomb_sidecar_is_refused_in_one_line(indexed, library):
    _, summary, index = indexed
    warnings = [(Path(p).name, w) for p, w in summary.warnings]
    assert [w for name, w in warnings if name == "bomb.jpg"] == [
        "sidecar bomb.jpg.xmp refused: it declares a DTD or entities, which XMP never needs (an XML bomb guard); "
        "remove the DOCTYPE"]
    assert rows_by_name(indexed[0])["bomb.jpg"][0]["status"] == "ok"  # the photo is indexed all the same


def test_a_sidecar_named_alone_indexes_its_photo_or_says_why_not(tmp_path, library, checkpoints, embedder):
    """`qvlsearch index IMG_1234.jp.json` indexes the photo it belongs to; a sidecar with no photo beside it is
    a line naming it, not silence."""
    options = IndexOptions(model=str(checkpoints["embedder"]))
    named = Indexer(tmp_path / "i", options, embedder=embedder).run([library / "IMG_1234.jp.json"])
    assert (named.added, named.warnings) == (1, [])
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(library / "IMG_1234.jp.json", lone / "IMG_9999.jpg.json")
    alone = Indexer(tmp_path / "j", options, embedder=embedder).run([lone / "IMG_9999.jpg.json"])
    assert alone.total == 0 and alone.warnings == [
        (str(lone / "IMG_9999.jpg.json"), "a sidecar with no photo beside it (same name): nothing to index; name the "
                                          "photo or its folder")]


def test_a_burst_is_similar_and_a_reencoded_copy_is_near(indexed, library):
    # the tiny model's random weights place a resized copy further off than a real model does: a lower threshold
    groups = find_duplicates(indexed[2], TINY_THRESHOLD, under=library / "burst")
    kinds = {g.type: sorted(Path(m.path).name for m in g.members) for g in groups}
    assert kinds == {"near": ["burst_1 copy.jpg", "burst_1.jpg"],
                     "similar": ["burst_1.jpg", "burst_2.jpg", "burst_3.jpg"]}
    cli = [sys.executable, "-m", "qvlsearch", "dupes", "--index", str(indexed[0]), "--under", str(library / "burst"),
           "--threshold", str(TINY_THRESHOLD)]
    listed = subprocess.run([*cli, "--paths"], capture_output=True, text=True, env=ENV, check=True)
    assert listed.stdout.splitlines() == [str(library / "burst" / "burst_1 copy.jpg")]  # the copy only
    both = CliRunner().invoke(app, [*cli[3:], "--paths", "--similar"])  # in this process: no torch import again
    similar = next(g for g in groups if g.type == "similar")
    assert sorted(both.stdout.splitlines()) == sorted([listed.stdout.strip(), *(m.path for m in similar.members[1:])])
    records = json.loads(CliRunner().invoke(app, [*cli[3:], "--json"]).stdout)
    assert [(g["type"], len(g["members"])) for g in records] == [("near", 2), ("similar", 3)]


def test_a_changed_sidecar_or_companion_updates_the_metadata_without_the_model(tmp_path, checkpoints, embedder):
    root = tmp_path / "phone"
    root.mkdir()
    make_still(root / "IMG_0007.jpg", PHOTOS / "cat.jpg", makernote_id="77")
    make_live_video(root / "IMG_0007.mov", "77")
    shutil.copy(PHOTOS / "camera lens.jpg", root / "lightroom.jpg")
    xmp = write_xmp(root / "lightroom.jpg.xmp", "2020-06-01T20:30:00")
    index_dir, options = tmp_path / "index", IndexOptions(model=str(checkpoints["embedder"]), moment_seconds=1)
    Indexer(index_dir, options, embedder=embedder).run([root])
    vectors = vectors_by_path(index_dir)

    def rerun() -> Indexer:
        indexer = Indexer(index_dir, options, embedder=embedder)
        indexer.run([root])
        return indexer

    write_xmp(xmp, "2021-01-02T03:04:05Z")
    os.utime(xmp, ns=(xmp.stat().st_mtime_ns + 10**9,) * 2)
    indexer = rerun()
    assert (indexer.model_runs, indexer.summary.updated) == (0, 1)
    assert rows_by_name(index_dir)["lightroom.jpg"][0]["taken_at"] == dt.datetime(2021, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert {p: v.tobytes() for p, v in vectors_by_path(index_dir).items()} == {
        p: v.tobytes() for p, v in vectors.items()}  # the same vectors, none added

    (root / "IMG_0007.mov").unlink()  # the still loses its motion part
    indexer = rerun()
    assert (indexer.model_runs, indexer.summary.updated, indexer.summary.removed) == (0, 1, 0)
    assert rows_by_name(index_dir)["IMG_0007.jpg"][0]["live_video"] is None

    make_live_video(root / "IMG_0007.mov", "77")
    assert rerun().model_runs == 0  # paired again: named, not embedded
    assert rows_by_name(index_dir)["IMG_0007.jpg"][0]["live_video"] == str(root / "IMG_0007.mov")
    (root / "IMG_0007.jpg").unlink()  # the still goes: the video is a video of its own
    indexer = rerun()
    rows = rows_by_name(index_dir)
    assert "IMG_0007.jpg" not in rows and len(rows["IMG_0007.mov"]) > 1  # the video and its moments
    assert (indexer.summary.added, indexer.summary.removed) == (1, 1)


def test_sidecar_names_in_every_form():
    folder = SidecarFolder.of(["IMG_1234.jp.json", "IMG_5.JPG.XMP", "IMG_5.CR2.xmp", "IMG_7.jpg(1).json",
                               "PXL_9.jpg.supplemental-metad.json", "DSC_1.json", "DSC_10.jpg.json"])
    assert sidecar_names("IMG_1234.jpg", folder) == ["IMG_1234.jp.json"]
    assert sidecar_names("IMG_1234-edited.jpg", folder) == ["IMG_1234.jp.json"]
    assert sidecar_names("IMG_5.jpg", folder, ["IMG_5.CR2"]) == ["IMG_5.JPG.XMP", "IMG_5.CR2.xmp"]
    assert sidecar_names("PXL_9.jpg", folder) == ["PXL_9.jpg.supplemental-metad.json"]
    assert sidecar_names("IMG_7(1).jpg", folder) == ["IMG_7.jpg(1).json"]
    assert sidecar_names("DSC_1.jpg", folder) == ["DSC_1.json"]  # not DSC_10's
    assert sidecar_names("DSC_1.jp", folder) == ["DSC_1.json"]
    assert sidecar_names("IMG_12.jpg", folder) == []  # IMG_1234's is no cut of this name


def test_xmp_coordinates_and_a_bomb_refused(tmp_path):
    assert xmp_degrees("51,30.5N", "NS", 90) == pytest.approx(51.508333)
    assert xmp_degrees("0,7,30W", "EW", 180) == pytest.approx(-0.125)
    assert xmp_degrees("51,30.5E", "NS", 90) is None and xmp_degrees("200,0E", "EW", 180) is None
    (tmp_path / "a.xmp").write_text(BOMB)
    with pytest.raises(SidecarError, match="^sidecar a.xmp refused"):
        read_sidecar(str(tmp_path / "a.xmp"))
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(SidecarError, match="^sidecar b.json ignored: not JSON"):
        read_sidecar(str(tmp_path / "b.json"))


def test_apple_makernote_identifier():
    assert makernote_identifier(apple_makernote("5C4B-LIVE")) == "5C4B-LIVE"
    assert makernote_identifier(apple_makernote("5C4B-LIVE")[:20]) is None  # cut short
    assert makernote_identifier(b"Nikon\x00\x02") is None


def test_a_changed_part_brings_the_others_along(tmp_path):
    """What a watcher's change to one file of a Live Photo, a RAW+JPEG pair or a sidecar makes the indexer look at."""
    for name in ("IMG_1.JPG", "IMG_1.MOV", "IMG_1.JPG.json", "IMG_1.CR2.xmp", "IMG_10.JPG", "other.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "IMG_1").mkdir()  # a folder of that name is no part of it
    expected = [str(tmp_path / n) for n in ("IMG_1.MOV", "IMG_1.CR2.xmp", "IMG_1.JPG", "IMG_1.JPG.json")]
    assert related_paths([str(tmp_path / "IMG_1.MOV")]) == expected
    assert related_paths([str(tmp_path / "gone.json")]) == [str(tmp_path / "gone.json")]  # a part deleted: itself
    assert related_paths([str(tmp_path)]) == [str(tmp_path)]  # a folder is walked whole anyway
