"""The video reader (PyAV) and the content fence in front of every decoder, on real files made here."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from make_media import copy_video_packets, make_audio_only, make_video
from PIL import Image

from qvlsearch import MediaError

SAMPLE_VIDEOS = sorted((Path(__file__).resolve().parent.parent / "sample_data" / "videos").glob("*.mp4"))
WINDOWS = [{}, {"fps": 2.0}, {"video_start": 1.0, "video_end": 3.5}, {"video_start": 2.5},
           {"fps": 10.0, "max_frames": 300}]


def data_uri(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def playlist(target: Path) -> bytes:
    """An HLS playlist whose one segment is a local file named by a file: URL."""
    return (f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n#EXT-X-MEDIA-SEQUENCE:0\n"
            f"#EXTINF:2.0,\nfile://{target}\n#EXT-X-ENDLIST\n").encode()


def faststart_copy(source: Path, path: Path) -> Path:
    """The same packets with the index (moov) before the data, as a streaming site writes an mp4."""
    return copy_video_packets(source, path, options={"movflags": "faststart"})


def make_clip(path: Path, frames: int = 240, fps: int = 24, size: tuple[int, int] = (160, 120), codec: str = "libx264",
              options: dict | None = None, rotation: int = 0) -> Path:
    """A clip whose every frame differs (gradients moving at different speeds), with short GOPs so that
    sampling seeks; `rotation` is the display matrix's counter-clockwise angle."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options or {"g": "12"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(frames):
            rgb = np.zeros((height, width, 3), np.uint8)
            rgb[..., 0] = (x + 3 * i) % 256
            rgb[..., 1] = (2 * y + i) % 256
            rgb[..., 2] = ((x // 16 + y // 16 + i) % 2) * 200
            rgb[: height // 3, : width // 4] = 255  # a corner that shows the orientation
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return path


def video_part(path: str, **extra) -> dict:
    return {"type": "video", "video": path, "fps": 1.0, "max_frames": 64, "total_pixels": 7864320, **extra}


def official(path: str, **extra) -> tuple[torch.Tensor, dict]:
    """qwen-vl-utils' fetch_video with its decord reader, as the official code reads a video."""
    from qwen_vl_utils import vision_process

    vision_process.FORCE_QWENVL_VIDEO_READER = "decord"
    (frames, metadata), _ = vision_process.fetch_video(video_part(path, **extra), image_patch_size=16,
                                                        return_video_sample_fps=True, return_video_metadata=True)
    assert metadata["video_backend"] == "decord"
    return frames, metadata


# --- the content fence ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private(tmp_path_factory) -> dict[str, Path]:
    """A video outside everything, as another user's, and a faststart copy of it."""
    root = tmp_path_factory.mktemp("private")
    secret = make_video(root / "secret.mp4", frames=12)
    return {"secret": secret, "faststart": faststart_copy(secret, root / "faststart.mp4")}


@pytest.mark.parametrize("target", ["secret", "faststart"])
def test_hls_playlist_in_a_data_uri_is_refused(embedder, private, target):
    item = {"video": data_uri(playlist(private[target]))}
    with pytest.raises(MediaError) as info:
        embedder.embed([{"text": "fine"}, item])
    assert info.value.index == 1
    assert "not a supported video container (an HLS playlist" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("target", ["secret", "faststart"])
def test_hls_playlist_named_mp4_is_refused(embedder, private, target, tmp_path):
    path = tmp_path / "x.mp4"
    path.write_bytes(playlist(private[target]))
    with pytest.raises(MediaError, match=r"x\.mp4'?: not a supported video container \(an HLS playlist"):
        embedder.embed([{"video": str(path)}])


def test_hls_playlist_is_refused_by_an_explicit_qwen_vl_utils_reader(embedder, private, tmp_path, monkeypatch):
    monkeypatch.setenv("FORCE_QWENVL_VIDEO_READER", "decord")
    path = tmp_path / "x.mp4"
    path.write_bytes(playlist(private["secret"]))
    for video in (str(path), data_uri(path.read_bytes())):
        with pytest.raises(MediaError, match="not a supported video container"):
            embedder.embed([{"video": video}])


def test_an_explicit_reader_gives_the_same_vectors_and_never_falls_back_to_torchvision(embedder, media, monkeypatch):
    vector = embedder.embed([{"video": str(media["video"])}])
    monkeypatch.setenv("FORCE_QWENVL_VIDEO_READER", "decord")
    np.testing.assert_allclose(embedder.embed([{"video": str(media["video"])}]), vector, atol=1e-6)
    with pytest.raises(MediaError) as info:
        embedder.embed([{"video": str(media["corrupt.mp4"])}])
    assert "read_video" not in str(info.value) and "torchvision" not in str(info.value)
    monkeypatch.setenv("FORCE_QWENVL_VIDEO_READER", "nonsense")
    with pytest.raises(MediaError, match="FORCE_QWENVL_VIDEO_READER=nonsense is not a video reader"):
        embedder.embed([{"video": str(media["video"])}])


@pytest.mark.parametrize("content, named", [
    (b"ffconcat version 1.0\nfile 'secret.mp4'\n", "an FFmpeg concat script"),
    (b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nm=video 5004 RTP/AVP 96\n", "text"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "a PNG image"),
    (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64, "a HEIF image"),
    (b"FLV\x01\x05" + b"\x00" * 64, "unknown content"),
])
def test_other_content_is_no_video(embedder, tmp_path, content, named):
    path = tmp_path / "x.mp4"
    path.write_bytes(content)
    for video in (str(path), data_uri(content)):
        with pytest.raises(MediaError, match=f"not a supported video container \\({named}"):
            embedder.embed([{"video": video}])


def test_containers_by_signature():
    from qvlsearch.signatures import image_format, video_demuxer

    ts = bytearray(188 * 4)
    ts[0::188] = b"\x47" * 4
    m2ts = bytearray(192 * 4)
    m2ts[4::192] = b"\x47" * 4
    assert video_demuxer(bytes(ts)) == video_demuxer(bytes(m2ts)) == "mpegts"
    assert video_demuxer(b"\x00\x00\x00\x20ftypisom") == "mov"
    assert video_demuxer(b"\x00\x00\x00\x20ftypheic") is None and image_format(b"\x00\x00\x00\x20ftypheic") == "heif"
    assert video_demuxer(b"\x1a\x45\xdf\xa3\x01") == "matroska"
    assert video_demuxer(b"RIFF\x00\x00\x00\x00AVI LIST") == "avi"
    assert video_demuxer(b"#EXTM3U\n" + b"G" * 600) is None


def test_a_remote_video_is_read_from_a_private_file_removed_afterwards(embedder, media, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []
    real_open = av.open

    def spy(file, *args, **kwargs):
        path = file.name  # the handle whose first bytes were checked
        seen.append((path, os.stat(path).st_mode & 0o777, os.stat(os.path.dirname(path)).st_mode & 0o777, kwargs))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(av, "open", spy)
    from_uri = embedder.embed([{"video": data_uri(Path(media["video"]).read_bytes())}])
    np.testing.assert_allclose(from_uri, embedder.embed([{"video": str(media["video"])}]), atol=1e-6)
    path, mode, folder_mode, kwargs = seen[0]
    assert path.startswith(str(tmp_path)) and mode == 0o600 and folder_mode == 0o700
    assert kwargs["format"] == "mov" and kwargs["options"]["protocol_whitelist"] == "file"
    assert list(tmp_path.iterdir()) == []


# --- the reader against decord ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SAMPLE_VIDEOS, ids=lambda p: p.name)
def test_frames_and_indices_equal_decords_on_the_sample_videos(path):
    from qvlsearch.video import read_video

    for window in WINDOWS:
        expected, expected_metadata = official(str(path), **window)
        frames, metadata, _ = read_video(str(path), video_part(str(path), **window), 16)
        assert metadata == {**expected_metadata, "video_backend": "pyav"}, window
        assert torch.equal(frames, expected), window


@pytest.mark.parametrize("rotation", [90, 180, -90])
def test_rotated_video_is_turned_as_decord_turns_it(tmp_path, rotation):
    from qvlsearch.video import read_video

    path = str(make_clip(tmp_path / "turned.mp4", frames=24, size=(128, 96), rotation=rotation))
    expected, _ = official(path)
    frames, _, _ = read_video(path, video_part(path), 16)
    assert frames.shape[-2] > frames.shape[-1] if rotation != 180 else frames.shape[-2] < frames.shape[-1]
    assert torch.equal(frames, expected)


def make_vfr_clip(path: Path, frames: int = 60) -> Path:
    """An H.264 clip whose frames are irregularly spaced in time (17 ms to 250 ms apart, as a phone writes
    when the scene or the light changes), with B-frames, in the container `path`'s suffix names."""
    width, height = 128, 96
    y, x = np.mgrid[0:height, 0:width]
    gaps_ms = [33, 33, 100, 17, 250, 40, 66]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30, options={"g": "12", "bf": "2"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        pts = 0
        for i in range(frames):
            rgb = np.zeros((height, width, 3), np.uint8)
            rgb[..., 0], rgb[..., 1] = (x + 3 * i) % 256, (2 * y + i) % 256
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            container.mux(stream.encode(frame))
            pts += gaps_ms[i % len(gaps_ms)]
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_variable_frame_rate_is_sampled_as_decord_samples_it(tmp_path, suffix):
    """The rule on a variable frame rate, decord's: frames are counted in presentation order and sampled evenly by
    that count, and a time window is turned into frame numbers with FFmpeg's average frame rate of the stream (for
    an mp4 frames / duration; a Matroska file's is its time base, 1000), not with the frames' own timestamps."""
    from qvlsearch.video import read_video

    path = str(make_vfr_clip(tmp_path / f"vfr{suffix}"))
    with av.open(path) as container:
        gaps = np.diff(sorted(p.pts for p in container.demux(video=0) if p.size))
    assert len(set(gaps.tolist())) > 3  # truly variable
    for window in ({}, {"fps": 2.0}, {"video_start": 1.0, "video_end": 3.0}):
        expected, expected_metadata = official(path, **window)
        frames, metadata, _ = read_video(path, video_part(path, **window), 16)
        assert metadata == {**expected_metadata, "video_backend": "pyav"}, window
        assert torch.equal(frames, expected), window


def test_a_video_with_no_video_stream_fails_for_decord_too_and_here_in_one_line(tmp_path):
    from qvlsearch.video import read_video

    path = tmp_path / "sound.mp4"
    make_audio_only(path)
    with pytest.raises(Exception):  # noqa: B017 -- decord's own error types
        official(str(path))
    with pytest.raises(MediaError, match="^has no video stream$"):
        read_video(str(path), video_part(str(path)), 16)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_a_truncated_video_as_decord_reads_it(tmp_path, suffix):
    """Cut at 70%: an mp4 whose index (moov) comes first promises frames that are missing, which decord fails on
    and so does this reader, in one line; a Matroska file has no index, and both read the frames that are there."""
    from qvlsearch.video import read_video

    whole = make_clip(tmp_path / "whole.mp4", frames=96)
    source = faststart_copy(whole, tmp_path / "faststart.mp4") if suffix == ".mp4" else tmp_path / "whole.mkv"
    if suffix == ".mkv":
        make_clip(source, frames=96)
    data = source.read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) * 7 // 10])
    if suffix == ".mp4":
        with pytest.raises(Exception):  # noqa: B017 -- decord's, through qwen-vl-utils' fallback
            official(str(path))
        # FFmpeg's error on the cut packet, or, when its frame threads drop that packet, the frames running out
        reason = r"^cannot decode frames \((invalid data found when processing input|the video ends before its last "
        with pytest.raises(MediaError, match=reason + r"sampled frame)\)$"):
            read_video(str(path), video_part(str(path)), 16)
        return
    expected, expected_metadata = official(str(path))
    frames, metadata, _ = read_video(str(path), video_part(str(path)), 16)
    assert 0 < metadata["total_num_frames"] < 96
    assert metadata == {**expected_metadata, "video_backend": "pyav"}
    assert torch.equal(frames, expected)


@pytest.mark.parametrize("suffix, codec", [(".mp4", "libx264"), (".mkv", "libx264"), (".webm", "libvpx-vp9"),
                                           (".avi", "mpeg4"), (".ts", "libx264"), (".mp4", "libx265")])
def test_seeking_gives_the_frames_decoding_everything_gives(tmp_path, suffix, codec):
    """Sparse samples seek to a keyframe and skip non-reference frames (H.264, HEVC); the frames must be those of
    decoding the whole stream in order."""
    from qvlsearch.video import read_video, resize_frame

    options = {"g": "12", "bf": "2"} if codec in ("libx264", "libx265") else {"g": "12"}
    if codec == "libx265":  # one thread and quiet: x265's own pools and frame threads are slow on a busy machine
        options.update({"preset": "ultrafast", "x265-params": "pools=1:frame-threads=1:log-level=error"})
    path = str(make_clip(tmp_path / f"clip{suffix}", codec=codec, options=options))
    with av.open(path) as container:
        every = [torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1) for f in container.decode(video=0)]
    for window in ({}, {"video_start": 2.3, "video_end": 7.9}, {"fps": 4.0}):
        frames, metadata, _ = read_video(path, video_part(path, **window), 16)
        assert metadata["total_num_frames"] <= len(every) == 240
        size = tuple(frames.shape[-2:])
        expected = torch.stack([resize_frame(every[i], size) for i in metadata["frames_indices"]]).float()
        assert torch.equal(frames, expected), window


@pytest.mark.parametrize("case, reason", [
    ("audio only", "has no video stream"),
    ("one frame", "has 1 frame(s); at least 2 are needed"),
    ("truncated", "cannot"),
    ("corrupt", "cannot read video"),
    ("window past the end", "cannot sample frames"),
])
def test_bad_videos_give_a_one_line_reason(tmp_path, case, reason):
    from qvlsearch.media import VisionOptions, content_parts, load_media

    path = tmp_path / "x.mp4"
    item = {"video": str(path)}
    if case == "audio only":
        make_audio_only(path)
    elif case == "one frame":
        make_video(path, frames=1)
    elif case == "truncated":
        whole = make_video(tmp_path / "whole.mp4", frames=60).read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif case == "corrupt":
        path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    else:
        make_video(path, frames=12)
        item.update(video_start=30.0, video_end=40.0)
    with pytest.raises(MediaError) as info:
        load_media(content_parts(item, VisionOptions()))
    assert reason in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith(f"video '{path}': ")


# --- images: signature, pixel cap, memory -----------------------------------------------------------------------


def png_bytes(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (40, 120, 200)).save(out, format="PNG")
    return out.getvalue()


def test_image_over_the_pixel_cap_is_refused_before_decoding(embedder, tmp_path):
    from qvlsearch.media import MAX_IMAGE_PIXELS

    side = int(MAX_IMAGE_PIXELS**0.5) + 100
    big = png_bytes((side, side))
    (tmp_path / "a.png").write_bytes(big)
    (tmp_path / "b.png").write_bytes(png_bytes((64, 48)))
    message = f"image has too many pixels: {side}x{side} is {side * side / 1e6:.0f} MP, the cap is 120 MP"
    for item in ({"image": data_uri(big, "image/png")}, {"image": str(tmp_path / "a.png")},
                 {"video": [str(tmp_path / "b.png"), str(tmp_path / "a.png")]},
                 {"video": [data_uri(big, "image/png"), str(tmp_path / "b.png")]}):
        with pytest.raises(MediaError, match=message):
            embedder.embed([item])


def test_a_50_megapixel_photo_is_read(embedder, tmp_path):
    path = tmp_path / "camera.jpg"
    Image.new("RGB", (8660, 5774), (90, 60, 30)).save(path, quality=80)
    assert embedder.embed([{"image": str(path)}]).shape[0] == 1


def test_image_content_is_checked_by_signature(embedder, tmp_path):
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    for image in (data_uri(svg, "image/svg+xml"), data_uri(b"#EXTM3U\n", "image/png")):
        with pytest.raises(MediaError, match=r"not a readable image \((text|an HLS playlist); JPEG, PNG"):
            embedder.embed([{"image": image}])


MEMORY_SCRIPT = textwrap.dedent("""
    import base64, sys
    from qvlsearch.media import VisionOptions, content_parts, load_media

    def peak_kib():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

    data = open(sys.argv[1], "rb").read()
    uris = ["data:image/png;base64," + base64.b64encode(data).decode()] * 3
    item = {"video": uris} if sys.argv[2] == "video" else {"image": uris}
    before = peak_kib()
    media = load_media(content_parts(item, VisionOptions()))
    print((peak_kib() - before) // 1024)
""")


@pytest.mark.parametrize(("item", "bound_mib"), [("video", 1024), ("image", 400)])
def test_three_8000px_pngs_are_decoded_one_at_a_time_without_full_size_copies(tmp_path, item, bound_mib):
    """A frame list, or an item's images, decode and resize one picture at a time, and an RGB picture is
    resized before anything copies it whole (a frame list grew peak memory by 4.8 GB before, and three images
    by 551 MiB before the copy went, 306 after)."""
    path = tmp_path / "flat.png"
    path.write_bytes(png_bytes((8000, 8000)))
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(path), item], capture_output=True, text=True,
                         check=True, timeout=600).stdout.split()
    growth_mib = int(out[-1])
    print(f"peak RSS growth: {growth_mib} MiB")
    assert growth_mib < bound_mib
