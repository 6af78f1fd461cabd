"""/metrics of a proxy that served traffic: promtool-clean, OpenMetrics when asked, and the
families an SRE expects (process, build, store, refusals, drops) present."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.openmetrics.parser import text_string_to_metric_families

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
    idempotency: {{header: Idempotency-Key, ttl: 1h}}
"""

OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is required (.ci/run installs it)"
    return path


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )


async def _malformed(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GARBAGE\r\n\r\n")
    await writer.drain()
    answer = await reader.read(4096)
    writer.close()
    return answer


async def test_metrics_are_promtool_clean_and_negotiate_openmetrics(tmp_path: Path) -> None:
    async with gateways("g1", "g2") as g:
        await g["g1"].down()
        async with running_proxy(RULES.format(g1=g["g1"].url, g2=g["g2"].url), tmp_path) as p:
            p.rt.tracing = Tracing([SimpleSpanProcessor(InMemorySpanExporter())])
            p.rt.metrics.exemplars = True
            for i in range(3):
                status, _, _ = await p.post(headers={"Idempotency-Key": f"k{i}"})
                assert status == 200
            assert (await _malformed(p.server.port)).startswith(b"HTTP/1.1 400")
            async with p.session.get(p.admin_url + "/metrics") as resp:
                assert resp.content_type == "text/plain"
                text = await resp.text()
            async with p.session.get(
                p.admin_url + "/metrics", headers={"Accept": OPENMETRICS}
            ) as r:
                assert r.content_type == "application/openmetrics-text"
                om = await r.text()
            await p.rt.tracing.close()

    done = await asyncio.to_thread(promtool_check, text)
    assert done.returncode == 0, done.stdout + done.stderr

    parsed = text_string_to_metric_families(om)  # type: ignore[no-untyped-call]
    families = {f.name: f for f in parsed}
    for name in (
        "process_resident_memory_bytes",
        "process_open_fds",
        "python_info",
        "payswitch_build",
        "payswitch_idempotency_store_operations",
        "payswitch_idempotency_store_operation_duration_seconds",
        "payswitch_idempotency_store_evictions",
        "payswitch_idempotency_store_keys",
        "payswitch_listener_refusals",
        "payswitch_events_dropped",
        "payswitch_log_lines_dropped",
        "payswitch_attempts",
    ):
        assert name in families, name
    refusals = {
        s.labels["reason"]: s.value
        for s in families["payswitch_listener_refusals"].samples
        if s.name.endswith("_total")
    }
    assert refusals.get("malformed") == 1
    attempts = {
        s.labels["outcome"] for s in families["payswitch_attempts"].samples if "outcome" in s.labels
    }
    assert "connect-failure" in attempts, attempts
    claims = [
        s.value
        for s in families["payswitch_idempotency_store_operations"].samples
        if s.labels == {"operation": "claim", "result": "ok"}
    ]
    assert claims == [3]
    exemplars = [
        s.exemplar
        for s in families["payswitch_request_duration_seconds"].samples
        if s.exemplar is not None
    ]
    assert exemplars and all(len(e.labels["trace_id"]) == 32 for e in exemplars)
