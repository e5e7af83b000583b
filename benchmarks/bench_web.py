"""The web page (issue 24): from Enter in the search box to all thumbnails of the first 50 hits painted, in
headless Chromium against a warm `qvlsearch serve` (tiny checkpoint), with the thumbnails cached and the first
time (none cached); and the thumbnail endpoint's throughput, cached and not.

    python benchmarks/bench_web.py [--photos N] [--runs N]

The index holds N photos (copies of sample_data/photos under distinct names, each a thumbnail of its own).
The browser window is tall enough (1920 × 2400) that all 50 tiles are in view, so lazy loading asks for all.
Each run opens a new browser context, so the browser's own cache is empty: the server's cache is what is timed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_server import start_server
from common import Figure, report, save

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HITS = 50
# Installed in the page through the DevTools protocol (the page's CSP refuses eval, not this): resolves with the
# milliseconds from Enter to the first 50 thumbnails decoded and two frames later (painted), and to their tiles
# shown (the search answered, the thumbnails asked for).
TIMER = """() => { window.enterToPainted = new Promise(resolve => {
  document.querySelector('#q').addEventListener('keydown', event => {
    if (event.key !== 'Enter') return;
    const started = performance.now();
    let shown = null;
    const check = () => {
      const images = [...document.querySelectorAll('#results img')].slice(0, HITS);
      if (shown === null && images.length === HITS) shown = performance.now() - started;
      if (images.length === HITS && images.every(i => i.complete && i.naturalWidth > 0))
        requestAnimationFrame(() => requestAnimationFrame(() => resolve([performance.now() - started, shown])));
      else requestAnimationFrame(check);
    };
    check();
  }, {once: true});
}); }""".replace("HITS", str(HITS))


def make_index(workdir: Path, embedder: Path, photos: int) -> Path:
    from qvlsearch.indexer import Indexer, IndexOptions

    files = workdir / "photos"
    files.mkdir()
    sources = sorted(p for p in (ROOT / "sample_data" / "photos").iterdir() if p.suffix.lower() != ".md")
    for n in range(photos):
        source = sources[n % len(sources)]
        shutil.copy(source, files / f"{n:04d} {source.name}")
    index = workdir / "index"
    Indexer(index, IndexOptions(model=str(embedder))).run([files])
    return index


def enter_to_painted(browser, url: str, query: str) -> tuple[float, float]:
    """Seconds from Enter to the first 50 thumbnails painted, and to their tiles shown, in a new context (an empty
    browser cache)."""
    context = browser.new_context(viewport={"width": 1920, "height": 2400})
    page = context.new_page()
    page.goto(url + "/")
    page.evaluate(TIMER)
    page.fill("#q", query)
    page.press("#q", "Enter")
    painted, shown = page.evaluate("window.enterToPainted")
    context.close()
    return painted / 1000, shown / 1000


def thumbnails_per_second(url: str, ids: list[int], clients: int = 8) -> float:
    def one(item_id: int) -> None:
        with urllib.request.urlopen(f"{url}/web/thumb/{item_id}", timeout=300) as answer:
            answer.read()

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, ids))
    return len(ids) / (time.perf_counter() - started)


def run(workdir: Path, checkpoints: dict[str, Path], photos: int = 120, runs: int = 5) -> list[Figure]:
    from playwright.sync_api import sync_playwright

    index = make_index(workdir, checkpoints["embedder"], photos)
    cache = index / "cache" / "thumbnails"
    server = start_server(index, checkpoints["reranker"])
    figures = []
    try:
        url = json.loads((index / "server.json").read_text())["url"]
        request = urllib.request.Request(url + "/web/search", data=json.dumps({"query": "warm", "k": 5}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=300).read()  # warm: the model and the index are loaded
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            enter_to_painted(browser, url, "warm the browser")
            shutil.rmtree(cache, ignore_errors=True)
            first = enter_to_painted(browser, url, "a black cat")
            cached = [enter_to_painted(browser, url, "a black cat") for _ in range(runs)]
            browser.close()
        detail = {"photos": photos, "hits": HITS, "cached_runs_s": [round(t, 3) for t, _ in cached],
                  "tiles_shown_s": [round(t, 3) for _, t in cached]}
        figures += [
            Figure("web", f"Enter to {HITS} thumbnails painted, cached (median of {runs})",
                   statistics.median(t for t, _ in cached), "s", goal="<= 1", detail=detail),
            Figure("web", "of which Enter to the tiles shown (the search answered; median)",
                   statistics.median(t for _, t in cached), "s", detail=detail),
            Figure("web", f"Enter to {HITS} thumbnails painted, first time (none cached)", first[0], "s",
                   detail={"photos": photos, "tiles_shown_s": round(first[1], 3)}),
        ]
        hits = json.loads(urllib.request.urlopen(urllib.request.Request(
            url + "/web/search", data=json.dumps({"query": "a cat", "k": photos}).encode(),
            headers={"Content-Type": "application/json"}), timeout=300).read())
        ids = [h["id"] for h in hits]
        shutil.rmtree(cache, ignore_errors=True)
        made = thumbnails_per_second(url, ids)
        served = thumbnails_per_second(url, ids * 5)
        figures += [
            Figure("web", "thumbnails made per second (none cached, 8 clients)", made, "1/s",
                   detail={"thumbnails": len(ids)}),
            Figure("web", "thumbnails served per second (cached, 8 clients)", served, "1/s",
                   detail={"requests": len(ids) * 5}),
        ]
    finally:
        server.terminate()
        server.wait(timeout=60)
    return figures


def main(argv: list[str]) -> int:
    from qvlsearch.tiny import build_checkpoints

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=120)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qvlsearch-bench-web-") as tmp:
        work = Path(tmp)
        figures = run(work, build_checkpoints(work / "tiny", preset="tiny"), photos=args.photos, runs=args.runs)
    print(report(figures))
    print(f"\nresults: {save(figures, 'web')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
