"""Words as well as meaning: each segment's full-text index (SQLite FTS5), what goes in it, and queries on it.

A row's words are its file and folder names (file rows only), a text file's whole content, a PDF
page's text layer, an image's EXIF/XMP description, keywords and camera name, and a video's container
title and comment. They live in `segments/seg-<n>.words`, one SQLite database per segment, written
with the segment (or added beside an older one) and never changed; tombstones hide deleted rows'
words as they hide their vectors (a reader filters hits by the live ids), and merges copy them.

Tokenizing: FTS5's `unicode61` tokenizer with `remove_diacritics 2` folds case and accents of Latin,
Greek and Cyrillic scripts. It keeps a run of Chinese, Japanese or Korean characters as one token, and
neither the standard library's SQLite nor any maintained Python package offers an FTS5 tokenizer for
those scripts (the `trigram` tokenizer finds substrings of three characters or more, so not the
two-character words most of these languages are built of). So CJK runs are written as overlapping
bigrams, space-separated, into the indexed text, and queries are split the same way, as Lucene's
CJKAnalyzer does: `我的发票` is indexed as `我的 的发 发票` and the query `发票` finds it.
File names are split at `_`, `-`, `.` and case changes, and also kept whole (`IMG_2043.JPG`,
`IMG2043`), so that `IMG_2043`, `img2043`, `2043` and `invoiceMarch` all find their file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("qvlsearch")

MODES = ("hybrid", "semantic", "words")
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al. 2009; Elasticsearch and Vespa use it too)
MAX_TEXT_BYTES = 16 << 20  # a text file's words are read up to here (a larger log file is cut, not skipped)
TOKENIZER = "unicode61 remove_diacritics 2"
NAME_WEIGHT, TEXT_WEIGHT = 2.0, 1.0  # BM25 column weights: a word in the name counts double
CJK = ("\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
       "\U00020000-\U0002ffff")
CJK_RUN = re.compile(f"[{CJK}]+")
NAME_SEPARATORS = re.compile(r"[_\-.\s]+")
CASE_CHANGE = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
QUERY_PART = re.compile(r'"([^"]*)"?|(\S+)')  # a quoted phrase (closed or not) or a bare word
HIGHLIGHT_OPEN, HIGHLIGHT_CLOSE = "\x02", "\x03"
MARKED = re.compile(f"{HIGHLIGHT_OPEN}(.*?){HIGHLIGHT_CLOSE}", re.S)
MATCHED_SHOWN = 4  # words a hit's `matched` lists at most


# --- what is indexed ------------------------------------------------------------------------------

def cjk_bigrams(text: str) -> str:
    """`text` with each run of CJK characters written as its overlapping two-character words."""

    def split(run: re.Match) -> str:
        chars = run.group()
        return " " + (chars if len(chars) == 1 else " ".join(chars[i:i + 2] for i in range(len(chars) - 1))) + " "

    return CJK_RUN.sub(split, text)


def name_parts(name: str) -> list[str]:
    """A file or folder name's parts: split at `_`, `-`, `.`, spaces and case changes."""
    return [part for piece in NAME_SEPARATORS.split(name) for part in CASE_CHANGE.split(piece) if part]


def name_words(path: str, root: str | None) -> str:
    """The words of a file's name and of its folders' names from its root's own name down: each name whole,
    without separators, and in parts."""
    folder = os.path.dirname(root) if root and root != path else os.path.dirname(path)
    relative = os.path.relpath(path, folder) if folder else path
    names = [n for n in relative.split(os.sep) if n]
    words = []
    for name in names:
        stem = os.path.splitext(name)[0] or name
        words += [name, "".join(NAME_SEPARATORS.split(stem)), *name_parts(name)]
    return cjk_bigrams(" ".join(dict.fromkeys(words)))


def indexed_text(text: str | None) -> str:
    return cjk_bigrams(text) if text else ""


# --- reading a file's words (in a decoder process for PDFs and videos) ------------------------------

def read_words(path: str, kind: str | None, pages: int = 0) -> dict[int | None, str]:
    """A file's words by place: None for the whole file, a page number for a PDF's page (the first `pages`).

    Words that cannot be read are missing words, never a failed file (logged).
    """
    try:
        if kind == "text":
            with open(path, "rb") as f:
                return {None: f.read(MAX_TEXT_BYTES).decode("utf-8", "replace")}
        if kind == "pdf":
            return pdf_words(path, pages)
        if kind == "image":
            return {None: image_words(path)}
        if kind == "video":
            return {None: video_words(path)}
    except Exception as exc:  # noqa: BLE001 - odd text layers or metadata never fail a file
        log.info("%s: words not read (%s: %s)", path, type(exc).__name__, exc)
    return {}


def pdf_words(path: str, pages: int) -> dict[int | None, str]:
    """Each page's text layer (pdfium's text page), for the first `pages` pages."""
    import pypdfium2 as pdfium

    from .pages import PDFIUM_LOCK

    found: dict[int | None, str] = {}
    with PDFIUM_LOCK:
        document = pdfium.PdfDocument(path)
        try:
            for number in range(1, min(pages, len(document)) + 1):
                page = document[number - 1]
                text_page = page.get_textpage()
                found[number] = text_page.get_text_range()
                text_page.close()
                page.close()
        finally:
            document.close()
    return found


XMP_TEXT = re.compile(r"<dc:(description|title|subject)\b[^>]*>(.*?)</dc:\1>", re.S)
XML_TAG = re.compile(r"<[^>]+>")
EXIF_TEXT_TAGS = (0x010E, 0x9C9B, 0x9C9C, 0x9C9E, 0x9C9F)  # ImageDescription, XPTitle, XPComment, XPKeywords, XPSubject


def image_words(path: str) -> str:
    """An image's EXIF description, title, comment and keywords, its XMP dc:description/title/subject and its
    camera name."""
    from html import unescape

    from PIL import Image

    from .metadata import exif_camera

    with Image.open(path) as image:
        exif = image.getexif() if not (image.format == "PNG" and "exif" not in image.info) else Image.Exif()
        xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp") or b""
    words = []
    for tag in EXIF_TEXT_TAGS:
        value = exif.get(tag)
        if isinstance(value, bytes | tuple):  # the XP tags are UTF-16 in bytes
            value = bytes(value).decode("utf-16-le", "replace")
        if isinstance(value, str):
            words.append(value.strip("\x00 "))
    if isinstance(xmp, bytes):
        xmp = xmp.decode("utf-8", "replace")
    words += [unescape(XML_TAG.sub(" ", text)) for _, text in XMP_TEXT.findall(xmp)]
    words.append(exif_camera(exif) or "")
    return " ".join(w for w in (" ".join(part.split()) for part in words) if w)


def video_words(path: str) -> str:
    """A video's container title, comment, description and keywords, and its camera name."""
    import av

    from .metadata import camera_name

    with av.open(path) as container:
        tags = {k.lower(): v for k, v in container.metadata.items()}
    words = [tags.get(key) for key in ("title", "comment", "description", "keywords", "com.apple.quicktime.title",
                                       "com.apple.quicktime.description", "com.apple.quicktime.keywords")]
    words.append(camera_name(tags.get("com.apple.quicktime.make") or tags.get("make"),
                             tags.get("com.apple.quicktime.model") or tags.get("model")))
    return " ".join(w for w in words if isinstance(w, str) and w.strip())


# --- a segment's words database ---------------------------------------------------------------------

def create_words(path: Path) -> sqlite3.Connection:
    """A new, empty words database at `path` (a temporary name: the caller renames it into place)."""
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF")  # written once under a temporary name, fsynced and renamed by the caller
    db.execute("PRAGMA synchronous=OFF")
    db.execute(f"CREATE VIRTUAL TABLE words USING fts5(name, text, tokenize='{TOKENIZER}')")
    db.execute("BEGIN")
    return db


def write_words(path: Path, rows: Iterable[tuple[int, str, str]]) -> None:
    """Write (id, name words, text) rows as a words database at `path`, optimized (one b-tree a term)."""
    with file_errors(path):
        db = create_words(path)
        try:
            db.executemany("INSERT INTO words(rowid, name, text) VALUES (?, ?, ?)", rows)
            finish_words(db)
        finally:
            db.close()


@contextlib.contextmanager
def file_errors(path: Path) -> Iterator[None]:
    """SQLite's errors while a words database is written, as the OSError any other file's write gives (a full
    disk is ENOSPC), so that the store's commit fails whole and says so in one line."""
    try:
        yield
    except sqlite3.Error as exc:
        code = errno.ENOSPC if "full" in str(exc) else errno.EIO
        raise OSError(code, os.strerror(code) if code == errno.ENOSPC else str(exc), str(path)) from exc


def copy_words(path: Path, sources: Sequence[tuple[Path, Sequence[int]]]) -> None:
    """A words database at `path` of the rows of `sources` (database, ids to leave out): a merge's."""
    with file_errors(path):
        db = create_words(path)
        try:
            db.execute("CREATE TEMP TABLE dropped(id INTEGER PRIMARY KEY)")
            for number, (source, drop) in enumerate(sources):
                db.execute("DELETE FROM dropped")
                db.executemany("INSERT OR IGNORE INTO dropped VALUES (?)", ((int(i),) for i in drop))
                db.execute(f"ATTACH DATABASE ? AS source{number}", (readonly_uri(source),))
                db.execute(f"INSERT INTO words(rowid, name, text) SELECT rowid, name, text FROM source{number}.words "
                           "WHERE rowid NOT IN (SELECT id FROM dropped)")
                db.execute("COMMIT")
                db.execute(f"DETACH DATABASE source{number}")
                db.execute("BEGIN")
            finish_words(db)
        finally:
            db.close()


def finish_words(db: sqlite3.Connection) -> None:
    db.execute("INSERT INTO words(words) VALUES ('optimize')")
    db.execute("COMMIT")


def words_rows(path: Path) -> int:
    """How many rows a written words database holds (read back before it is renamed into place)."""
    db = sqlite3.connect(readonly_uri(path), uri=True)
    try:
        return db.execute("SELECT count(*) FROM words").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise ValueError(str(exc)) from None
    finally:
        db.close()


def readonly_uri(path: Path) -> str:
    """A URI that opens `path` read-only and immutable: no lock, no journal, as a segment is never changed."""
    return f"file:{urllib.parse.quote(os.fspath(path))}?mode=ro&immutable=1"


class SegmentWords:
    """A segment's words database, opened read-only and held open: it stays readable after a merge deletes it."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()  # one query at a time on the connection (server threads share it)
        try:
            self.db = sqlite3.connect(readonly_uri(path), uri=True, check_same_thread=False)
            self.db.execute("SELECT count(*) FROM words_config").fetchone()  # opens the file now
        except sqlite3.DatabaseError as exc:
            if not path.exists():
                raise FileNotFoundError(2, "No such file", str(path)) from None
            from .store import StoreError

            raise StoreError(f"cannot read {path} ({exc}); run `qvlsearch optimize`, or delete the index folder "
                             "and index the files again") from None

    def search(self, expression: str, limit: int) -> list[tuple[int, float]]:
        """The best `limit` (id, BM25 score, higher is better) of this segment for an FTS5 `expression`."""
        with self.lock:
            found = self.db.execute(  # `rank` is bm25() with equal weights unless the query sets it, as here
                "SELECT rowid, rank FROM words WHERE words MATCH ? AND rank MATCH ? ORDER BY rank LIMIT ?",
                (expression, f"bm25({NAME_WEIGHT}, {TEXT_WEIGHT})", limit)).fetchall()
        return [(int(i), -float(score)) for i, score in found]

    def matched(self, expression: str, ids: Sequence[int]) -> dict[int, list[str]]:
        """The words of each of `ids` that match `expression`, as first written in the row, each once whatever its
        case (at most MATCHED_SHOWN)."""
        if not ids:
            return {}
        marks = f"'{HIGHLIGHT_OPEN}', '{HIGHLIGHT_CLOSE}'"
        with self.lock:
            found = self.db.execute(
                f"SELECT rowid, highlight(words, 1, {marks}), highlight(words, 0, {marks}) FROM words "
                f"WHERE words MATCH ? AND rowid IN ({','.join('?' * len(ids))})", (expression, *map(int, ids))
            ).fetchall()
        result = {}
        for item_id, text, name in found:
            spans = (" ".join(span.split()) for span in MARKED.findall(text or "") + MARKED.findall(name or ""))
            first_of_each = {}  # a word once, as first written, whatever its case
            for span in spans:
                if span:
                    first_of_each.setdefault(span.casefold(), span)
            result[int(item_id)] = list(first_of_each.values())[:MATCHED_SHOWN]
        return result

    def close(self) -> None:
        self.db.close()


# --- queries ---------------------------------------------------------------------------------------

def quoted(text: str) -> str:
    """`text` as an FTS5 string: the tokenizer splits it, and several tokens must appear as a phrase."""
    return '"' + text.replace('"', '""') + '"'


def has_token(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def query_expression(query: str) -> str | None:
    """The FTS5 expression of a search's text: every word must match (AND), "quoted phrases" as phrases, a CJK
    run as the phrase of its bigrams, a word with case changes either whole or in parts. Nothing the user types
    is FTS5 syntax: each part is a quoted string. None when the text holds no word."""
    terms = []
    for phrase, word in QUERY_PART.findall(query):
        text = phrase if phrase else word
        if not has_token(text):
            continue
        plain = quoted(" ".join(cjk_bigrams(text).split()))
        parts = name_parts(text)
        if not phrase and len(parts) > 1 and parts != NAME_SEPARATORS.split(text):  # invoiceMarch: also its parts
            terms.append(f"({plain} OR {quoted(' '.join(parts))})")
        else:
            terms.append(plain)
    return " AND ".join(terms) if terms else None


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Any]], k: int = RRF_K) -> list[tuple[Any, float]]:
    """Items of several rankings (best first) by the sum of 1 / (k + rank) over the rankings they are in."""
    fused: dict[Any, float] = {}
    for ranking in rankings:
        for rank, key in enumerate(ranking, 1):
            fused[key] = fused.get(key, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda kv: -kv[1])


def check_mode(mode: str) -> None:
    if mode not in MODES:
        from .errors import SettingError

        raise SettingError("mode", f"one of {', '.join(MODES)}", mode)
