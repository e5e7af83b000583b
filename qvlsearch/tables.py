"""Tables for a terminal: `search`/`rerank` hits, `dupes` groups and `eval` figures, laid out to the terminal's width.

No cell is wrapped or cut, except a path, which is shortened from the left (`…/album/cat.jpg`: the file name and
as many of its folders as fit). Columns that do not fit beside the path continue in a block below, with the
table's key columns repeated (as pandas prints a wide frame). Output to a pipe is TSV and never goes through here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.cells import cell_len

ELLIPSIS = "…"
MIN_PATH = 24  # cells a path gets before other columns move to a block below


@dataclass(frozen=True)
class Column:
    header: str
    right: bool = False  # right-justified (numbers)
    key: bool = False  # repeated in every block
    path: bool = False  # shortened from the left to the room left; always shown


def shorten_path(path: str, width: int) -> str:
    """`path` if it fits in `width` cells, else '…' and as much of its end as fits: the file name and the end
    of its folders (or, in a very narrow column, the end of the file name)."""
    if cell_len(path) <= width:
        return path
    end = ""
    for char in reversed(path):
        if cell_len(ELLIPSIS + char + end) > width:
            break
        end = char + end
    return ELLIPSIS + end


def print_table(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int | None = None) -> None:
    """Print rows under bold headers on stdout, within `width` cells (default: the terminal's)."""
    from rich.console import Console

    console = Console(width=width) if width else Console()
    widths = [max([cell_len(c.header)] + [cell_len(row[i]) for row in rows]) for i, c in enumerate(columns)]
    # two spaces between columns; one where that saves a block
    layouts = [(gap, layout(columns, widths, console.width, gap)) for gap in (2, 1)]
    gap, blocks = min(layouts, key=lambda g_b: len(g_b[1]))
    for n, block in enumerate(blocks):
        if n:
            console.print()
        console.print(block_table(columns, widths, rows, block, console.width, gap))


def layout(columns: Sequence[Column], widths: list[int], total: int, gap: int) -> list[list[int]]:
    """The columns of each block: the keys and the path in all, the others in order, as many as fit."""
    always = [i for i, c in enumerate(columns) if c.key or c.path]
    room = total - sum(min(widths[i], MIN_PATH) if columns[i].path else widths[i] for i in always)
    room -= gap * (len(always) - 1)
    rest = [i for i in range(len(columns)) if i not in always]
    blocks = []
    while rest or not blocks:
        chosen, left = [], room
        while rest and (not chosen or widths[rest[0]] + gap <= left):
            left -= widths[rest[0]] + gap
            chosen.append(rest.pop(0))
        blocks.append(sorted(always + chosen))
    return blocks


def block_table(columns: Sequence[Column], widths: list[int], rows: Sequence[Sequence[str]], block: list[int],
                total: int, gap: int):
    from rich.table import Table

    table = Table(box=None, pad_edge=False, padding=(0, 1), collapse_padding=gap == 1, header_style="bold")
    fixed = sum(widths[i] for i in block if not columns[i].path) + gap * (len(block) - 1)
    width = {i: max(1, min(widths[i], total - fixed)) if columns[i].path else widths[i] for i in block}
    for i in block:
        table.add_column(columns[i].header, justify="right" if columns[i].right else "left", no_wrap=True,
                         width=width[i])
    for row in rows:
        table.add_row(*(shorten_path(row[i], width[i]) if columns[i].path else row[i] for i in block))
    return table


def print_results(records: Sequence[Mapping[str, Any]]) -> None:
    """Search or rerank hits: rank, score, rerank score (when reranked), date (when records carry one: `--sort
    date`), kind, path, and where in the file (and the words matched)."""
    reranked, dated = any("rerank_score" in r for r in records), any("date" in r for r in records)
    columns = [Column("#", right=True, key=True), Column("score", right=True)]
    columns += [Column("rerank", right=True)] if reranked else []
    columns += [Column("date")] if dated else []
    columns += [Column("kind"), Column("path", path=True), Column("where", right=True)]
    rows = []
    for r in records:
        shown = r.get("score") if r.get("score") is not None else r.get("words_score")  # words mode: BM25
        rows.append([str(r["rank"]), score(shown), *([score(r.get("rerank_score"))] if reranked else []),
                     *([r.get("date") or ""] if dated else []), r.get("kind", ""), r["path"],
                     where(r) or (f"{r['duration_s']:.1f}s" if r.get("duration_s") else "") or beside(r)])
    print_table(columns, rows)


def where(record: Mapping[str, Any]) -> str:
    """Where in its file a hit is, and for one found by its words, which: 'matched: 4711, p. 2'."""
    from .moments import place

    parts = ([f"matched: {', '.join(record['matched'])}"] if record.get("matched") else []) + [place(record)]
    return ", ".join(part for part in parts if part)


def beside(record: Mapping[str, Any]) -> str:
    """A photo's companions by name: 'live IMG_1.MOV', 'raw IMG_1.DNG'."""
    parts = [f"{label} {os.path.basename(record[name])}" for label, name in (("live", "live_video"),
                                                                              ("raw", "raw_file")) if record.get(name)]
    return ", ".join(parts)


def score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


DUPES_COLUMNS = [Column("group", right=True, key=True), Column("type"), Column(""), Column("similarity", right=True),
                 Column("bytes", right=True), Column("size"), Column("date"), Column("path", path=True)]


def print_dupes(rows: Sequence[Sequence[str]]) -> None:
    """Duplicate groups, one member a row: group, type, keep, similarity, bytes, size, date, path."""
    print_table(DUPES_COLUMNS, rows)


def print_eval(names: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Eval figures, one setting a row; the setting (dim, quantize, mode, rerank_top, or a media setting) is
    repeated in each block."""
    settings = ("dim", "quantize", "mode", "rerank_top", "max_pixels", "fps", "max_frames", "index_setting")
    print_table([Column(n, right=n not in ("quantize", "mode", "index_setting"), key=n in settings) for n in names],
                rows)
