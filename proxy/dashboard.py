"""The live dashboard page of the admin listener.

Owns: `GET /dashboard` and the script and stylesheet beside it, read once from
`proxy/static/` and served with a policy that lets the page talk to its own origin only.
Must not: add data endpoints or compute anything for the page; it polls `/admin/gateways`
and `/admin/config`, the same JSON operators and scripts read, so what it shows can never
drift from the API. Mounting it and guarding the admin port are the admin app's job.
"""

from __future__ import annotations

import importlib.resources
import logging
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

logger = logging.getLogger(__name__)

#: Same origin only, no inline code: the page shows names and error text from rule files,
#: and this keeps anything that slips into them from running as script.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_FILES: Final = {
    "/dashboard": ("dashboard.html", "text/html"),
    "/dashboard/dashboard.js": ("dashboard.js", "text/javascript"),
    "/dashboard/dashboard.css": ("dashboard.css", "text/css"),
}
_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files, and an upgrade must never leave an old script polling a new API.
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return importlib.resources.files("proxy").joinpath("static", name).read_bytes()


def _file_handler(body: bytes, content_type: str) -> Handler:
    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=_HEADERS)

    return serve


def routes() -> list[web.RouteDef]:
    """GET /dashboard and its assets; the files are read now, not per request."""
    return [
        web.get(path, _file_handler(_read(name), content_type))
        for path, (name, content_type) in _FILES.items()
    ]
