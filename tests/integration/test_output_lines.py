"""The exact bytes a real `payswitch run` writes on stdout for a request: the access-log
line and the transaction events, field order and number forms included.

Log shippers and event consumers parse these lines; how they are built and batched may
change, the bytes may not. Values that differ run to run (times, ids, durations, the
client's port) are replaced by placeholders before comparing; everything else is pinned.
"""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import aiohttp
import pytest

from bench.procs import free_port
from tests.integration.test_log_outputs import _ready, start
from tests.integration.test_reload_cli import DEADLINE, GRACE, rules_text
from tests.support import gateways

#: (pattern, placeholder): each variable value, by the form it is written in.
_VARIABLE = (
    (re.compile(rb'"time":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"'), b'"time":"T"'),
    (re.compile(rb'"(id|transaction_id|attempt_id)":"[0-9a-f]{28}"'), rb'"\1":"ID"'),
    (re.compile(rb'"duration_ms":\d+(\.\d+)?'), b'"duration_ms":D'),
    (re.compile(rb'"client":"127\.0\.0\.1"'), b'"client":"C"'),
)

SUCCEEDED = [
    b'{"kind":"transaction.pending","severity":"info","time":"T","id":"ID","fields":'
    b'{"transaction_id":"ID","route":"deposits","region":"eu","gateway":null,'
    b'"attempt_id":null,"attempts":0,"status":null,"duration_ms":D}}',
    b'{"kind":"transaction.succeeded","severity":"info","time":"T","id":"ID","fields":'
    b'{"transaction_id":"ID","route":"deposits","region":"eu","gateway":"g1",'
    b'"attempt_id":"ID","attempts":1,"status":200,"duration_ms":D}}',
    b'{"time":"T","log":"access","method":"POST","path":"/v1/deposits","status":200,'
    b'"route":"deposits","region":"eu","gateway":"g1","transaction_id":"ID","tried":[],'
    b'"error":null,"duration_ms":D,"client":"C"}',
]
NO_ROUTE = [
    b'{"time":"T","log":"access","method":"GET","path":"/nowhere","status":404,'
    b'"route":"-","region":null,"gateway":null,"transaction_id":null,"tried":[],'
    b'"error":"no-route","duration_ms":D,"client":"C"}',
]
FAILED = [
    b'{"kind":"transaction.pending","severity":"info","time":"T","id":"ID","fields":'
    b'{"transaction_id":"ID","route":"deposits","region":"eu","gateway":null,'
    b'"attempt_id":null,"attempts":0,"status":null,"duration_ms":D}}',
    b'{"kind":"transaction.unknown","severity":"warning","time":"T","id":"ID","fields":'
    b'{"transaction_id":"ID","route":"deposits","region":"eu","gateway":"g1",'
    b'"attempt_id":"ID","attempts":1,"status":503,"duration_ms":D}}',
    b'{"time":"T","log":"access","method":"POST","path":"/v1/deposits","status":503,'
    b'"route":"deposits","region":"eu","gateway":"g1","transaction_id":"ID","tried":[],'
    b'"error":null,"duration_ms":D,"client":"C"}',
]


def _normal(line: bytes) -> bytes:
    for pattern, placeholder in _VARIABLE:
        line = pattern.sub(placeholder, line)
    return line


@pytest.mark.parametrize(
    ("method", "path", "mode", "expected"),
    [
        ("POST", "/v1/deposits", "ok", SUCCEEDED),
        ("GET", "/nowhere", "ok", NO_ROUTE),
        ("POST", "/v1/deposits", "status", FAILED),
    ],
    ids=["payment-succeeds", "no-route", "gateway-503"],
)
async def test_stdout_lines_of_one_request_are_byte_for_byte_pinned(
    tmp_path: Path, method: str, path: str, mode: str, expected: list[bytes]
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    out_path = tmp_path / "stdout"
    listen, admin = free_port(), free_port()
    async with gateways("g1") as g:
        g["g1"].set(mode=mode, status=503)
        (rules / "rules.yaml").write_text(rules_text({"g1": g["g1"].url}, "g1"), encoding="utf-8")
        with out_path.open("wb") as out, (tmp_path / "stderr").open("wb") as err:
            proc = start(rules, listen, admin, out.fileno(), err.fileno(), "--no-watch")
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            await _ready(http, f"http://127.0.0.1:{admin}", proc)
            async with http.request(method, f"http://127.0.0.1:{listen}{path}") as resp:
                await resp.read()
        finally:
            await http.close()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, GRACE + DEADLINE + 5) == 0
    lines = [_normal(x) for x in out_path.read_bytes().splitlines()]
    # Events and access lines are two streams batched apart: each keeps its own order.
    assert [x for x in lines if x.startswith(b'{"kind":"transaction.')] == [
        x for x in expected if x.startswith(b'{"kind":')
    ]
    assert [x for x in lines if b'"log":"access"' in x] == [
        x for x in expected if b'"log":"access"' in x
    ]
