"""Path shortening and the block layout of terminal tables, at widths no terminal test reaches."""

from __future__ import annotations

from rich.cells import cell_len

from qvlsearch.tables import Column, layout, shorten_path


def test_a_path_is_whole_or_shortened_from_the_left():
    path = "/photos/2024/patterns/flag.png"
    assert shorten_path(path, 40) == path and shorten_path(path, len(path)) == path
    assert shorten_path(path, 20) == "…4/patterns/flag.png" and cell_len(shorten_path(path, 20)) <= 20
    assert shorten_path(path, 6) == "…g.png"  # a column narrower than the file name keeps its end
    wide = "/写真/旅行/東京タワー.jpg"  # two cells a character
    assert all(cell_len(shorten_path(wide, w)) <= w for w in range(1, 30))
    assert shorten_path(wide, 17) == "…/東京タワー.jpg"  # not half a character


def test_columns_that_do_not_fit_beside_the_path_continue_below_with_the_keys():
    columns = [Column("#", key=True), Column("a"), Column("b"), Column("path", path=True)]
    widths = [2, 10, 10, 50]
    assert layout(columns, widths, 80, 2) == [[0, 1, 2, 3]]
    assert layout(columns, widths, 44, 2) == [[0, 1, 3], [0, 2, 3]]  # the path keeps 24 cells
    assert layout(columns, widths, 10, 2) == [[0, 1, 3], [0, 2, 3]]  # never an empty block
