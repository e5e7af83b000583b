"""Small media files written on the fly by tests (a helper module, not a test module)."""

import struct
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image


def make_video(
    path: str | PathLike[str],
    frames: int = 12,
    fps: int = 6,
    size: tuple[int, int] = (128, 96),
    codec: str = "libx264",
) -> Path:
    """Write a clip of a white square sliding over a scrolling gradient, in yuv420p; `size` must be even."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    side = height // 3
    ramp = np.linspace(0, 255, width, dtype=np.float32)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            shift = np.roll(ramp, i * width // frames).astype(np.uint8)
            rgb = np.zeros((height, width, 3), dtype=np.uint8)
            rgb[..., 0] = shift
            rgb[..., 2] = 255 - shift
            left = (width - side) * i // max(frames - 1, 1)
            top = (height - side) // 2
            rgb[top : top + side, left : left + side] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return path


def make_audio_only(path: str | PathLike[str]) -> None:
    """An .mp4 with sound and no video frames."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for _ in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_image(
    path: str | PathLike[str],
    size: tuple[int, int] = (64, 48),
    color: tuple[int, int, int] = (200, 30, 30),
) -> Path:
    """Write a solid-colour RGB image; Pillow picks the format from the suffix (.png, .jpg, .webp, .gif, …)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def make_three_part_video(path: str | PathLike[str], seconds_each: int = 10, fps: int = 2,
                          size: tuple[int, int] = (128, 96)) -> Path:
    """A clip in three parts of `seconds_each`: solid red, then solid blue, then a moving black-and-white
    checkerboard; each part's windows look alike and unlike the others'."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(3 * seconds_each * fps):
            part = i // (seconds_each * fps)
            rgb = np.zeros((height, width, 3), dtype=np.uint8)
            if part == 0:
                rgb[..., 0] = 220
            elif part == 1:
                rgb[..., 2] = 220
            else:
                rgb[...] = (((x + 4 * i) // 16 + y // 16) % 2 * 255)[..., None]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return path


def make_pdf(path: str | PathLike[str], pages: list[Image.Image]) -> Path:
    """A PDF with one page per image (Pillow writes it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    first, *rest = [page.convert("RGB") for page in pages]
    first.save(path, save_all=True, append_images=rest, resolution=72)
    return path


def make_color_video(path: str | PathLike[str], rgb: tuple[int, int, int], seconds: int = 4, fps: int = 2,
                     size: tuple[int, int] = (128, 96)) -> Path:
    """A clip of one solid colour (a query for one part of `make_three_part_video`)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    frame[...] = rgb
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for _ in range(seconds * fps):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def make_text_pdf(path: str | PathLike[str], pages: list[list[str]]) -> Path:
    """A PDF whose pages hold these lines as real text (a text layer in the standard Helvetica font), written
    as PDF syntax with a correct cross-reference table. Lines are ASCII."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = len(pages)
    objects = ["<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(count))}] /Count {count} >>",
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, lines in enumerate(pages):
        shown = " ".join(f"({line}) Tj 0 -18 Td" for line in lines)  # no backslashes or parentheses
        stream = f"BT /F1 14 Tf 72 720 Td {shown} ET"
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                       f"/Contents {5 + 2 * i} 0 R >>")
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode("ascii")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode("ascii")
    out += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode("ascii")
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode("ascii")
    path.write_bytes(bytes(out))
    return path


def make_photo(
    path: str | PathLike[str],
    *,
    taken: str | None = None,
    offset: str | None = None,
    gps: tuple[float, float] | None = None,
    camera: tuple[str, str] | None = None,
    source: str | PathLike[str] | None = None,
    size: tuple[int, int] = (64, 48),
    quality: int = 90,
    description: str | None = None,
) -> Path:
    """Write a JPEG with EXIF as a camera writes it: DateTimeOriginal ('2021:07:14 10:30:00') and its offset,
    GPS as degrees/minutes/seconds with N/S and E/W, Make and Model. `source`: an image to copy (resized)."""
    from PIL import ExifTags

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.open(source).convert("RGB").resize(size) if source else Image.new("RGB", size, (120, 60, 30))
    exif = Image.Exif()
    if camera:
        exif[ExifTags.Base.Make], exif[ExifTags.Base.Model] = camera
    if description:
        exif[ExifTags.Base.ImageDescription] = description
    if taken:
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = taken
    if offset:
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.OffsetTimeOriginal] = offset
    if gps:
        info = exif.get_ifd(ExifTags.IFD.GPSInfo)
        for value, ref_tag, tag, refs in ((gps[0], ExifTags.GPS.GPSLatitudeRef, ExifTags.GPS.GPSLatitude, "NS"),
                                          (gps[1], ExifTags.GPS.GPSLongitudeRef, ExifTags.GPS.GPSLongitude, "EW")):
            degrees = abs(value)
            minutes = (degrees - int(degrees)) * 60
            info[ref_tag] = refs[value < 0]
            info[tag] = (float(int(degrees)), float(int(minutes)), round((minutes - int(minutes)) * 60, 4))
    image.save(path, exif=exif, quality=quality)
    return path


def set_creation_time(source: str | PathLike[str], path: str | PathLike[str], when: str,
                      location: str | None = None) -> Path:
    """Copy a video's packets into `path` with the container tags a phone writes: creation_time
    ('2022-03-04T05:06:07.000000Z') and an ISO 6709 location ('+48.8577+002.2950/')."""
    tags = {"creation_time": when, **({"location": location} if location else {})}
    return copy_video_packets(source, path, tags=tags)


def copy_video_packets(source: str | PathLike[str], path: str | PathLike[str], tags: dict[str, str] | None = None,
                       options: dict[str, str] | None = None) -> Path:
    """A new container at `path` holding the video packets of `source` as they are (no re-encoding), with the
    container `tags` and muxer `options` given."""
    import av

    path = Path(path)
    with av.open(str(source)) as src, av.open(str(path), "w", options=options or {}) as dst:
        dst.metadata.update(tags or {})
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)
    return path


def make_encrypted_pdf(path: str | PathLike[str]) -> Path:
    """A one-page PDF whose trailer names a Standard security handler with a password nobody knows."""
    path = Path(path)
    make_pdf(path, [Image.new("RGB", (100, 100), (200, 30, 30))])
    data = path.read_bytes()
    at = data.rindex(b"trailer")
    lock = (b"/Encrypt << /Filter /Standard /V 1 /R 2 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32 + b"> /P -4 >>\n"
            b"/ID [<" + b"33" * 16 + b"> <" + b"33" * 16 + b">]\n")
    path.write_bytes(data[:at] + data[at:].replace(b"<<", b"<<\n" + lock, 1))
    return path


APPLE_XMP = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
             '<rdf:Description xmlns:apple-fi="http://ns.apple.com/faceinfo/1.0/" '
             'apple-fi:ContentIdentifier="{}"/></rdf:RDF></x:xmpmeta>')


def apple_makernote(identifier: str) -> bytes:
    """An Apple MakerNote as an iPhone writes it, holding only the content identifier (tag 0x11, ASCII)."""
    text = identifier.encode() + b"\x00"
    value_at = 14 + 2 + 12 + 4  # after the header, the entry count, one entry and the next-IFD offset
    return (b"Apple iOS\x00" + b"\x00\x01" + b"MM" + struct.pack(">H", 1)
            + struct.pack(">HHII", 0x11, 2, len(text), value_at) + b"\x00" * 4 + text)


def make_still(path: Path, source: str | PathLike[str], *, makernote_id: str | None = None,
               xmp_id: str | None = None) -> Path:
    """A phone's still: a JPEG with the Live Photo content identifier in its MakerNote or XMP."""
    from PIL import ExifTags

    exif = Image.Exif()
    if makernote_id:
        exif.get_ifd(ExifTags.IFD.Exif)[0x927C] = apple_makernote(makernote_id)
    extra = {"xmp": APPLE_XMP.format(xmp_id).encode()} if xmp_id else {}
    Image.open(source).convert("RGB").resize((96, 72)).save(path, exif=exif, quality=90, **extra)
    return path


def make_live_video(path: Path, identifier: str | None, seconds: int = 3) -> Path:
    """A Live Photo's motion part: a short QuickTime movie with Apple's content identifier tag."""
    import av

    with av.open(str(path), "w", format="mov", options={"movflags": "use_metadata_tags"}) as container:
        if identifier:
            container.metadata["com.apple.quicktime.content.identifier"] = identifier
        stream = container.add_stream("mpeg4", rate=2)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(seconds * 2):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 30 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def make_burst(folder: Path, source: str | PathLike[str], within_a_second: bool = False) -> None:
    """Three frames of a burst, one second apart (the camera moved a little), or within one second as a phone
    takes them (the same date to the second, told apart by SubSecTimeOriginal), and a re-encoded, resized copy
    of the first with the same date taken."""
    from PIL import ExifTags

    image = Image.open(source).convert("RGB").resize((320, 240))
    for i in range(3):
        exif = Image.Exif()
        details = exif.get_ifd(ExifTags.IFD.Exif)
        details[ExifTags.Base.DateTimeOriginal] = f"2023:08:01 12:00:0{0 if within_a_second else i}"
        if within_a_second:
            details[ExifTags.Base.SubsecTimeOriginal] = f"{100 + 333 * i}"
        image.crop((2 * i, i, 300 + 2 * i, 225 + i)).save(folder / f"burst_{i + 1}.jpg", exif=exif, quality=92)
    first = Image.open(folder / "burst_1.jpg")
    first.resize((240, 180)).save(folder / "burst_1 copy.jpg", exif=first.getexif(), quality=70)
