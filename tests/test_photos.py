"""Photos from phones and cameras: EXIF orientation applied wherever pixels are read, HEIC/HEIF and AVIF,
camera RAW files through LibRaw. Every file is built here from a sample photo."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
import tifffile
from conftest import PHOTOS
from PIL import ExifTags, Image

from qvlsearch import Embedder
from qvlsearch.contact_sheet import thumbnail
from qvlsearch.indexer import Indexer, IndexOptions
from qvlsearch.media import open_image
from qvlsearch.metadata import read_metadata
from qvlsearch.search import SearchResult
from qvlsearch.signatures import image_format, video_demuxer
from qvlsearch.store import Store

UTC = dt.timezone.utc
PORTRAIT = PHOTOS / "books.jpg"  # 384x576: turned, its width and height swap
# The stored pixels of a photo shown upright under each Orientation: the inverse of the tag's transposition
STORED = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_270}


def exif_of(orientation: int = 1, taken: str | None = None, camera: tuple[str, str] | None = None) -> Image.Exif:
    exif = Image.Exif()
    if orientation != 1:
        exif[ExifTags.Base.Orientation] = orientation
    if taken:
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = taken
    if camera:
        exif[ExifTags.Base.Make], exif[ExifTags.Base.Model] = camera
    return exif


@pytest.fixture(scope="module")
def turned(tmp_path_factory) -> dict[int, str]:
    """The portrait photo as JPEGs: upright (1), and stored turned or mirrored with the tag that shows it upright."""
    root = tmp_path_factory.mktemp("turned")
    upright = Image.open(PORTRAIT).convert("RGB")
    paths = {}
    for orientation in range(1, 9):
        stored = upright.transpose(STORED[orientation]) if orientation in STORED else upright
        paths[orientation] = str(root / f"tagged {orientation}.jpg")
        stored.save(paths[orientation], quality=95, exif=exif_of(orientation))
    return paths


def test_the_stored_pixels_are_the_tags_inverse(turned):
    upright = np.asarray(Image.open(turned[1]), dtype=np.int16)
    for orientation in STORED:
        shown = np.asarray(open_image(turned[orientation]), dtype=np.int16)
        assert shown.shape == upright.shape, orientation
        assert np.abs(shown - upright).mean() < 2, orientation  # JPEG noise only


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_turned_photos_get_the_upright_photos_vector_and_size(turned, embedder, checkpoints):
    on_device = Embedder(str(checkpoints["embedder"]), device="cpu", decode_jpeg_on_device=True)
    items = [{"image": turned[o]} for o in range(1, 9)]
    for model in (embedder, on_device):
        vectors = model.embed(items)
        for orientation in range(2, 9):
            assert cosine(vectors[0], vectors[orientation - 1]) >= 0.999, orientation
        for item in items:
            encoded = model.encode(0, item)
            assert (encoded.facts["width"], encoded.facts["height"]) == (384, 576), item
            assert (encoded.jpeg is not None) == (model is on_device)
    # Without the tag the pixels are embedded as stored, as the official code does.
    untagged = Path(turned[6]).with_name("untagged.jpg")
    Image.open(turned[6]).save(untagged, quality=95)
    facts = embedder.encode(0, {"image": str(untagged)}).facts
    assert (facts["width"], facts["height"]) == (576, 384)
    stored = Image.open(untagged).convert("RGB")
    np.testing.assert_allclose(embedder.embed([{"image": str(untagged)}]), embedder.embed([{"image": stored}]),
                               atol=1e-6)


def test_contact_sheet_tiles_are_upright(turned):
    tiles = [np.asarray(thumbnail(SearchResult(rank=1, id=1, path=turned[o], kind="image", score=0.5)), np.int16)
             for o in (1, 6, 7)]
    assert tiles[0].shape[:2] == (256, 171)  # portrait
    for tile in tiles[1:]:
        assert tile.shape == tiles[0].shape and np.abs(tile - tiles[0]).mean() < 4


def write_dng(path: Path, source: Path, orientation: int, taken: str, camera: tuple[str, str],
              preview: tuple[int, int] | None = None) -> None:
    """A minimal DNG: the photo as an RGGB Bayer mosaic (12 bits) with the DNG tags LibRaw needs, and
    optionally, as a camera writes it, a JPEG preview of the photo (`preview`: its width and height) in IFD0."""
    rgb = np.asarray(Image.open(source).convert("RGB"), dtype=np.uint16) * 16
    mosaic = np.empty(rgb.shape[:2], np.uint16)
    mosaic[0::2, 0::2], mosaic[0::2, 1::2] = rgb[0::2, 0::2, 0], rgb[0::2, 1::2, 1]
    mosaic[1::2, 0::2], mosaic[1::2, 1::2] = rgb[1::2, 0::2, 1], rgb[1::2, 1::2, 2]
    identity = (1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1)
    main = [(271, "s", 0, camera[0], True), (272, "s", 0, camera[1], True), (274, "H", 1, orientation, True),
            (306, "s", 0, taken, True), (50706, "B", 4, (1, 4, 0, 0), True), (50707, "B", 4, (1, 1, 0, 0), True),
            (50708, "s", 0, " ".join(camera), True), (50721, "2i", 9, identity, True), (50778, "H", 1, 21, True),
            (50728, "2I", 3, (1, 1) * 3, True)]
    cfa = [(33421, "H", 2, (2, 2), True), (33422, "B", 4, (0, 1, 1, 2), True),  # CFA: 2x2 RGGB
           (50714, "H", 1, 0, True), (50717, "H", 1, 4095, True)]  # black and white levels
    with tifffile.TiffWriter(path) as tif:
        if preview is None:
            tif.write(mosaic, photometric=32803, subfiletype=0, extratags=main + cfa)
            return
        jpeg = io.BytesIO()
        Image.open(source).convert("RGB").resize(preview).save(jpeg, "JPEG", quality=85)
        # tifffile writes JPEG strips only with imagecodecs: the bytes go in as they are, the tags are set below
        tif.write(np.frombuffer(jpeg.getvalue(), np.uint8)[None], photometric="minisblack", subfiletype=1,
                  subifds=1, extratags=main)
        tif.write(mosaic, photometric=32803, subfiletype=0, extratags=cfa)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tags = tif.pages[0].tags
        for name, value in (("Compression", 7), ("ImageWidth", preview[0]), ("ImageLength", preview[1]),
                            ("RowsPerStrip", preview[1]), ("PhotometricInterpretation", 6), ("SamplesPerPixel", 3)):
            tags[name].overwrite(value)


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """A phone's HEIC and AVIF (stored turned, tagged 6, with dates), a camera's DNG, and broken RAW files."""
    root = tmp_path_factory.mktemp("library")
    sideways = Image.open(PORTRAIT).convert("RGB").transpose(Image.Transpose.ROTATE_90)
    exif = exif_of(6, "2021:05:01 10:00:00", ("Apple", "iPhone 12")).tobytes()
    pillow_heif.from_pillow(sideways).save(root / "IMG_0001.HEIC", exif=exif, quality=90)
    sideways.save(root / "IMG_0002.avif", exif=exif_of(6, "2021:05:02 10:00:00").tobytes(), quality=90)
    write_dng(root / "DSC_0003.dng", PHOTOS / "cat.jpg", 8, "2020:02:02 12:00:00", ("Testmaker", "Model T"))
    write_dng(root / "DSC_0004.DNG", PHOTOS / "cat.jpg", 6, "2020:02:03 12:00:00", ("Testmaker", "Model T"),
              preview=(1800, 1200))  # 2.2 MP: more than the 1.84 MP the model takes
    (root / "broken.nef").write_bytes(b"II*\x00\x08\x00\x00\x00" + b"\xff" * 4000)
    (root / "broken.raf").write_bytes(b"FUJIFILMCCD-RAW 0201" + b"\x00" * 4000)
    return root


def test_photo_files_are_told_by_their_signatures():
    assert image_format(b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01crx isom") == "cr3"
    assert video_demuxer(b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01crx isom") is None
    for brand in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis"):
        head = b"\x00\x00\x00\x18ftyp" + brand
        assert image_format(head) == "heif" and video_demuxer(head) is None
    assert video_demuxer(b"\x00\x00\x00\x18ftypqt  ") == "mov" and image_format(b"\x00\x00\x00\x18ftypqt  ") is None
    assert [image_format(head) for head in (b"FUJIFILMCCD-RAW 0201", b"IIRO\x08\x00", b"IIRS\x08\x00",
                                            b"IIU\x00\x18\x00")] == ["raf", "orf", "orf", "rw2"]


def test_heic_avif_and_raw_are_read_as_shown_with_their_exif(library):
    for name in ("IMG_0001.HEIC", "IMG_0002.avif"):
        assert open_image(str(library / name)).size == (384, 576), name
    assert read_metadata(str(library / "IMG_0001.HEIC"), "image") == {
        "taken_at": dt.datetime(2021, 5, 1, 10, tzinfo=UTC), "lat": None, "lon": None, "camera": "Apple iPhone 12"}
    raw = open_image(str(library / "DSC_0003.dng"))
    assert raw.size == (128, 192) and raw.info["photo_size"] == (256, 384)  # half-size demosaic, turned by tag 8
    upright = Image.open(PHOTOS / "cat.jpg").convert("RGB").transpose(Image.Transpose.ROTATE_90).resize(raw.size)
    assert np.corrcoef(np.asarray(raw.convert("L"), float).ravel(),
                       np.asarray(upright.convert("L"), float).ravel())[0, 1] > 0.8  # the picture, turned upright
    assert read_metadata(str(library / "DSC_0003.dng"), "image") == {
        "taken_at": dt.datetime(2020, 2, 2, 12, tzinfo=UTC), "lat": None, "lon": None, "camera": "Testmaker Model T"}
    # A preview as large as the model needs is used as it is (turned upright by tag 6); a smaller one is not.
    shown = open_image(str(library / "DSC_0004.DNG"))
    assert shown.size == (1200, 1800) and shown.info["photo_size"] == (256, 384)
    upright = Image.open(PHOTOS / "cat.jpg").convert("RGB").transpose(Image.Transpose.ROTATE_270).resize(shown.size)
    assert np.abs(np.asarray(shown, np.int16) - np.asarray(upright, np.int16)).mean() < 6
    assert open_image(str(library / "DSC_0004.DNG"), needed_pixels=2400 * 1600).size == (128, 192)


def test_a_phone_and_camera_library_is_indexed_and_found_by_date(tmp_path, library, checkpoints, embedder):
    from qvlsearch.search import SearchIndex

    options = IndexOptions(model=str(checkpoints["embedder"]), workers=1)  # one decoder process to start
    summary = Indexer(tmp_path / "i", options, embedder=embedder).run([library])
    assert (summary.added, summary.failed) == (4, 2)
    rows = {Path(r["path"]).name: r for r in Store.open(tmp_path / "i").rows.values()}
    for name, size in {"IMG_0001.HEIC": (384, 576), "IMG_0002.avif": (384, 576), "DSC_0003.dng": (256, 384),
                       "DSC_0004.DNG": (256, 384)}.items():
        assert (rows[name]["kind"], rows[name]["status"], rows[name]["width"], rows[name]["height"]) == (
            "image", "ok", *size), name
    for name in ("broken.nef", "broken.raf"):
        assert rows[name]["status"] == "error" and rows[name]["error"].startswith("not a readable RAW file")
        assert "\n" not in rows[name]["error"]
    search = SearchIndex(tmp_path / "i", embedder=embedder).search
    assert [Path(r.path).name for r in search("books", k=10, after="2021-05-01", before="2021-05-01T23:00:00Z")] == [
        "IMG_0001.HEIC"]
    assert [Path(r.path).name for r in search("a cat", k=10, before="2020-02-03")] == ["DSC_0003.dng"]
