"""Write the files that the README's examples use beyond sample_data/ (run from a checkout).

    python tests/make_album.py album DIR     # a photo album: sample photos and videos, two photos with EXIF,
                                             # copies to find as duplicates, a phone's Live Photo and burst,
                                             # and labelled queries for `eval`
    python tests/make_album.py queries DIR   # query files: 'blue clip.mp4' and 'page2.png'
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
from pathlib import Path

from make_media import make_burst, make_color_video, make_live_video, make_photo, make_still, set_creation_time
from PIL import Image

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "sample_data"
MODIFIED = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)  # every file's mtime, except cat.jpg's
QUERIES = [
    {"id": "cat", "text": "a cat"},
    {"id": "cake", "text": "a chocolate cake"},
    {"id": "boats", "text": "boats on a lake"},
    {"id": "self-bee", "image": "photos/bee.jpg", "instruction": "Represent the user's input."},
]
QRELS = [("cat", "photos/cat.jpg", 2), ("cat", "photos/black kitty.jpeg", 1), ("cat", "photos/cautious cat.jpg", 1),
         ("cake", "photos/cake.jpg", 1), ("boats", "photos/boats on a lake.png", 1),
         ("boats", "videos/boats on a lake pan.mp4", 1), ("boats", "photos/sold-boat.jpg", 1),
         ("self-bee", "photos/bee.jpg", 1)]


def make_album(root: Path) -> None:
    """The album of the README's date, place, camera, dupes and eval examples."""
    shutil.copytree(SAMPLE_DATA / "photos", root / "photos")
    shutil.copytree(SAMPLE_DATA / "videos", root / "videos")
    make_photo(root / "photos" / "eiffel.jpg", taken="2019:05:01 18:00:00", offset="+02:00", gps=(48.8584, 2.2945),
               camera=("NIKON", "NIKON Z 6"), source=SAMPLE_DATA / "photos" / "books.jpg", size=(384, 256))
    make_photo(root / "photos" / "harbour.jpg", taken="2021:07:14 10:30:00", offset="+10:00",
               gps=(-33.8568, 151.2153), camera=("Canon", "Canon EOS R5"),
               source=SAMPLE_DATA / "drawings" / "scenes" / "outdoors" / "sailboat on blue water.png", size=(384, 256))
    (root / "backup").mkdir()
    shutil.copy(root / "photos" / "cat.jpg", root / "backup" / "cat.jpg")
    Image.open(root / "photos" / "cake.jpg").save(root / "backup" / "cake (edited).jpg", quality=95)
    set_creation_time(root / "videos" / "cat pan.mp4", root / "backup" / "cat pan.mp4",
                      "2022-03-04T05:06:07.000000Z", location="+48.8577+002.2950/")
    (root / "phone").mkdir()  # a Live Photo (a still and its video, one content identifier) and a burst
    make_still(root / "phone" / "IMG_0001.JPG", SAMPLE_DATA / "photos" / "cat.jpg", makernote_id="5C4B")
    make_live_video(root / "phone" / "IMG_0001.MOV", "5C4B")
    make_burst(root / "phone", SAMPLE_DATA / "photos" / "cake.jpg")
    (root / "queries.jsonl").write_text("".join(json.dumps(query) + "\n" for query in QUERIES))
    (root / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{c}\t{s}\n" for q, c, s in QRELS))
    for path in [root, *root.rglob("*")]:
        os.utime(path, (MODIFIED.timestamp(), MODIFIED.timestamp()))
    cat = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc).timestamp()
    os.utime(root / "photos" / "cat.jpg", (cat, cat))


def make_queries(root: Path) -> None:
    """Four seconds of plain blue, and the second page of the sample PDF as an image."""
    import pypdfium2

    root.mkdir(parents=True, exist_ok=True)
    make_color_video(root / "blue clip.mp4", (0, 0, 255))
    pdf = pypdfium2.PdfDocument(SAMPLE_DATA / "documents" / "a cake, boats on a lake, and chess notes.pdf")
    pdf[1].render(scale=2).to_pil().save(root / "page2.png")
    pdf.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["album", "queries"])
    parser.add_argument("dir", type=Path)
    args = parser.parse_args()
    if args.what == "album" and args.dir.exists():
        parser.error(f"{args.dir} exists; give a new folder")
    (make_album if args.what == "album" else make_queries)(args.dir)


if __name__ == "__main__":
    main()
