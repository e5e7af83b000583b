"""A contact sheet: one JPEG with a thumbnail per result, its rank and scores underneath."""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .errors import InputError
from .fs import file_item
from .limits import MAX_IMAGE_PIXELS
from .moments import place
from .orientation import orientation_of, upright
from .pages import PdfPage
from .raw import is_raw_name, open_raw
from .search import SearchResult
from .signatures import HEAD_BYTES, RAW_FORMATS, image_format

THUMB = 256
CAPTION = 40
COLUMNS = 5


def thumbnail(result: SearchResult, size: int = THUMB) -> Image.Image:
    """The picture for a result, at most `size` pixels a side: the image (turned upright by its EXIF
    orientation), the page of a PDF, a middle frame of a video (of its moment), or a card with the text's start."""
    path = result.fs_path or result.path
    try:
        if result.kind == "pdf":
            image = PdfPage(path, result.page or 1).render(4 * size * size)
        elif result.kind == "image":
            image = photo(path, size)
        elif result.kind == "video":
            from .video import frame_count_and_rate, frame_image

            frames, fps = frame_count_and_rate(path)
            middle = frames // 2
            if result.start_s is not None:  # the frame in the middle of the moment
                middle = int((result.start_s + result.end_s) / 2 * (fps or 1))
            image = frame_image(path, middle)
        else:
            image = text_card(file_item(path, "text")["text"][:600])
    except Exception as exc:  # an unreadable file still gets a tile
        image = text_card(f"cannot show this file:\n{exc}")
    image.thumbnail((size, size))
    return image


def photo(path: str, size: int = THUMB) -> Image.Image:
    """A photo as shown (its EXIF orientation applied) for a tile of `size`: a RAW file's preview, or its
    half-size demosaic."""
    with open(path, "rb") as file:
        found = image_format(file.read(HEAD_BYTES))
    if found in RAW_FORMATS | {"tiff"} and is_raw_name(path):
        return open_raw(path, MAX_IMAGE_PIXELS, needed_pixels=size * size)
    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # a JPEG decodes at 1/2 to 1/8 size: faster, and enough for a tile
        return upright(image.convert("RGB"), orientation_of(image))


def text_card(text: str) -> Image.Image:
    card = Image.new("RGB", (THUMB, THUMB), (250, 248, 240))
    lines = [wrapped for line in text.splitlines() for wrapped in textwrap.wrap(line, 38) or [""]]
    ImageDraw.Draw(card).multiline_text((8, 8), "\n".join(lines[:18]), fill=(30, 30, 30), font=ImageFont.load_default())
    return card


def caption(result: SearchResult) -> str:
    scores = f"score {result.score:.3f}" if result.score is not None else "no score"
    if result.reranked:
        scores += f"  rerank {result.rerank_score:.3f}" if result.rerank_score is not None else "  rerank -"
    where = place({"page": result.page, "start_s": result.start_s, "end_s": result.end_s}).replace("–", "-")
    return f"#{result.rank}  {scores}\n{os.path.basename(result.path)[:40 - len(where) - 1]} {where}".rstrip()


def check_sheet_path(path: str | os.PathLike) -> None:
    """Raise InputError unless a contact sheet can be saved at `path`: an image suffix, in an existing folder."""
    path = Path(path)
    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        raise InputError(f"--contact-sheet {path}: name it with an image suffix such as .jpg or .png")
    if not path.parent.is_dir():
        raise InputError(f"--contact-sheet {path}: there is no folder {path.parent}; create it first")


def write_contact_sheet(results: Sequence[SearchResult], path: str | os.PathLike) -> Path:
    """Lay the results out in a grid and save as JPEG (or PNG, by the file's suffix)."""
    check_sheet_path(path)
    columns = max(1, min(COLUMNS, len(results)))
    rows = max(1, math.ceil(len(results) / columns))
    sheet = Image.new("RGB", (columns * THUMB, rows * (THUMB + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, result in enumerate(results):
        x, y = (i % columns) * THUMB, (i // columns) * (THUMB + CAPTION)
        tile = thumbnail(result)
        sheet.paste(tile, (x + (THUMB - tile.width) // 2, y + (THUMB - tile.height) // 2))
        draw.multiline_text((x + 6, y + THUMB + 3), caption(result), fill="black", font=ImageFont.load_default())
    path = Path(path)
    try:
        sheet.save(path, quality=88) if path.suffix.lower() in (".jpg", ".jpeg") else sheet.save(path)
    except OSError as exc:
        raise InputError(f"cannot write the contact sheet {path}: {exc.strerror or exc}") from None
    return path
