"""Pages of PDF files as images: how many a file has, and one page rendered within the pixel limits.

PDFium is not thread-safe, so every call into it holds one lock; a page is rendered only when
the model needs it, so a 10,000-page PDF never sits in memory.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from PIL import Image

from .errors import MediaError

PDFIUM_LOCK = threading.Lock()
MAX_PAGES = 200  # pages indexed per PDF by default (--max-pages); later pages are skipped with a warning
RENDER_DPI = 144  # twice PDF's 72 points an inch: small print stays legible to the model


def _reason(exc: Exception) -> str:
    text = str(exc)
    if "password" in text.lower():
        return "the PDF is encrypted (it needs a password)"
    if "Data format error" in text or "Failed to load" in text:
        return "not a readable PDF (damaged or not a PDF)"
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"cannot read PDF: {text.splitlines()[0] if text else type(exc).__name__}"


def page_count(path: str) -> int:
    """The number of pages; MediaError (one line) for an encrypted or damaged PDF."""
    import pypdfium2 as pdfium

    try:
        with PDFIUM_LOCK:
            document = pdfium.PdfDocument(path)
            try:
                return len(document)
            finally:
                document.close()
    except (pdfium.PdfiumError, OSError) as exc:
        raise MediaError(f"PDF {path!r}: {_reason(exc)}", reason=_reason(exc)) from None


@dataclass(frozen=True)
class PdfPage:
    """Page `page` (1-based) of the PDF at `path`, as an Embedder/Reranker image source."""

    path: str
    page: int

    def __str__(self) -> str:
        return f"page {self.page} of {self.path!r}"

    def render(self, max_pixels: int) -> Image.Image:
        """The page at RENDER_DPI, scaled down to at most `max_pixels`; MediaError if it cannot be drawn."""
        import pypdfium2 as pdfium

        try:
            with PDFIUM_LOCK:
                document = pdfium.PdfDocument(self.path)
                try:
                    if not 1 <= self.page <= len(document):
                        raise MediaError(f"{self}: the PDF has {len(document)} pages",
                                         reason=f"the PDF has {len(document)} pages")
                    page = document[self.page - 1]
                    width, height = page.get_size()
                    scale = min(RENDER_DPI / 72, math.sqrt(max_pixels / max(width * height, 1.0)))
                    image = page.render(scale=scale).to_pil().convert("RGB")
                finally:
                    document.close()
        except (pdfium.PdfiumError, OSError) as exc:
            raise MediaError(f"{self}: {_reason(exc)}", reason=_reason(exc)) from None
        return image
