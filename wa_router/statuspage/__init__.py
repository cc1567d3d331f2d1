"""The status page at `/admin/`: one HTML file, one script and one style sheet, shipped in
this package (package data) and served by the router itself: no build step, no CDN.

The files hold no data, so they are served without the token; the script asks the JSON
admin API for everything it shows, with `Authorization: Bearer <token>`, the token typed
into its login form and kept in the tab's `sessionStorage` (never a cookie, never a URL).

The Content-Security-Policy lets the page load and call nothing but its own origin: no
inline script or style, no other origin, no plugin, no framing, no form submission (the
login form is handled by the script; were it submitted by the browser, the token would
end up in a URL).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

# path -> (file in this package, Content-Type). Every page path is GET (and HEAD) only.
PAGE_FILES: dict[str, tuple[str, str]] = {
    "/admin/": ("index.html", "text/html"),
    "/admin/page.js": ("page.js", "text/javascript"),
    "/admin/page.css": ("page.css", "text/css"),
}
# Not an API endpoint: where an operator who typed /admin lands.
REDIRECT_FROM = "/admin"

CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        # data: for the empty icon only (<link rel=icon href="data:,">): the browser asks
        # no /favicon.ico, which the proxy would forward to an instance.
        "img-src 'self' data:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidated on every load, so a router upgrade shows its own page at once.
    "Cache-Control": "no-cache",
}

PageHandler = Callable[[web.Request], Awaitable[web.Response]]


def read_file(name: str) -> bytes:
    return (resources.files(__package__) / name).read_bytes()


def _serve(body: bytes, content_type: str) -> PageHandler:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=HEADERS)

    return handler


def page_handlers() -> dict[str, PageHandler]:
    """path -> handler of each page file, read once (a missing file fails at startup)."""
    return {path: _serve(read_file(name), ctype) for path, (name, ctype) in PAGE_FILES.items()}


async def redirect(request: web.Request) -> web.Response:
    # Relative ("admin/" from "/admin"): right behind a proxy that adds a path prefix too.
    return web.Response(status=308, headers={"Location": "admin/"})
