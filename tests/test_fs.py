"""The folder walker and file-kind detection, on real files, folders and links in tmp_path."""

from __future__ import annotations

import codecs
import json
import os
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import av
import pytest
from make_media import make_image, make_video
from PIL import Image, features

from qvlsearch import fs
from qvlsearch.fs import Found, KindError, display_path, sniff_kind, suffix_kind, walk

AS_ROOT = os.geteuid() == 0


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def rels(found: list[Found], base: Path) -> list[str]:
    return [os.path.relpath(item.path, base) for item in found]


def test_suffix_kind():
    assert suffix_kind("/a/b.JPG") == "image"
    assert suffix_kind("x.heic") == "image"
    assert [suffix_kind(f"x.{suffix}") for suffix in ("AVIF", "dng", "CR3", "nef", "arw", "raf", "orf", "RW2")] == [
        "image"] * 8
    assert suffix_kind("clip.MkV") == "video"
    assert suffix_kind("notes.md") == "text"
    assert suffix_kind("doc.PDF") == "pdf"
    assert suffix_kind("sheet.xlsx") is None
    assert suffix_kind(".jpg") is None  # a hidden file without a suffix
    assert suffix_kind("jpg") is None


def test_walk_nested_folders_in_stable_order(tmp_path):
    for name in ("z.jpg", "a.png", "b/m.md", "a/x.mp4", "a/sub/n.txt", "other.docx", "README", "a/sub/raw.CR2"):
        touch(tmp_path / name, b"data")
    found = walk([tmp_path])
    assert iter(found) is found  # a stream, not a list
    found = list(found)
    assert rels(found, tmp_path) == ["a/sub/n.txt", "a/sub/raw.CR2", "a/x.mp4", "a.png", "b/m.md", "z.jpg"]
    assert found == list(walk([str(tmp_path)]))
    first = found[0]
    st = os.stat(first.path)
    assert first == Found(str(tmp_path / "a/sub/n.txt"), str(tmp_path), 4, st.st_mtime_ns)


def test_walk_relative_root_is_made_absolute(tmp_path, monkeypatch):
    touch(tmp_path / "photos/a.jpg")
    monkeypatch.chdir(tmp_path)
    [found] = walk(["photos"])
    assert found.path == str(tmp_path / "photos/a.jpg")
    assert found.root == str(tmp_path / "photos")


def test_walk_hidden(tmp_path):
    for name in ("visible.jpg", ".hidden.jpg", ".git/x.jpg", "sub/.cache/y.png"):
        touch(tmp_path / name)
    assert rels(list(walk([tmp_path])), tmp_path) == ["visible.jpg"]
    assert rels(list(walk([tmp_path], include_hidden=True)), tmp_path) == [
        ".git/x.jpg",
        ".hidden.jpg",
        "sub/.cache/y.png",
        "visible.jpg",
    ]
    [found] = walk([tmp_path / ".git"])  # a hidden root named on purpose is walked
    assert found.path.endswith("x.jpg")


def test_walk_exclude(tmp_path):
    names = ("a.jpg", "b.png", "cache/c.jpg", "2020/cache/d.jpg", "2020/raw/e.jpg", "2021/raw/f.jpg", "2021/g.jpg")
    for name in names:
        touch(tmp_path / name)

    names_sorted = sorted(names)  # here name order is also walk order

    def walked(*patterns: str) -> list[str]:
        return rels(list(walk([tmp_path], exclude=patterns)), tmp_path)

    assert walked() == list(names_sorted)
    assert walked("*.png") == [name for name in names_sorted if name != "b.png"]
    assert walked("cache") == ["2020/raw/e.jpg", "2021/g.jpg", "2021/raw/f.jpg", "a.jpg", "b.png"]
    assert walked("2020/raw") == ["2020/cache/d.jpg", "2021/g.jpg", "2021/raw/f.jpg", "a.jpg", "b.png", "cache/c.jpg"]
    assert walked("raw/", "2021/*.jpg") == ["2020/cache/d.jpg", "a.jpg", "b.png", "cache/c.jpg"]
    assert walked("20??") == ["a.jpg", "b.png", "cache/c.jpg"]
    assert list(walk([tmp_path / "a.jpg"], exclude=["a.*"])) == []


def test_walk_file_root(tmp_path):
    image = touch(tmp_path / ".hidden" / "one.jpg", b"12345")
    [found] = walk([image])
    assert found == Found(str(image), str(image), 5, image.stat().st_mtime_ns)
    other = touch(tmp_path / "notes.docx")
    [found] = walk([other])
    assert found.path == str(other)
    assert found.error == "not an image, video, PDF or text file"


def test_walk_several_roots_each_folder_once(tmp_path):
    touch(tmp_path / "b/x.jpg")
    touch(tmp_path / "a/y.jpg")
    found = list(walk([tmp_path / "b", tmp_path, tmp_path / "b"]))
    assert [(os.path.relpath(f.path, tmp_path), os.path.relpath(f.root, tmp_path)) for f in found] == [
        ("b/x.jpg", "b"),
        ("a/y.jpg", "."),
    ]


def test_walk_missing_root_raises_at_once(tmp_path):
    touch(tmp_path / "a.jpg")
    with pytest.raises(FileNotFoundError, match="does-not-exist: no such file or folder"):
        walk([tmp_path, tmp_path / "does-not-exist"])


def test_walk_ignores_unknown_suffixes_and_special_names(tmp_path):
    touch(tmp_path / "doc.docx")
    touch(tmp_path / "archive.tar.gz")
    touch(tmp_path / "noext")
    touch(tmp_path / "album.jpg" / "inside.png")  # a folder with an image suffix is walked as a folder
    os.mkfifo(tmp_path / "pipe.jpg")  # not a regular file
    assert rels(list(walk([tmp_path])), tmp_path) == ["album.jpg/inside.png"]


def test_walk_broken_symlink(tmp_path):
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "gone.docx").symlink_to(tmp_path / "missing.docx")
    assert list(walk([tmp_path])) == [
        Found(str(tmp_path / "gone.jpg"), str(tmp_path), 0, 0, "broken symbolic link"),
    ]
    [found] = walk([tmp_path / "gone.jpg"])  # as a root
    assert found.error == "broken symbolic link"


def test_walk_symlink_to_file(tmp_path):
    target = touch(tmp_path / "store" / "real.bin", b"0123456789")
    (tmp_path / "link.png").symlink_to(target)
    [found] = walk([tmp_path])
    assert found == Found(str(tmp_path / "link.png"), str(tmp_path), 10, target.stat().st_mtime_ns)


def test_walk_symlinked_folder(tmp_path):
    touch(tmp_path / "real/x.jpg")
    (tmp_path / "a_link").symlink_to(tmp_path / "real", target_is_directory=True)
    assert rels(list(walk([tmp_path])), tmp_path) == ["real/x.jpg"]
    # followed, the folder is walked once, under the name met first
    assert rels(list(walk([tmp_path], follow_symlinks=True)), tmp_path) == ["a_link/x.jpg"]
    # a symlinked root is always walked, its paths kept under the link
    assert rels(list(walk([tmp_path / "a_link"])), tmp_path) == ["a_link/x.jpg"]


def test_walk_symlink_loop(tmp_path):
    touch(tmp_path / "top/a.jpg")
    touch(tmp_path / "top/sub/b.jpg")
    (tmp_path / "top/sub/loop").symlink_to(tmp_path / "top", target_is_directory=True)
    (tmp_path / "top/sub/self").symlink_to(".", target_is_directory=True)
    (tmp_path / "top/ping.jpg").symlink_to("pong.jpg")
    (tmp_path / "top/pong.jpg").symlink_to("ping.jpg")
    root = tmp_path / "top"
    link_loops = [Found(str(root / name), str(root), 0, 0, "symbolic link loop") for name in ("ping.jpg", "pong.jpg")]
    assert list(walk([root])) == [
        Found(str(root / "a.jpg"), str(root), 1, (root / "a.jpg").stat().st_mtime_ns),
        *link_loops,
        Found(str(root / "sub/b.jpg"), str(root), 1, (root / "sub/b.jpg").stat().st_mtime_ns),
    ]
    followed = list(walk([root], follow_symlinks=True))
    assert [(os.path.relpath(f.path, root), f.error) for f in followed] == [
        ("a.jpg", None),
        ("ping.jpg", "symbolic link loop"),
        ("pong.jpg", "symbolic link loop"),
        ("sub/b.jpg", None),
        ("sub/loop", "symbolic link loop"),
        ("sub/self", "symbolic link loop"),
    ]


def test_walk_non_utf8_name(tmp_path):
    name = os.fsdecode(b"caf\xe9.jpg")
    make_image(tmp_path / name)
    [found] = walk([tmp_path])
    assert found.path == os.path.join(str(tmp_path), name)
    assert found.path.endswith("caf\udce9.jpg")
    shown = display_path(found.path)
    assert shown == f"{tmp_path}/caf\\xe9.jpg"
    assert json.loads(json.dumps(shown)) == shown
    shown.encode("utf-8")
    assert sniff_kind(found.path) == "image"


def test_walk_unicode_name(tmp_path):
    name = unicodedata.normalize("NFC", "Café 東京 🌅.jpg")
    touch(tmp_path / name)
    [found] = walk([tmp_path])
    assert os.path.basename(found.path) == name
    assert display_path(found.path) == found.path


def test_walk_unreadable_folder_and_file_reported(tmp_path, monkeypatch):
    """Runs as root too: the listing fails by a patched os.scandir, and os.access says no for one file."""
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b/hidden-from-us.jpg")
    touch(tmp_path / "c.png")
    scandir, access = os.scandir, os.access

    def failing_scandir(path):
        if os.path.basename(path) == "b":
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", failing_scandir)
    monkeypatch.setattr(os, "access", lambda path, mode: not path.endswith("c.png") and access(path, mode))
    assert [(f.path, f.error) for f in walk([tmp_path])] == [
        (str(tmp_path / "a.jpg"), None),
        (str(tmp_path / "b"), "cannot read folder: permission denied"),
        (str(tmp_path / "c.png"), "permission denied"),
    ]


WALK_AND_SNIFF = """
import json, sys
from qvlsearch.fs import KindError, sniff_kind, walk
found = [(f.path, f.error) for f in walk([sys.argv[1]])]
try:
    sniff_kind(sys.argv[2])
    sniffed = None
except KindError as exc:
    sniffed = str(exc)
print(json.dumps({"found": found, "sniffed": sniffed}))
"""


def test_walk_unreadable_for_real(tmp_path):
    """Real modes, read by a process without root's read-everything capability (dropped with setpriv)."""
    touch(tmp_path / "a.jpg")
    locked = touch(tmp_path / "b/x.jpg").parent
    secret = touch(tmp_path / "c.png")
    locked.chmod(0)
    secret.chmod(0)
    drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"] if AS_ROOT else []
    try:
        out = subprocess.run([*drop, sys.executable, "-c", WALK_AND_SNIFF, str(tmp_path), str(secret)],
                             capture_output=True, text=True, check=True).stdout
    finally:
        locked.chmod(0o755)
        secret.chmod(0o644)
    result = json.loads(out)
    assert [tuple(f) for f in result["found"]] == [
        (str(tmp_path / "a.jpg"), None),
        (str(locked), "cannot read folder: permission denied"),
        (str(secret), "permission denied"),
    ]
    assert result["sniffed"] == "permission denied"


# --- sniff_kind -------------------------------------------------------------------------------------------------


def pillow(image_format: str):
    return lambda path: Image.new("RGB", (32, 24), (10, 200, 90)).save(path, format=image_format)


def video(codec: str = "libx264"):
    return lambda path: make_video(path, frames=3, fps=3, size=(32, 32), codec=codec)


def raw(data: bytes):
    return lambda path: path.write_bytes(data)


HEIC_HEADER = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
MATROSKA_HEADER = b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\xf7\x81\x01\x42\x82\x88matroska" + b"\x00" * 64
MP4_HEADER = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + b"\x00" * 64
AVIF_HEADER = b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + b"\x00" * 64
CAN_WRITE_WEBM = "libvpx-vp9" in av.codecs_available

SNIFF_CASES = {  # file name: (expected kind, writer)
    "photo.jpg": ("image", pillow("JPEG")),
    "photo.png": ("image", pillow("PNG")),
    "photo.gif": ("image", pillow("GIF")),
    "photo.webp": ("image", pillow("WEBP")),
    "photo.bmp": ("image", pillow("BMP")),
    "photo.tiff": ("image", pillow("TIFF")),
    "photo.avif": ("image", pillow("AVIF") if features.check("avif") else raw(AVIF_HEADER)),
    "photo.heic": ("image", raw(HEIC_HEADER)),
    "really-a-png.jpg": ("image", pillow("PNG")),
    "image-without-suffix": ("image", raw(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32)),
    "clip.mp4": ("video", video()),
    "clip.mov": ("video", video()),
    "clip.m4v": ("video", raw(MP4_HEADER)),
    "clip.mkv": ("video", video()),
    "clip.avi": ("video", video("mpeg4")),
    "clip.webm": ("video", video("libvpx-vp9") if CAN_WRITE_WEBM else raw(MATROSKA_HEADER)),
    "notes.txt": ("text", raw("plain text, ünïcödé ✓\n".encode())),
    "notes.md": ("text", raw(b"# Title\n\nBMW is a car maker, not a bitmap.\n")),
    "bom.txt": ("text", raw(b"\xef\xbb\xbfwith a byte order mark\n")),
    "cut.txt": ("text", raw(b"a" * (fs.SNIFF_BYTES - 1) + "é and more".encode())),
    "text-without-suffix": ("text", raw(b"hello")),
}


@pytest.mark.parametrize("name", SNIFF_CASES)
def test_sniff_kind(tmp_path, name):
    kind, write = SNIFF_CASES[name]
    write(tmp_path / name)
    assert sniff_kind(str(tmp_path / name)) == kind


def test_sniff_cases_are_what_they_claim(tmp_path):
    SNIFF_CASES["really-a-png.jpg"][1](tmp_path / "really-a-png.jpg")
    assert (tmp_path / "really-a-png.jpg").read_bytes().startswith(b"\x89PNG")
    SNIFF_CASES["cut.txt"][1](tmp_path / "cut.txt")
    with pytest.raises(UnicodeDecodeError, match="unexpected end of data"):
        (tmp_path / "cut.txt").read_bytes()[: fs.SNIFF_BYTES].decode("utf-8")
    (tmp_path / "cut.txt").read_bytes().decode("utf-8")


def rejected(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(KindError) as caught:
        sniff_kind(str(path))
    return str(caught.value)


def test_sniff_rejects(tmp_path):
    video = make_video(tmp_path / "clip.mp4", frames=2, fps=2, size=(32, 32)).read_bytes()
    noise = bytes([0x00, 0x01]) + random.Random(0).randbytes(4096)
    assert rejected(tmp_path, "text.jpg", b"this is text, not a jpeg\n") == "content is text, but the name says image"
    assert rejected(tmp_path, "clip.jpg", video) == "content is a video, but the name says image"
    assert rejected(tmp_path, "photo.mp4", HEIC_HEADER) == "content is an image, but the name says video"
    assert rejected(tmp_path, "clip.txt", MATROSKA_HEADER) == "content is a video, but the name says text"
    assert rejected(tmp_path, "empty.png", b"") == "empty file"
    assert rejected(tmp_path, "noise.png", noise) == fs.UNKNOWN_CONTENT
    assert rejected(tmp_path, "nul.txt", b"text with a \x00 byte") == fs.UNKNOWN_CONTENT
    assert rejected(tmp_path, "latin1.txt", "café\n".encode("latin-1")) == fs.UNKNOWN_CONTENT
    # a short file that ends in half a character is not cut by the sample: it is not UTF-8
    assert rejected(tmp_path, "short-cut.txt", "café".encode()[:-1]) == fs.UNKNOWN_CONTENT


def test_sniff_unreadable_paths(tmp_path):
    with pytest.raises(KindError, match="^no such file$"):
        sniff_kind(str(tmp_path / "missing.jpg"))
    with pytest.raises(KindError, match="^is a directory$"):
        sniff_kind(str(tmp_path))


BOM_TEXTS = {  # how editors on Windows and macOS save text: a byte-order mark, then UTF-8, UTF-16 or UTF-32
    "utf-8-sig": codecs.BOM_UTF8 + "héllo wörld ✓\nline two\n".encode(),
    "utf-16-le": codecs.BOM_UTF16_LE + "héllo wörld ✓\nline two\n".encode("utf-16-le"),
    "utf-16-be": codecs.BOM_UTF16_BE + "héllo wörld ✓\nline two\n".encode("utf-16-be"),
    "utf-32-le": codecs.BOM_UTF32_LE + "héllo wörld ✓\nline two\n".encode("utf-32-le"),
    "utf-32-be": codecs.BOM_UTF32_BE + "héllo wörld ✓\nline two\n".encode("utf-32-be"),
}


@pytest.mark.parametrize("encoding", BOM_TEXTS)
def test_text_with_a_byte_order_mark_is_text_without_the_mark(tmp_path, encoding):
    path = touch(tmp_path / "notes.txt", BOM_TEXTS[encoding])
    assert sniff_kind(str(path)) == "text"
    assert fs.file_item(str(path)) == {"text": "héllo wörld ✓\nline two\n"}


def test_a_byte_order_mark_before_binary_is_not_text(tmp_path):
    assert rejected(tmp_path, "bom-nul.txt", codecs.BOM_UTF16_LE + "a\x00b".encode("utf-16-le")) == fs.UNKNOWN_CONTENT
    assert rejected(tmp_path, "bom-cut.txt", codecs.BOM_UTF16_LE + b"\x00\xd8") == fs.UNKNOWN_CONTENT  # lone surrogate
