"""Dates, places, descriptions and keywords that live beside a photo, in sidecar files.

Two kinds are read: Google Takeout's JSON (`IMG_1234.jpg.json`, the newer
`IMG_1234.jpg.supplemental-metadata.json`, names Takeout cut short such as `IMG_1234.jp.json`, and the
original's JSON for an `IMG_1234-edited.jpg`) and XMP as Lightroom, darktable and digiKam write it
(`IMG_1234.xmp`, `IMG_1234.jpg.xmp`, or the RAW's `IMG_1234.CR2.xmp` for the JPEG of a RAW+JPEG pair).
`sidecar_names` finds a photo's sidecars among the names in its folder; `read_sidecars` gives their
`taken_at`, `lat`, `lon`, `description` and `keywords`, XMP before JSON, for the indexer to fill what the
photo itself does not say.

XML is parsed with defusedxml, which refuses any DTD (and so every entity): an XMP packet never needs one,
and a "billion laughs" sidecar must cost nothing. ElementTree alone would expand internal entities.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .metadata import plausible

SIDECAR_SUFFIXES = (".json", ".xmp")
SIDECAR_FIELDS = ("taken_at", "lat", "lon", "description", "keywords")
MAX_SIDECAR_BYTES = 4 << 20  # a sidecar is a few kilobytes; a bigger one is no sidecar
TAKEOUT_NAME_LIMIT = 46  # Takeout cuts a JSON's whole name (".json" included) to 46 or 47 characters
SUPPLEMENTAL = ".supplemental-metadata"
EDITED = "-edited"
NUMBERED = re.compile(r"^(.*)(\(\d+\))$")  # IMG_1234(1).jpg: Takeout's JSON is IMG_1234.jpg(1).json
XMP_GPS = re.compile(r"\s*(\d+(?:\.\d+)?)(?:,(\d+(?:\.\d+)?))?(?:,(\d+(?:\.\d+)?))?\s*([NSEW])\s*", re.IGNORECASE)

RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
EXIF_NS = "{http://ns.adobe.com/exif/1.0/}"
XMP_NS = "{http://ns.adobe.com/xap/1.0/}"
PHOTOSHOP_NS = "{http://ns.adobe.com/photoshop/1.0/}"
DC_NS = "{http://purl.org/dc/elements/1.1/}"
XMP_DATES = (EXIF_NS + "DateTimeOriginal", PHOTOSHOP_NS + "DateCreated", XMP_NS + "CreateDate")


class SidecarError(Exception):
    """A sidecar that cannot be used; the message is one line naming it and why."""


def is_sidecar_name(name: str) -> bool:
    return name.lower().endswith(SIDECAR_SUFFIXES)


@dataclass(frozen=True)
class SidecarFolder:
    """The sidecars in a folder, as `sidecar_names` looks them up: by casefolded name, and the lengths of the
    JSON names' stems (longest first), so that a photo's name is cut only where a JSON could match."""

    by_folded: dict[str, str]
    json_lengths: tuple[int, ...]

    @classmethod
    def of(cls, names: Iterable[str]) -> SidecarFolder:
        by_folded = {n.casefold(): n for n in names}
        lengths = {len(n) - len(".json") for n in by_folded if n.endswith(".json")}
        return cls(by_folded, tuple(sorted(lengths, reverse=True)))


def sidecar_names(name: str, folder: SidecarFolder, companions: Sequence[str] = ()) -> list[str]:
    """The sidecars of the file `name` among those in its folder, XMP first: its own XMP, then its
    `companions`' (a RAW beside a JPEG), then its Takeout JSON. Names match whatever their case."""
    by_folded = folder.by_folded
    found: list[str] = []
    for owner in (name, *companions):
        stem = os.path.splitext(owner)[0]
        for candidate in (owner + ".xmp", stem + ".xmp"):
            real = by_folded.get(candidate.casefold())
            if real and real not in found:
                found.append(real)
    takeout = takeout_name(name, folder) if folder.json_lengths else None
    if takeout is None and folder.json_lengths:
        stem, suffix = os.path.splitext(name)
        if stem.casefold().endswith(EDITED):  # an edited copy: the original's JSON
            takeout = takeout_name(stem[:-len(EDITED)] + suffix, folder)
    return found + ([takeout] if takeout else [])


def takeout_name(name: str, folder: SidecarFolder) -> str | None:
    """The Takeout JSON of `name` among the folder's sidecars (casefolded name -> name), or None: the full
    name's, the supplemental form's, or one cut short (its stem a prefix of either, keeping at least the
    photo's stem, or cut at Takeout's limit)."""
    by_folded = folder.by_folded
    stem, suffix = os.path.splitext(name)
    numbered = NUMBERED.match(stem)
    if numbered and (real := by_folded.get(f"{numbered[1]}{suffix}{numbered[2]}.json".casefold())):
        return real  # IMG_1234(1).jpg -> IMG_1234.jpg(1).json
    full = (name + SUPPLEMENTAL).casefold()
    shortest = min(len(stem), TAKEOUT_NAME_LIMIT - len(".json"))
    for end in folder.json_lengths:  # the longest match first: the exact name before a cut one
        if shortest <= end <= len(full) and (real := by_folded.get(full[:end] + ".json")):
            return real
    return None


def read_sidecars(paths: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """The fields the sidecars at `paths` give (the first to give a field wins) and one warning line for each
    sidecar that cannot be used."""
    fields: dict[str, Any] = {}
    warnings = []
    for path in paths:
        try:
            found = read_sidecar(path)
        except SidecarError as exc:
            warnings.append(str(exc))
            continue
        if "lat" in found and "lat" in fields:  # a position is a pair: never one sidecar's lat with another's lon
            del found["lat"], found["lon"]
        fields = {**found, **fields}
    return fields, warnings


def fill(own: dict[str, Any], found: dict[str, Any]) -> dict[str, Any]:
    """A file's own metadata (`own`) with the sidecars' fields (`found`) where it has none: its date taken, its
    position (both coordinates, or neither), and the description and keywords only sidecars give."""
    filled = {**own, **{k: v for k, v in found.items() if k in ("description", "keywords")}}
    if own.get("taken_at") is None and found.get("taken_at") is not None:
        filled["taken_at"] = found["taken_at"]
    if (own.get("lat") is None or own.get("lon") is None) and found.get("lat") is not None:
        filled["lat"], filled["lon"] = found["lat"], found["lon"]
    return filled


def read_sidecar(path: str) -> dict[str, Any]:
    """One sidecar's fields (only those it gives); SidecarError when it cannot be read or parsed."""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_SIDECAR_BYTES + 1)
    except OSError as exc:
        raise SidecarError(f"sidecar {name} not read: {exc.strerror or exc}") from None
    if len(data) > MAX_SIDECAR_BYTES:
        raise SidecarError(f"sidecar {name} ignored: over {MAX_SIDECAR_BYTES >> 20} MiB, too big for a sidecar")
    if name.lower().endswith(".xmp"):
        return xmp_fields(parse_xmp(data, name))
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise SidecarError(f"sidecar {name} ignored: not JSON ({str(exc).splitlines()[0]})") from None
    return takeout_fields(document) if isinstance(document, dict) else {}


def takeout_fields(document: dict[str, Any]) -> dict[str, Any]:
    """Takeout's photoTakenTime, geoData (else geoDataExif; 0,0 means none) and description."""
    fields: dict[str, Any] = {}
    taken = document.get("photoTakenTime")
    if isinstance(taken, dict):
        try:
            when = dt.datetime.fromtimestamp(int(taken.get("timestamp")), dt.timezone.utc)
        except (TypeError, ValueError, OverflowError, OSError):
            when = None
        if when is not None and (when := plausible(when)) is not None:
            fields["taken_at"] = when
    for key in ("geoData", "geoDataExif"):
        geo = document.get(key)
        if isinstance(geo, dict) and (position := checked_position(geo.get("latitude"), geo.get("longitude"))):
            fields["lat"], fields["lon"] = position
            break
    description = document.get("description")
    if isinstance(description, str) and description.strip():
        fields["description"] = description.strip()
    return fields


def checked_position(lat: Any, lon: Any) -> tuple[float, float] | None:
    """(lat, lon) in degrees when both are numbers on the globe and not 0,0 (how Takeout says "unknown")."""
    if isinstance(lat, bool) or isinstance(lon, bool) or not all(isinstance(v, int | float) for v in (lat, lon)):
        return None
    if (lat, lon) == (0, 0) or not (-90 <= lat <= 90 and -180 <= lon <= 180):
        return None
    return float(lat), float(lon)


def parse_xmp(data: bytes, name: str) -> dict[str, Any]:
    """The properties of an XMP packet, by '{namespace}Name': text, or a list for an rdf:Bag, Seq or Alt.
    SidecarError when it is no XML or declares a DTD (defusedxml refuses it: no entity is ever expanded)."""
    from xml.etree.ElementTree import ParseError

    from defusedxml import DefusedXmlException
    from defusedxml.ElementTree import fromstring

    try:
        root = fromstring(data, forbid_dtd=True)
    except DefusedXmlException:
        raise SidecarError(f"sidecar {name} refused: it declares a DTD or entities, which XMP never needs "
                           "(an XML bomb guard); remove the DOCTYPE") from None
    except ParseError as exc:
        raise SidecarError(f"sidecar {name} ignored: not XML ({exc})") from None
    values: dict[str, Any] = {}
    for description in root.iter(RDF + "Description"):
        for key, value in description.attrib.items():
            values.setdefault(key, value)
        for child in description:
            items = [li.text.strip() for li in child.iter(RDF + "li") if li.text and li.text.strip()]
            text = (child.text or "").strip()
            values.setdefault(child.tag, items if items else text)
    return values


def xmp_fields(values: dict[str, Any]) -> dict[str, Any]:
    """The date taken (EXIF's, else Photoshop's, else the creation date), GPS position, description and
    keywords of parsed XMP properties."""
    fields: dict[str, Any] = {}
    for key in XMP_DATES:
        if (when := xmp_date(values.get(key))) is not None:
            fields["taken_at"] = when
            break
    lat = xmp_degrees(values.get(EXIF_NS + "GPSLatitude"), "NS", 90)
    lon = xmp_degrees(values.get(EXIF_NS + "GPSLongitude"), "EW", 180)
    if lat is not None and lon is not None:
        fields["lat"], fields["lon"] = lat, lon
    description = values.get(DC_NS + "description")
    description = description[0] if isinstance(description, list) and description else description
    if isinstance(description, str) and description.strip():
        fields["description"] = description.strip()
    keywords = values.get(DC_NS + "subject")
    keywords = [keywords] if isinstance(keywords, str) and keywords else keywords
    if keywords:
        fields["keywords"] = list(dict.fromkeys(keywords))
    return fields


def xmp_date(value: Any) -> dt.datetime | None:
    """An XMP date ('2024-05-01T14:30:00+02:00', '2024-05-01T14:30', '2024-05-01') in UTC; a date without a
    zone is taken as UTC, like EXIF's."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        when = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return plausible(when)


def xmp_degrees(value: Any, refs: str, limit: float) -> float | None:
    """XMP's GPS coordinate, 'DDD,MM.mmk' or 'DDD,MM,SSk' (k: N, S, E or W), as signed degrees."""
    match = XMP_GPS.fullmatch(value) if isinstance(value, str) else None
    if not match or match[4].upper() not in refs:
        return None
    degrees = float(match[1]) + float(match[2] or 0) / 60 + float(match[3] or 0) / 3600
    degrees = -degrees if match[4].upper() == refs[1] else degrees
    return degrees if abs(degrees) <= limit else None
