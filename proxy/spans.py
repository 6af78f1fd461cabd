"""The span current where a line is logged, a metric observed or an event emitted.

Owns: `current_context`, the one way code outside proxy.tracing reads the current span's
context.
Must not: import OpenTelemetry. With tracing off nothing has loaded it, so no span can be
current: the answer is None at the cost of a dictionary lookup, and the ~50 modules of the
API and SDK stay out of the process.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext


def current_context() -> SpanContext | None:
    """The current span's context when it is valid, else None."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    ctx: SpanContext = trace.get_current_span().get_span_context()
    return ctx if ctx.is_valid else None
