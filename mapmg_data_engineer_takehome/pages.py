"""The pages a browser opens: the docs page (Swagger UI on this server's API document) and the
key browser, each with the files it loads, all served from this package, offline.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from aiohttp import hdrs, web

from .errors import NO_SUCH_ENDPOINT, ApiError

# The docs page's files: Swagger UI 5 (see static/swagger-ui/VERSION) and its start script.
STATIC = Path(__file__).resolve().parent / "static"
DOCS_ASSETS = {
    "swagger-ui-bundle.js": STATIC / "swagger-ui" / "swagger-ui-bundle.js",
    "swagger-ui.css": STATIC / "swagger-ui" / "swagger-ui.css",
    "docs.js": STATIC / "docs.js",
    "LICENSE": STATIC / "swagger-ui" / "LICENSE",
}


DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Key-value store API</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/docs/assets/docs.js"></script>
</body>
</html>
"""
# Everything the page loads comes from this server: no CDN, no font or validator service.
DOCS_HEADERS = {
    hdrs.CONTENT_TYPE: "text/html; charset=utf-8",
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
}


async def docs(request: web.Request) -> web.Response:
    """GET /docs: Swagger UI on this server's document, working offline."""
    return web.Response(text=DOCS_PAGE, headers=DOCS_HEADERS)


def _asset(
    request: web.Request, assets: Mapping[str, Path], page: str, headers: Mapping[str, str]
) -> web.FileResponse:
    """The file of ``assets`` named in the path; only those, so no path reaches the disk."""
    path = assets.get(request.match_info["name"])
    if path is None:
        raise ApiError(404, "not_found", f"No such file of {page}.")
    return web.FileResponse(path, headers=headers)


async def docs_asset(request: web.Request) -> web.StreamResponse:
    """GET /docs/assets/{name}: one of the docs page's files."""
    return _asset(
        request, DOCS_ASSETS, "the docs page", {hdrs.CACHE_CONTROL: "public, max-age=86400"}
    )


UI = STATIC / "ui"
UI_ASSETS = {"app.js": UI / "app.js", "style.css": UI / "style.css"}
# The key browser's page: its own scripts and styles only, talking to this server only.
UI_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    hdrs.CACHE_CONTROL: "no-cache",
}


async def ui_page(request: web.Request) -> web.StreamResponse:
    """GET /ui/: the key browser."""
    return web.FileResponse(UI / "index.html", headers=UI_HEADERS)


async def ui_asset(request: web.Request) -> web.StreamResponse:
    """GET /ui/{name}: the key browser's script and styles."""
    return _asset(request, UI_ASSETS, "the key browser", UI_HEADERS)


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={hdrs.LOCATION: location})


async def ui_redirect(request: web.Request) -> web.Response:
    """GET /ui: to /ui/, where the page's relative paths work."""
    return _redirect("/ui/")


async def root(request: web.Request) -> web.Response:
    """GET /: a browser (it asks for HTML) goes to the key browser; an API client gets the
    JSON 404 it always got."""
    if "text/html" in request.headers.get(hdrs.ACCEPT, ""):
        return _redirect("/ui/")
    raise ApiError(404, "not_found", NO_SUCH_ENDPOINT)
