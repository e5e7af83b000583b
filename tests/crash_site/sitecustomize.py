"""A decoder that crashes on hostile files, for tests/test_crash.py, which puts this folder on PYTHONPATH.

Python imports `sitecustomize` at start, so in every process started with it (the CLI, the server, and
their worker processes alike) the media libraries crash the process with SIGSEGV, as a decoder with a
memory-safety bug would, on a file whose name contains "crash-decoder":
- videos and PDFs when the container or document is opened (FFmpeg through decord or PyAV, pdfium);
- images when their pixels are decoded (their header and EXIF are read as usual).
"""

import os
import signal

MARK = "crash-decoder"


def crash_on(name: object) -> None:
    if MARK in str(name):
        os.kill(os.getpid(), signal.SIGSEGV)


def crashing(opener):
    def open_or_crash(source, *args, **kwargs):
        crash_on(source)
        return opener(source, *args, **kwargs)

    return open_or_crash


def install() -> None:
    from PIL import ImageFile

    load = ImageFile.ImageFile.load

    def load_or_crash(self):
        crash_on(getattr(self, "filename", "") or getattr(getattr(self, "fp", None), "name", ""))  # a path or a file
        return load(self)

    ImageFile.ImageFile.load = load_or_crash
    for module, name in (("decord", "VideoReader"), ("av", "open"), ("pypdfium2", "PdfDocument")):
        try:
            owner = __import__(module)
        except ImportError:
            continue
        setattr(owner, name, crashing(getattr(owner, name)))


install()
