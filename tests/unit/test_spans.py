"""The current span's context, read without importing OpenTelemetry when tracing is off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler

from proxy.spans import current_context


def test_no_span_outside_any_span() -> None:
    assert current_context() is None


@pytest.mark.parametrize(
    ("sampler", "sampled"), [(ALWAYS_ON, True), (ALWAYS_OFF, False)], ids=["sampled", "unsampled"]
)
def test_the_span_current_where_it_is_asked(sampler: Sampler, sampled: bool) -> None:
    tracer = TracerProvider(sampler=sampler).get_tracer("test")
    with tracer.start_as_current_span("outer") as span:
        ctx = current_context()
        assert ctx is not None
        assert ctx.span_id == span.get_span_context().span_id
        assert ctx.trace_flags.sampled is sampled
    assert current_context() is None


#: Environments in which the proxy must start without OpenTelemetry or aiohttp loaded.
LEAN = {
    "no OTEL variables": {},
    "exporter none": {"OTEL_TRACES_EXPORTER": "none"},
    "sdk disabled": {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"},
}

_PROBE = """
import logging, os, sys
from proxy.app import Runtime
from proxy.settings import Settings
rt = Runtime(Settings(rules=("rules",), events="off", access_log=True))
logging.getLogger("proxy").warning("a line logged with tracing off")
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"opentelemetry", "aiohttp"})
print(rt.tracing.enabled, loaded)
"""


@pytest.mark.parametrize("env", LEAN.values(), ids=LEAN)
def test_tracing_off_loads_neither_opentelemetry_nor_aiohttp(env: dict[str, str]) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split("\n")[0] == "False []", out.stdout + out.stderr
