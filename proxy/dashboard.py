"""The live dashboard page of the admin listener.

Owns: `GET /dashboard` and the script and stylesheet beside it, read once from
`proxy/static/` and served with a policy that lets the page talk to its own origin only;
and the two feeds only the page needs: `GET /admin/stats` (per-route and per-gateway
one- and five-minute windows, from proxy.windows) and `GET /admin/events` (the live event
tail as server-sent events, from proxy.tail). Everything else the page shows comes from
`/admin/gateways` and `/admin/config`, the same JSON operators and scripts read.
Must not: compute anything itself, or count anything `/metrics` does not. Mounting it and
guarding the admin port are the admin app's job.
"""

from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Callable
from typing import Final

from proxy import tail as event_tail
from proxy.adminhttp import AdminHandler, AdminRequest, Route, get, json_response
from proxy.http import Answer

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


def _file_handler(body: bytes, content_type: str) -> AdminHandler:
    answer = Answer(200, {"Content-Type": f"{content_type}; charset=utf-8", **_HEADERS}, body)

    async def serve(request: AdminRequest) -> Answer:
        return answer

    return serve


def routes(
    stats: Callable[[], dict[str, object]] | None = None,
    tail: event_tail.TailSink | None = None,
    stopping: Callable[[], bool] = lambda: False,
) -> list[Route]:
    """GET /dashboard and its assets (the files are read now, not per request), and the
    stats and event feeds when their sources are given."""
    found = [
        get(path, _file_handler(_read(name), content_type))
        for path, (name, content_type) in _FILES.items()
    ]
    if stats is not None:

        async def get_stats(_: AdminRequest) -> Answer:
            return json_response(stats())

        found.append(get("/admin/stats", get_stats))
    if tail is not None:
        sink = tail

        async def get_events(request: AdminRequest) -> Answer:
            return event_tail.stream(request, sink, stopping)

        found.append(get("/admin/events", get_events))
    return found
