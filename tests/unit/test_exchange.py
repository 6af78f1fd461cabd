"""Tests for proxy.exchange: each attempt sends its own id and trace context on a copy of
the request headers, and its span records how it ended."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.tracing import Tracing
from tests.support import gateways, running_proxy

RULES = """
gateways:
  g1: {{url: '{url}', region: eu}}
routes:
  - name: status
    match: {{path_prefix: /v1/status}}
    region: {{default: eu}}
    gateways: [g1]
"""


async def test_each_attempt_sends_its_own_id_on_a_copy_of_the_headers(tmp_path: Path) -> None:
    async with gateways("g1") as g:
        async with running_proxy(RULES.format(url=g["g1"].url), tmp_path) as p:
            for _ in range(2):
                assert (await p.request("GET", "/v1/status"))[0] == 200
            ids = [r.headers["X-Payswitch-Attempt-Id"] for r in g["g1"].requests()]
            assert len(set(ids)) == 2


async def test_traced_attempt_injects_context_and_records_the_status(tmp_path: Path) -> None:
    async with gateways("g1") as g:
        g["g1"].set(mode="status", status=502)
        async with running_proxy(RULES.format(url=g["g1"].url), tmp_path) as p:
            exporter = InMemorySpanExporter()
            p.rt.tracing = Tracing([SimpleSpanProcessor(exporter)])
            assert (await p.request("GET", "/v1/status"))[0] == 502
            [seen] = g["g1"].requests()
            assert seen.headers["traceparent"]
            attempt_spans = [s for s in exporter.get_finished_spans() if s.kind.name == "CLIENT"]
            assert len(attempt_spans) == 1
            assert attempt_spans[0].status.status_code.name == "ERROR"
