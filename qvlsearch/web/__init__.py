"""The web page of `qvlsearch serve`: a search box, thumbnails, a viewer and the duplicates, for a browser.

`routes` adds the page and what it asks for to the API's app; `thumbnails` makes the pictures;
`static/` holds the page itself (plain HTML, CSS and JavaScript, nothing fetched from elsewhere).
The API's rules hold for all of it (see server.py): the Host check, no other origin, the caps,
and beyond loopback the key, which a browser gives once at /signin and then carries in a cookie.
"""

from __future__ import annotations

import hashlib
import hmac

from .routes import add_routes, indexed

SESSION_COOKIE = "qvlsearch_session"
PAGES = ("/", "/dupes")  # a browser that has not signed in is sent to /signin from these
# what signing in needs
OPEN_PATHS = ("/signin", "/web/signin", "/static/style.css", "/static/signin.js", "/static/favicon.svg")
# The page's own files and nothing else: no inline script or style, no other origin, no frames.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                               "media-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def session_token(api_key: str) -> str:
    """The sign-in cookie's value: derived from the key (a cookie never holds the key itself)."""
    return hmac.new(api_key.encode(), b"qvlsearch web session", hashlib.sha256).hexdigest()


__all__ = ["OPEN_PATHS", "PAGES", "SECURITY_HEADERS", "SESSION_COOKIE", "add_routes", "indexed", "session_token"]
