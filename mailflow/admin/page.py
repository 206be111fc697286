"""The queue page: plain HTML, CSS and a little JavaScript (static/), no build step and nothing loaded from
elsewhere. The files hold no data: the page reads it from the admin API (api.py) in the browser.

    routes() -> web.RouteTableDef      GET / (static/index.html), /queue.js, /queue.css
    security_headers(request, response)
                                       the listener's on_response_prepare hook: the headers every answer carries
                                       (below)

What the page shows (docs/operations.md, "Queue page"): messages per queue; the queue's shape (pending recipients
by domain and age, as qshape); the destinations with their windows, load and dead-site timers; the latest
deliveries with their status; the messages queued, each opening a message view (envelope, recipients, headers,
history) with Hold, Release and Delete buttons. With tokens (`[admin] token_file`) it asks for one and keeps it
in the tab's sessionStorage.

Every answer of the listener, the API's too, says: nothing to sniff (`X-Content-Type-Options: nosniff`), no
framing (`frame-ancestors 'none'`, `X-Frame-Options: DENY`), no Referer sent from it (`Referrer-Policy:
no-referrer`). The page's files allow nothing but the page's own files (`default-src 'self'`, no inline script);
the API's answers nothing at all (`default-src 'none'; sandbox`), so that what a sender or a remote server wrote
(a queued message, a reason text) can run no script even in a browser that renders it.

Failure behaviour: the files are read once, at import; a missing file is a broken install (ImportError).
"""
from __future__ import annotations

from importlib import resources

from aiohttp import web

_FILES = {name: resources.files("mailflow.admin").joinpath("static", name).read_bytes()
          for name in ("index.html", "queue.js", "queue.css")}
_TYPES = {"index.html": "text/html", "queue.js": "text/javascript", "queue.css": "text/css"}
# The page's own files only; no inline script, no framing.
_HEADERS = {"Content-Security-Policy": "default-src 'self'; base-uri 'none'; frame-ancestors 'none'",
            "Cache-Control": "no-cache"}
# every answer (the API's: data, not a document: no script, no plugin, no framing)
_EVERY = {"Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; sandbox",
          "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


def _file(name: str):
    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=_FILES[name], content_type=_TYPES[name], charset="utf-8", headers=_HEADERS)
    return serve


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """The headers every answer carries (see the module docstring); the page's files keep their own CSP."""
    for name, value in _EVERY.items():
        response.headers.setdefault(name, value)


def routes() -> web.RouteTableDef:
    table = web.RouteTableDef()
    table.get("/")(_file("index.html"))
    table.get("/queue.js")(_file("queue.js"))
    table.get("/queue.css")(_file("queue.css"))
    return table
