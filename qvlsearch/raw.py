"""Camera RAW files (DNG, CR2, CR3, NEF, ARW, RAF, ORF, RW2), read through LibRaw (`rawpy`).

A RAW file holds the sensor's mosaic and, from most cameras, a JPEG preview the camera made from it.
The preview is used when it has at least the pixels the model looks at (the item's max_pixels, 1.84 MP
by default): no demosaicing, and what the photographer saw on the camera. Otherwise the mosaic is
demosaiced at half size (a 24 MP sensor gives 6 MP, still more than the model takes). Either way the
camera's orientation is applied. LibRaw is C code parsing untrusted files: the indexer reads RAW files
in its decoder processes (see `decoders`), as it does videos and PDFs.

EXIF (date, place, camera) is read with Pillow from the TIFF structure that DNG, CR2, NEF, ARW, ORF and
RW2 files are built on; from CR3 and RAF files, it is read from the embedded preview's EXIF, with LibRaw's
capture time when that has none.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

from PIL import Image

from .limits import VisionOptions
from .orientation import orientation_of, turns, upright

RAW_EXTENSIONS = frozenset({".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2"})
PREVIEW_MIN_PIXELS = VisionOptions().max_pixels  # a preview this large shows the model all it takes by default
PHOTO_SIZE = "photo_size"  # the decoded image's info key for the photo's (width, height) as shown, at full size
# The EXIF Orientation of each LibRaw `sizes.flip` (LibRaw maps the tag the other way with "50132467")
FLIP_ORIENTATION = {0: 1, 1: 2, 2: 4, 3: 3, 4: 5, 5: 8, 6: 6, 7: 7}
# ORF and RW2 are TIFF files with magics of their own: with the standard magic, Pillow reads their tags
TIFF_MAGICS = {b"II*\x00": b"II*\x00", b"MM\x00*": b"MM\x00*", b"IIRO": b"II*\x00", b"IIRS": b"II*\x00",
               b"MMOR": b"MM\x00*", b"IIU\x00": b"II*\x00"}


class RawError(ValueError):
    """A RAW file that cannot be used; the message is the reason, without the file's name."""


def is_raw_name(path: str | os.PathLike) -> bool:
    """Whether the file's name ends in a RAW suffix (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in RAW_EXTENSIONS


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().strip("b'\"") or type(exc).__name__
    return f"not a readable RAW file ({text})"


def open_raw(file: Any, max_pixels_cap: int, needed_pixels: int = PREVIEW_MIN_PIXELS) -> Image.Image:
    """The picture of a RAW file (a path or a binary file object), upright, RGB, fully decoded; its
    `info[PHOTO_SIZE]` is the sensor's image as shown, which the preview or demosaic may be smaller than.

    The embedded preview when it has at least `needed_pixels`, else a half-size demosaic. A file whose
    sensor has more than `max_pixels_cap` pixels is refused before anything is decoded. RawError for a
    file LibRaw cannot read.
    """
    import rawpy

    try:
        with rawpy.imread(file) as raw:
            sizes = raw.sizes
            if sizes.raw_width * sizes.raw_height > max_pixels_cap:
                raise RawError(f"image has too many pixels: the sensor's {sizes.raw_width}x{sizes.raw_height} "
                               f"is over the cap of {max_pixels_cap // 10**6} MP")
            orientation = FLIP_ORIENTATION.get(sizes.flip, 1)  # the camera's, from the RAW
            found = _preview(raw, needed_pixels, max_pixels_cap)
            if found is None:  # LibRaw turns what it demosaics by the camera's orientation itself
                image = Image.fromarray(raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8))
            else:
                preview, own_orientation = found  # a preview may carry its own orientation too
                orientation = orientation if orientation != 1 else own_orientation
                image = upright(preview, orientation)
            size = (sizes.width, sizes.height)
            image.info[PHOTO_SIZE] = size[::-1] if turns(orientation) else size
            return image
    except RawError:
        raise
    except (rawpy.LibRawError, OSError, ValueError) as exc:
        raise RawError(_reason(exc)) from None


def _preview(raw: Any, needed_pixels: int, max_pixels_cap: int) -> tuple[Image.Image, int] | None:
    """The embedded JPEG preview (decoded, RGB, as stored) and its own EXIF orientation, when it has at
    least `needed_pixels`; else None."""
    import rawpy

    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        return None
    if thumb.format != rawpy.ThumbFormat.JPEG:
        return None
    try:
        with Image.open(io.BytesIO(thumb.data), formats=["JPEG"]) as image:
            width, height = image.size
            if not needed_pixels <= width * height <= max_pixels_cap:
                return None
            image.load()
            return image.convert("RGB"), orientation_of(image)
    except (OSError, SyntaxError):  # a broken preview: demosaic instead
        return None


def raw_exif(path: str) -> Image.Exif:
    """The EXIF tags of a RAW file: from its TIFF structure, else from its embedded preview (CR3, RAF).

    Raises RawError when LibRaw cannot read a file that is not TIFF inside.
    """
    with open(path, "rb") as file:
        data = file.read()
    exif = Image.Exif()
    magic = TIFF_MAGICS.get(data[:4])
    if magic is not None:
        with warnings.catch_warnings():  # Pillow warns of odd tags; the fields are checked one by one
            warnings.simplefilter("ignore")
            exif.load(magic + data[4:])
        return exif
    import rawpy

    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            try:
                thumb = raw.extract_thumb()
            except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
                thumb = None
            if thumb is not None and thumb.format == rawpy.ThumbFormat.JPEG:
                with Image.open(io.BytesIO(thumb.data), formats=["JPEG"]) as image:
                    exif = image.getexif()
            if exif.get(0x0132) is None and raw.other.timestamp:  # DateTime: LibRaw's capture time
                exif[0x0132] = raw.other.timestamp.strftime("%Y:%m:%d %H:%M:%S")
    except (rawpy.LibRawError, OSError, ValueError, SyntaxError) as exc:
        raise RawError(_reason(exc)) from None
    return exif

