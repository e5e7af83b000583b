"""The web page of `qvlsearch serve` in a real browser: Debian's Chromium, headless, driven by Playwright.

One server and one browser serve every test of the module (a second server, with a key, for sign-in).
The page's Content-Security-Policy forbids eval, so waits poll with `page.evaluate` (which it allows)
instead of Playwright's `wait_for_function`.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from io import BytesIO
from pathlib import Path

import pytest
from conftest import PHOTOS, SAMPLE_DATA
from PIL import Image
from test_server import Served

from qvlsearch.indexer import Indexer, IndexOptions

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PDF = SAMPLE_DATA / "documents" / "a cake, boats on a lake, and chess notes.pdf"
FILES = [PHOTOS / "cat.jpg", PHOTOS / "cake.jpg", PHOTOS / "bee.jpg", PHOTOS / "boats on a lake.png",
         SAMPLE_DATA / "videos" / "cat pan.mp4", PDF, SAMPLE_DATA / "notes" / "cats.txt",
         SAMPLE_DATA / "notes" / "chess.txt"]
KEY = "web-page-key"
ALL_THUMBNAILS_LOADED = ("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
                         " && document.querySelectorAll('#results img').length > 0")


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, checkpoints, embedder) -> Path:
    """Photos (one of them twice, one turned by its EXIF orientation), a video with 2-second moments, a PDF, notes."""
    root = tmp_path_factory.mktemp("web") / "files"
    root.mkdir()
    for path in FILES:
        shutil.copy(path, root / path.name)
    shutil.copy(PHOTOS / "cat.jpg", root / "cat copy.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; the picture must be turned 90° to be upright
    Image.new("RGB", (96, 48), (200, 40, 40)).save(root / "turned.jpg", exif=exif)
    index = root.parent / "index"
    Indexer(index, IndexOptions(model=str(checkpoints["embedder"]), moment_seconds=2.0), embedder=embedder).run([root])
    return index


@pytest.fixture(scope="module")
def server(index_dir, checkpoints):
    with Served(index_dir, checkpoints) as served:
        yield served


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install chromium`, as .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def requests_made() -> list[str]:
    return []


@pytest.fixture
def page(browser, requests_made):
    """A fresh page (its own cookies) that records every URL it asks for: all must be of one origin."""
    context = browser.new_context(viewport={"width": 1280, "height": 2000})
    context.set_default_timeout(180_000)  # the first rerank loads the reranker; CI machines are shared
    page = context.new_page()
    page.on("request", lambda request: requests_made.append(request.url))
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    yield page
    context.close()
    assert not errors, errors
    origins = {urllib.parse.urlsplit(url.removeprefix("blob:"))[:2] for url in requests_made}  # blob: is the page's
    assert len(origins) <= 1, requests_made  # no request leaves the server's origin, in any test


def wait_until(page, script: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not page.evaluate(script):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {script}")
        time.sleep(0.05)


def search(page, server, **params: str) -> list[dict]:
    """Open the page at a URL holding the query and filters; the hits' data attributes, in order."""
    page.goto(f"{server.url}/?{urllib.parse.urlencode(params)}")
    page.wait_for_selector("#results[data-count]", state="attached")
    return page.evaluate("[...document.querySelectorAll('#results figure.hit')].map(f => ({...f.dataset}))")


def fetch(url: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as answer:
            return answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_enter_shows_the_best_hits_first_with_thumbnails_that_all_load(page, server, index_dir, requests_made):
    page.goto(server.url + "/")
    page.fill("input[type=search]", "a cat on a table")
    page.press("input[type=search]", "Enter")
    page.wait_for_selector("#results[data-count]", state="attached")
    wait_until(page, ALL_THUMBNAILS_LOADED)
    assert "q=a+cat+on+a+table" in page.url  # the URL holds the search: it can be bookmarked
    hits = page.evaluate("[...document.querySelectorAll('#results figure.hit')].map(f => ({...f.dataset}))")
    assert len(hits) >= 10
    scores = [float(h["score"]) for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert {h["kind"] for h in hits} == {"image", "video", "pdf", "text"}
    assert all(h["path"].startswith(str(index_dir.parent / "files")) and h["date"] for h in hits)
    assert all(f"{h['score'][:4]}" in page.text_content(f"figure.hit[data-id='{h['id']}']") for h in hits)
    assert page.get_attribute("#results img", "loading") == "lazy"
    assert list((index_dir / "cache" / "thumbnails").glob("*.jpg"))  # made once, kept in the index's cache
    assert all(url.startswith(server.url + "/") for url in requests_made), requests_made  # nothing elsewhere


def test_an_uploaded_photo_finds_itself_first(page, server):
    page.goto(server.url + "/")
    page.set_input_files("input[type=file]", str(PHOTOS / "bee.jpg"))
    page.wait_for_selector("#results[data-count]", state="attached")
    first = page.evaluate("document.querySelector('#results figure.hit').dataset.path")
    assert first.endswith("/bee.jpg")


def test_a_moment_plays_from_its_start_and_seeks_with_range_requests(page, server):
    hits = search(page, server, q="a cat", kind="video")
    moments = [h for h in hits if "start" in h and float(h["start"]) > 0]
    assert moments, hits
    moment = moments[0]
    ranges = []
    page.on("response", lambda response: ranges.append(response.status) if "/web/view/" in response.url else None)
    page.click(f"figure.hit[data-id='{moment['id']}'] .open")
    wait_until(page, "document.querySelector('dialog video')?.readyState >= 1")
    wait_until(page, "document.querySelector('dialog video').currentTime > 0")
    current = page.evaluate("document.querySelector('dialog video').currentTime")
    assert float(moment["start"]) <= current < float(moment["end"]) + 1
    assert 206 in ranges  # the browser asked for a byte range and got one
    assert float(moment["start"]) != 0 and page.evaluate("document.querySelector('#viewer').open")


def test_a_pdf_hit_shows_its_page_and_the_keys_move_and_close(page, server):
    hits = search(page, server, q="chess notes", kind="pdf")
    assert hits and all(h["kind"] == "pdf" and "page" in h for h in hits)
    second = next(h for h in hits if h["page"] == "2")
    page.click(f"figure.hit[data-id='{second['id']}'] .open")
    wait_until(page, "document.querySelector('dialog img.viewed')?.naturalWidth > 0")
    assert "page 2" in page.text_content("#viewer-caption")
    width, height = page.evaluate("[document.querySelector('dialog img.viewed').naturalWidth, "
                                  "document.querySelector('dialog img.viewed').naturalHeight]")
    assert height > width > 300  # a portrait page, at screen size
    position = hits.index(second)
    page.keyboard.press("ArrowRight" if position == 0 else "ArrowLeft")
    assert page.text_content("#viewer-caption").startswith(f"{2 if position == 0 else position} of {len(hits)}")
    page.keyboard.press("Escape")
    wait_until(page, "!document.querySelector('#viewer').open")


def test_a_text_hit_shows_its_first_lines(page, server):
    hits = search(page, server, q="cats", kind="text")
    cats = next(h for h in hits if h["path"].endswith("cats.txt"))
    page.click(f"figure.hit[data-id='{cats['id']}'] .open")
    wait_until(page, "document.querySelector('dialog pre')?.textContent.includes('Notes on our cats')")


def test_filters_change_the_hits_and_stay_in_the_url(page, server, index_dir):
    everything = search(page, server, q="a cat")
    images = search(page, server, q="a cat", kind="image")
    assert images and {h["kind"] for h in images} == {"image"} and len(images) < len(everything)
    page.select_option("select[name=kind]", "text")
    wait_until(page, "[...document.querySelectorAll('#results figure.hit')].every(f => f.dataset.kind === 'text')")
    assert "kind=text" in page.url
    assert search(page, server, q="a cat", after="2999-01-01") == []
    by_date = search(page, server, q="a cat", sort="date")
    dates = [h["date"] for h in by_date]
    assert dates == sorted(dates, reverse=True)
    under = search(page, server, q="a cat", under=str(index_dir.parent / "elsewhere"))
    assert under == []
    liked = search(page, server, like=images[0]["id"])  # "more like this"
    assert liked[0]["id"] == images[0]["id"]


def test_rerank_hides_what_the_reranker_judges_not_relevant_unless_asked(page, server):
    shown = search(page, server, q="a cat", rerank="1")
    every = search(page, server, q="a cat", rerank="1", all="1")
    assert all(float(h["rerankScore"]) >= 0.5 for h in shown)
    assert len(every) >= len(shown) and all("rerankScore" in h for h in every)
    hidden = len(every) - len(shown)
    if hidden:
        search(page, server, q="a cat", rerank="1")
        assert f"{hidden} judged not relevant are hidden" in page.text_content("#status")


def test_duplicates_page_marks_the_keeper_and_deletes_nothing(page, server, index_dir):
    page.goto(server.url + "/dupes")
    page.wait_for_selector("#groups[data-count]", state="attached")
    members = page.evaluate("[...document.querySelectorAll('section.dupes figure')].map(f => ({...f.dataset}))")
    assert sorted(Path(m["path"]).name for m in members) == ["cat copy.jpg", "cat.jpg"]
    assert [m["keep"] for m in members].count("true") == 1
    assert page.locator("figure.keeper .badge").text_content() == "keep"
    wait_until(page, "[...document.querySelectorAll('section.dupes img')].every(i => i.naturalWidth > 0)")
    assert all(Path(m["path"]).exists() for m in members)


def test_thumbnails_are_upright_and_only_by_item_id(server, index_dir):
    status, data, headers = fetch(server.url + "/")
    csp = headers["content-security-policy"]
    assert status == 200 and "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "<script>" not in data.decode()  # no inline script: the CSP would refuse it
    hits = json.loads(urllib.request.urlopen(urllib.request.Request(
        server.url + "/web/search", data=json.dumps({"query": "red", "k": 50}).encode(),
        headers={"Content-Type": "application/json"})).read())
    turned = next(h for h in hits if h["path"].endswith("turned.jpg"))
    status, data, _ = fetch(f"{server.url}/web/thumb/{turned['id']}")
    assert status == 200 and Image.open(BytesIO(data)).size == (48, 96)  # EXIF orientation applied
    cat = index_dir.parent / "files" / "cat.jpg"
    for bad in ("999999", "-1", "cat.jpg", urllib.parse.quote(str(cat), safe=""), "..%2F..%2Fetc%2Fpasswd",
                urllib.parse.quote("/etc/passwd")):
        for route in ("thumb", "view"):
            status, body, _ = fetch(f"{server.url}/web/{route}/{bad}")
            assert status == 404, (route, bad, body)
    status, _, _ = fetch(f"{server.url}/web/thumb/{turned['id']}", {"Origin": "http://evil.example"})
    assert status == 403  # the API's rules hold for the page's routes


def test_with_a_key_the_page_needs_a_sign_in(browser, index_dir, checkpoints, requests_made):
    with Served(index_dir, checkpoints, "--api-key", KEY, announced=False) as keyed:
        context = browser.new_context()
        context.set_default_timeout(180_000)
        page = context.new_page()
        page.goto(keyed.url + "/")
        assert page.url == keyed.url + "/signin" and page.locator("#results").count() == 0
        for path in ("/web/thumb/1", "/web/view/1", "/web/dupes", "/static/app.js"):
            assert fetch(keyed.url + path)[0] == 401
        page.fill("input[type=password]", "not the key")
        page.press("input[type=password]", "Enter")
        page.wait_for_selector("#status:has-text('not this server')")
        page.fill("input[type=password]", KEY)
        page.press("input[type=password]", "Enter")
        page.wait_for_url(keyed.url + "/")
        cookie = next(c for c in context.cookies() if c["name"] == "qvlsearch_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and KEY not in cookie["value"]
        page.goto(keyed.url + "/?q=cake")
        page.wait_for_selector("#results[data-count]", state="attached")
        wait_until(page, ALL_THUMBNAILS_LOADED)
        context.close()
