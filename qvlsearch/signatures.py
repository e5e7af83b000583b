"""What a file's first bytes show: the image formats and video containers qvlsearch reads, by their signatures.

One place for the magic numbers, used to sort files found on disk (`fs`) and to fence media that comes in
requests (`media`, `video`) before any decoder sees it.
"""

from __future__ import annotations

import codecs

HEAD_BYTES = 1024  # enough for every check below (three MPEG-TS packets of 188 bytes, or M2TS's of 192)
# TIFF is also the container of most camera RAW files (DNG, CR2, NEF, ARW...): their suffix tells them apart.
IMAGE_MAGIC = {b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png", b"GIF87a": "gif", b"GIF89a": "gif",
               b"II*\x00": "tiff", b"MM\x00*": "tiff",
               # camera RAW files in containers of their own: Fujifilm, Olympus (two magics), Panasonic
               b"FUJIFILMCCD-RAW": "raf", b"IIRO": "orf", b"IIRS": "orf", b"MMOR": "orf", b"IIU\x00": "rw2"}
BMP_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}  # the DIB header sizes a real BMP has at offset 14
HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}
CR3_BRAND = b"crx "  # Canon's CR3 RAW: an ISO-BMFF file, like MP4 and HEIF, but neither a video nor a HEIF image
RAW_FORMATS = {"raf", "orf", "rw2", "cr3"}  # what `image_format` calls the RAW files that are not TIFF inside
EBML_MAGIC = b"\x1a\x45\xdf\xa3"  # Matroska and WebM
TS_SYNC = 0x47
# FFmpeg's demuxer for each container, by the name av.open(format=...) takes.
MOV, MATROSKA, AVI, MPEGTS = "mov", "matroska", "avi", "mpegts"
VIDEO_CONTAINERS = "MP4/MOV, Matroska/WebM, AVI or MPEG-TS"


def image_format(head: bytes) -> str | None:
    """'jpeg', 'png', 'gif', 'tiff', 'bmp', 'webp', 'heif' (HEIC and AVIF) or a RAW_FORMATS name by the first
    bytes, else None. TIFF-based RAW files (DNG, CR2, NEF, ARW...) are 'tiff'."""
    for magic, name in IMAGE_MAGIC.items():
        if head.startswith(magic):
            return name
    if head.startswith(b"BM") and int.from_bytes(head[14:18], "little") in BMP_HEADER_SIZES:
        return "bmp"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:
        return "heif"
    if head[4:8] == b"ftyp" and head[8:12] == CR3_BRAND:
        return "cr3"
    return None


def video_demuxer(head: bytes) -> str | None:
    """The one FFmpeg demuxer for a supported video container (ISO-BMFF, Matroska/WebM, AVI, MPEG-TS), else None.

    Anything else (an HLS playlist, an FFmpeg concat script, SDP, an image, text) is None, so that no
    demuxer that follows references to other files or URLs is ever picked by probing the content.
    """
    if head[4:8] == b"ftyp" and head[8:12] not in HEIF_BRANDS and head[8:12] != CR3_BRAND:
        return MOV
    if head.startswith(EBML_MAGIC):
        return MATROSKA
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return AVI
    for offset, size in ((0, 188), (4, 192)):  # MPEG-TS, and M2TS (AVCHD camcorders) with its 4-byte prefix
        if len(head) > offset + 2 * size and all(head[offset + k * size] == TS_SYNC for k in range(3)):
            return MPEGTS
    return None


def describe_content(head: bytes) -> str:
    """A few words on what non-video content looks like, for error messages."""
    if not head:
        return "empty file"
    if head.startswith(b"#EXTM3U"):
        return "an HLS playlist"
    if head.startswith(b"ffconcat"):
        return "an FFmpeg concat script"
    if (name := image_format(head)) is not None:
        return f"a {name.upper()} image"
    try:
        if "\x00" not in codecs.getincrementaldecoder("utf-8")().decode(head):
            return "text"
    except UnicodeDecodeError:
        pass
    return "unknown content"
