"""Traces through the proxy: the client's W3C context continues to the gateway."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from proxy.tracing import Tracing
from tests.support import gateways, running_proxy

RULES = """
gateways:
  g1: {{url: '{g1}', region: eu}}
  g2: {{url: '{g2}', region: eu}}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits}}
    region: {{default: eu}}
    gateways: [g1, g2]
"""

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


async def test_request_and_attempt_spans_continue_the_client_trace(tmp_path: Path) -> None:
    async with gateways("g1", "g2") as g:
        await g["g1"].down()
        async with running_proxy(RULES.format(g1=g["g1"].url, g2=g["g2"].url), tmp_path) as p:
            exporter = InMemorySpanExporter()
            p.rt.tracing = Tracing([SimpleSpanProcessor(exporter)])
            status, _, _ = await p.post(headers={"traceparent": PARENT})
            assert status == 200
            seen = g["g2"].requests()[0].headers["traceparent"]
            assert seen.split("-")[1] == TRACE_ID
            spans = {s.name: s for s in exporter.get_finished_spans()}
            server = spans["POST deposits"]
            assert server.kind is SpanKind.SERVER
            assert format(server.context.trace_id, "032x") == TRACE_ID
            attempts = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.CLIENT]
            assert [s.name for s in attempts] == ["attempt g1", "attempt g2"]
            assert all(
                s.parent is not None and s.parent.span_id == server.context.span_id
                for s in attempts
            )
            # The gateway sees the answering attempt's span as its parent.
            assert seen.split("-")[2] == format(attempts[1].context.span_id, "016x")
            await p.rt.tracing.close()


async def test_tracing_off_passes_the_client_context_through_untouched(tmp_path: Path) -> None:
    async with gateways("g1", "g2") as g:
        async with running_proxy(RULES.format(g1=g["g1"].url, g2=g["g2"].url), tmp_path) as p:
            assert not p.rt.tracing.enabled
            await p.post(headers={"traceparent": PARENT})
            seen = [r.headers.get("traceparent") for gw in g.values() for r in gw.requests()]
            assert seen == [PARENT]
