"""When, where and with what a photo or video was taken, from its EXIF or container metadata.

`read_metadata(path, kind)` gives `taken_at` (a UTC datetime), `lat`, `lon` (degrees) and
`camera`, each None when the file does not say or says something that cannot be right
(a wrong type, a date in the future, a latitude of 200°): odd metadata never fails a file.
EXIF dates carry no time zone unless the camera wrote OffsetTimeOriginal; without it (or with
one that is no offset: past ±14:00, or minutes over 59) the camera's clock is taken as UTC. Each
field is read on its own: a bad one costs only itself. HEIC/HEIF and AVIF photos are read like JPEGs
(pillow-heif, Pillow); camera RAW files as `raw.raw_exif` says.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Callable
from typing import Any

import pillow_heif
from PIL import ExifTags, Image

from .raw import is_raw_name, raw_exif
from .signatures import RAW_FORMATS, image_format

log = logging.getLogger(__name__)
FIELDS = ("taken_at", "lat", "lon", "camera")
EARLIEST = dt.datetime(1826, 1, 1, tzinfo=dt.timezone.utc)  # the oldest surviving photograph
OFFSET = re.compile(r"([+-])(\d\d):(\d\d)")  # EXIF OffsetTime: +02:00
MAX_OFFSET = dt.timedelta(hours=14)  # the zones in use run from UTC-12:00 to UTC+14:00
pillow_heif.register_heif_opener()  # HEIC/HEIF EXIF (media registers it too; it may be imported alone)
ISO6709 = re.compile(r"^([+-]\d+(?:\.\d+)?)([+-]\d+(?:\.\d+)?)")  # QuickTime's location: +48.8577+002.2950+035/


def read_metadata(path: str, kind: str | None) -> dict[str, Any]:
    """The date taken, GPS position and camera of an image or video; every field None when unknown."""
    empty = dict.fromkeys(FIELDS)
    try:
        found = image_metadata(path) if kind == "image" else video_metadata(path) if kind == "video" else {}
    except Exception as exc:  # any decoder's complaint about odd metadata leaves the fields empty
        log.info("%s: metadata not read (%s: %s)", path, type(exc).__name__, exc)
        return empty
    return {**empty, **{k: v for k, v in found.items() if v is not None}}


def image_metadata(path: str) -> dict[str, Any]:
    with open(path, "rb") as file:
        head = file.read(16)
    if (image_format(head) in RAW_FORMATS or image_format(head) == "tiff") and is_raw_name(path):
        exif = raw_exif(path)
    else:
        with Image.open(path) as image:
            if image.format == "PNG" and "exif" not in image.info:
                return {}  # no eXIf chunk before the pixels: looking after them would decode the whole image
            exif = image.getexif()
    position = field_of(path, "GPS", exif_position, exif) or {}
    return {"taken_at": field_of(path, "date", exif_taken, exif), **position,
            "camera": field_of(path, "camera", exif_camera, exif)}


def field_of(path: str, name: str, read: Callable[..., Any], *args: Any) -> Any:
    """`read(*args)`, or None when the field is malformed in a way no check foresaw (logged)."""
    try:
        return read(*args)
    except Exception as exc:  # noqa: BLE001 - odd metadata never fails a file, nor the other fields
        log.info("%s: %s not read (%s: %s)", path, name, type(exc).__name__, exc)
        return None


def exif_taken(exif: Image.Exif) -> dt.datetime | None:
    details = exif.get_ifd(ExifTags.IFD.Exif)
    return (exif_date(details.get(ExifTags.Base.DateTimeOriginal), details.get(ExifTags.Base.OffsetTimeOriginal),
                      details.get(ExifTags.Base.SubsecTimeOriginal))
            or exif_date(exif.get(ExifTags.Base.DateTime), details.get(ExifTags.Base.OffsetTime),
                         details.get(ExifTags.Base.SubsecTime)))


def exif_position(exif: Image.Exif) -> dict[str, float | None]:
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    lat = gps_degrees(gps.get(ExifTags.GPS.GPSLatitude), gps.get(ExifTags.GPS.GPSLatitudeRef), "NS", 90)
    lon = gps_degrees(gps.get(ExifTags.GPS.GPSLongitude), gps.get(ExifTags.GPS.GPSLongitudeRef), "EW", 180)
    return {"lat": lat, "lon": lon} if lat is not None and lon is not None else {}


def exif_camera(exif: Image.Exif) -> str | None:
    return camera_name(exif.get(ExifTags.Base.Make), exif.get(ExifTags.Base.Model))


def video_metadata(path: str) -> dict[str, Any]:
    import av

    with av.open(path) as container:
        tags = {k.lower(): v for k, v in container.metadata.items()}
    taken = iso_date(tags.get("creation_time") or tags.get("com.apple.quicktime.creationdate"))
    location = tags.get("com.apple.quicktime.location.iso6709") or tags.get("location")
    lat = lon = None
    if isinstance(location, str) and (match := ISO6709.match(location.strip())):
        lat, lon = float(match[1]), float(match[2])
        if not (-90 <= lat <= 90 and -180 <= lon <= 180):
            lat = lon = None
    camera = camera_name(tags.get("com.apple.quicktime.make") or tags.get("make"),
                         tags.get("com.apple.quicktime.model") or tags.get("model"))
    return {"taken_at": taken, "lat": lat, "lon": lon, "camera": camera}


def plausible(when: dt.datetime) -> dt.datetime | None:
    """`when` in UTC, or None when it is before photography or more than a day in the future."""
    try:
        when = when.astimezone(dt.timezone.utc) if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
    except OverflowError:  # year 1 or 9999 with an offset: beyond what a datetime holds in UTC
        return None
    latest = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
    return when if EARLIEST <= when <= latest else None


def exif_date(value: Any, offset: Any, subsec: Any = None) -> dt.datetime | None:
    """An EXIF date ('2024:05:01 14:30:00', offset '+02:00', fraction of its second '35' for .35) as UTC; None
    when it is no such text. An offset that is not one (+24:00, +10:60, 'later') is ignored: the clock is taken
    as UTC; so is a fraction that is not digits. The fraction tells a burst's frames apart: a phone takes ten
    in a second, all with the same date to the second."""
    if not isinstance(value, str):
        return None
    try:
        when = dt.datetime.strptime(value.strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    digits = subsec.strip("\x00 ")[:6] if isinstance(subsec, str) else ""
    if digits.isdigit() and digits.isascii():
        when = when.replace(microsecond=int(digits.ljust(6, "0")))
    zone = utc_offset(offset)
    return plausible(when.replace(tzinfo=zone) if zone else when)


def utc_offset(value: Any) -> dt.timezone | None:
    """An EXIF offset ('+02:00', '-05:30') as a time zone; None when it is none (minutes past 59, beyond ±14:00)."""
    found = OFFSET.fullmatch(value.strip("\x00 ")) if isinstance(value, str) else None
    if not found or int(found[3]) > 59:
        return None
    offset = dt.timedelta(hours=int(found[2]), minutes=int(found[3]))
    return dt.timezone(-offset if found[1] == "-" else offset) if offset <= MAX_OFFSET else None


def iso_date(value: Any) -> dt.datetime | None:
    """A container's ISO 8601 date ('2024-05-01T12:00:00.000000Z') as UTC; None when it is no such text."""
    if not isinstance(value, str):
        return None
    try:
        return plausible(dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00")))
    except ValueError:
        return None


def gps_degrees(value: Any, ref: Any, refs: str, limit: float) -> float | None:
    """EXIF GPS (degrees, minutes, seconds) and its N/S or E/W reference as signed degrees."""
    try:
        degrees, minutes, seconds = (float(part) for part in value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    result = degrees + minutes / 60 + seconds / 3600
    if isinstance(ref, bytes):
        ref = ref.decode("ascii", "replace")
    if isinstance(ref, str) and ref.strip("\x00 ").upper() == refs[1]:
        result = -result
    return result if abs(result) <= limit else None


def camera_name(make: Any, model: Any) -> str | None:
    """'Make Model', without the make twice when the model repeats it ('Canon Canon EOS R5')."""
    make, model = (v.strip("\x00 ") if isinstance(v, str) else "" for v in (make, model))
    if model.lower().startswith(make.lower()):
        make = ""
    return " ".join(part for part in (make, model) if part) or None
