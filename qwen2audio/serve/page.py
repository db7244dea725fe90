"""The web page at ``/``: voice chat and audio analysis in a browser (files in ``web/``).

    GET /                 the page (web/index.html)
    GET /web/NAME         its script, style sheet and recorder worklet: the files of web/, nothing else
    GET /web/config       what the page needs to know: the model's id, the server's limits, the sampling
                          defaults of the checkpoint (shown as placeholders), whether an API key is needed

The page talks to the server through the public API only (POST /v1/chat/completions, streamed). It
loads nothing from elsewhere (the Content-Security-Policy says so too), so it works with no network
beyond the server. ``qwen2audio serve --no-web`` leaves it out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fastapi import FastAPI
from starlette.responses import FileResponse, JSONResponse, Response

from .errors import NOT_FOUND, error_body

WEB_DIR = Path(__file__).with_name("web")
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# Everything from this server; blob: for playing back recordings and uploads held in the page.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; media-src 'self' blob: data:; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated (ETag), so that an upgraded server's page is never stale
}


def files() -> dict[str, Path]:
    """The page's files by name (only what ships in web/ is ever served)."""
    return {p.name: p for p in WEB_DIR.iterdir() if p.suffix in MEDIA_TYPES}


def add_routes(app: FastAPI, config: Callable[[], dict]) -> None:
    """Adds the page's routes; ``config()`` -> the body of GET /web/config."""
    served = files()

    def send(path: Path) -> Response:
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return send(served["index.html"])

    @app.get("/web/config", include_in_schema=False)
    async def web_config() -> Response:
        return JSONResponse(config(), headers={"Cache-Control": "no-store"})

    @app.get("/web/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        path = served.get(name)
        if path is None:
            return JSONResponse(error_body(f"there is no file {name!r} in the web page", NOT_FOUND), status_code=404)
        return send(path)
