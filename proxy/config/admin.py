"""Admin endpoints for the rules: what is serving, and a reload on demand.

Owns: the `GET /admin/config` and `POST /admin/reload` handlers over a `ConfigStore`.
Must not: mount itself, check tokens or pick a listener (the admin app does), or change
rules any other way than `ConfigStore.reload`.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
from typing import Any

from proxy.adminhttp import AdminRequest, Route, get, json_response, post
from proxy.config.store import ConfigStore
from proxy.http import Answer

logger = logging.getLogger(__name__)


def _json_default(value: object) -> object:
    # YAML can hold dates and timestamps; JSON cannot.
    if isinstance(value, datetime.date | datetime.datetime):
        return value.isoformat()
    return str(value)


_dumps = functools.partial(json.dumps, default=_json_default)


def config_view(store: ConfigStore[Any]) -> dict[str, object]:
    """What `GET /admin/config` answers: the serving snapshot and the last refusal."""
    snap = store.current
    return {
        "generation": snap.generation,
        "hash": snap.hash,
        "loaded_at": snap.loaded_at,
        "trigger": snap.trigger,
        "files": list(snap.rules.files),
        "rules": dict(snap.rules.raw),
        "last_error": store.last_error.as_dict() if store.last_error is not None else None,
    }


def routes(store: ConfigStore[Any]) -> list[Route]:
    async def get_config(request: AdminRequest) -> Answer:
        if not store.loaded:
            return json_response({"error": "rules not loaded yet"}, status=503)
        return json_response(config_view(store), dumps=_dumps)

    async def post_reload(request: AdminRequest) -> Answer:
        result = await store.reload("admin")
        status = 422 if result.outcome == "failure" else 200
        return json_response(result.as_dict(), status=status, dumps=_dumps)

    return [get("/admin/config", get_config), post("/admin/reload", post_reload)]
