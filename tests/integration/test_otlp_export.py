"""Traces leave a real `payswitch run` over OTLP/HTTP with only the endpoint configured.

The collector is a stand-in: an aiohttp server that decodes the protobuf export requests
with opentelemetry-proto, as a real collector's OTLP/HTTP receiver would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from bench.procs import free_port
from tests.integration.test_log_outputs import start
from tests.integration.test_reload_cli import DEADLINE, GRACE, rules_text, until
from tests.support import gateways

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Collector:
    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Span]] = []
        self.content_types: set[str] = set()

    async def traces(self, request: web.Request) -> web.Response:
        self.content_types.add(request.content_type)
        export = ExportTraceServiceRequest.FromString(await request.read())
        for rs in export.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                self.spans.extend((resource, span) for span in ss.spans)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )


@asynccontextmanager
async def collector() -> AsyncIterator[tuple[Collector, str]]:
    c = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", c.traces)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield c, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def attrs(span: Span) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in span.attributes}


async def test_only_the_otlp_endpoint_exports_traces_continuing_the_clients(
    tmp_path: Path,
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    listen, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    async with collector() as (col, endpoint), gateways("g1", "g2") as g:
        await g["g1"].down()
        urls = {n: gw.url for n, gw in g.items()}
        (rules / "rules.yaml").write_text(rules_text(urls, "g1, g2"), encoding="utf-8")
        proc = start(
            rules,
            listen,
            admin,
            subprocess.DEVNULL,
            subprocess.DEVNULL,
            *("--events", "off", "--access-log", "off"),
            env={**env, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint},
        )
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

                async def ready() -> bool:
                    assert proc.poll() is None, "payswitch exited early"
                    try:
                        async with http.get(f"http://127.0.0.1:{admin}/readyz") as r:
                            return r.status == 200
                    except aiohttp.ClientError:
                        return False

                await until("payswitch ready", ready, 15.0)
                headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
                async with http.post(
                    f"http://127.0.0.1:{listen}/v1/deposits", data=b"{}", headers=headers
                ) as resp:
                    assert resp.status == 200
                    txn = resp.headers["X-Payswitch-Transaction-Id"]
            # SIGTERM flushes the batch processor: no wait for its schedule.
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, GRACE + DEADLINE + 10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        await until("spans at the collector", lambda: len(col.spans) >= 3, 5.0)
    assert col.content_types == {"application/x-protobuf"}
    resource = col.spans[0][0]
    assert resource["service.name"] == "payswitch"
    spans = [s for _, s in col.spans]
    assert {s.trace_id.hex() for s in spans} == {TRACE_ID}
    [server] = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    assert server.parent_span_id.hex() == PARENT_ID
    assert {
        "http.request.method": "POST",
        "url.path": "/v1/deposits",
        "payswitch.route": "deposits",
        "payswitch.region": "eu",
        "payswitch.transaction_id": txn,
        "http.response.status_code": 200,
    }.items() <= attrs(server).items()
    clients = sorted(
        (s for s in spans if s.kind == Span.SPAN_KIND_CLIENT),
        key=lambda s: attrs(s)["payswitch.attempt_no"],
    )
    assert [attrs(s)["payswitch.gateway"] for s in clients] == ["g1", "g2"]
    for span, gw in zip(clients, ("g1", "g2"), strict=True):
        a = attrs(span)
        assert span.parent_span_id == server.span_id
        assert a["http.request.method"] == "POST"
        assert a["server.address"] == "127.0.0.1"
        assert a["server.port"] == int(g[gw].url.rsplit(":", 1)[1])
        assert a["url.full"] == g[gw].url + "/v1/deposits"
        assert (a["payswitch.route"], a["payswitch.region"]) == ("deposits", "eu")
        assert a["payswitch.provider"] == gw
        assert a["payswitch.transaction_id"] == txn
    assert attrs(clients[0])["payswitch.outcome"] == "connect-failure"
    assert attrs(clients[1])["payswitch.outcome"] == "answered"
    seen = g["g2"].requests()[0].headers["traceparent"]
    assert seen == f"00-{TRACE_ID}-{clients[1].span_id.hex()}-01"
