"""A contact sheet: one JPEG with a thumbnail per result, its rank and scores underneath."""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .moments import place
from .pages import PdfPage
from .search import SearchResult

THUMB = 256
CAPTION = 40
COLUMNS = 5


def thumbnail(result: SearchResult) -> Image.Image:
    """The picture for a result: the image, a middle frame of a video, or a card with the text's start."""
    path = result.fs_path or result.path
    try:
        if result.kind == "pdf":
            image = PdfPage(path, result.page or 1).render(4 * THUMB * THUMB)
        elif result.kind == "image":
            with Image.open(path) as image:
                image = image.convert("RGB")
        elif result.kind == "video":
            import decord

            reader = decord.VideoReader(path)
            middle = len(reader) // 2
            if result.start_s is not None:  # the frame in the middle of the moment
                middle = min(len(reader) - 1, int((result.start_s + result.end_s) / 2 * (reader.get_avg_fps() or 1)))
            image = Image.fromarray(reader[middle].asnumpy())
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                image = text_card(f.read(600))
    except Exception as exc:  # an unreadable file still gets a tile
        image = text_card(f"cannot show this file:\n{exc}")
    image.thumbnail((THUMB, THUMB))
    return image


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


def write_contact_sheet(results: Sequence[SearchResult], path: str | os.PathLike) -> Path:
    """Lay the results out in a grid and save as JPEG (or PNG, by the file's suffix)."""
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
    sheet.save(path, quality=88) if path.suffix.lower() in (".jpg", ".jpeg") else sheet.save(path)
    return path
