"""Builders and a recording emitter shared by the gateway-health tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.config.model import (
    Degradation,
    Gateway,
    HealthCheck,
    Limits,
    Match,
    OutlierDetection,
    RegionPolicy,
    Route,
    Source,
)
from proxy.events import Severity

SRC = Source(file="rules/test.yaml", line=1)


@dataclass
class Recorder:
    """An Emitter that keeps every event, to assert on transitions."""

    events: list[tuple[str, Severity, dict[str, object]]] = field(default_factory=list)

    def emit(self, kind: str, severity: Severity, /, **fields: object) -> None:
        self.events.append((kind, severity, fields))

    def kinds(self) -> list[str]:
        return [k for k, _, _ in self.events]

    def of(self, kind: str) -> list[dict[str, object]]:
        return [f for k, _, f in self.events if k == kind]

    def clear(self) -> None:
        self.events.clear()


def gateway(
    name: str = "g1",
    *,
    weight: int = 1,
    port: int = 8080,
    limits: Limits | None = None,
    outlier: OutlierDetection | None = None,
    degradation: Degradation | None = None,
    health_check: HealthCheck | None = None,
    base_path: str = "",
) -> Gateway:
    return Gateway(
        name=name,
        url=f"http://127.0.0.1:{port}{base_path}",
        scheme="http",
        host="127.0.0.1",
        port=port,
        base_path=base_path,
        region="eu",
        weight=weight,
        provider=name,
        limits=limits or Limits(),
        health_check=health_check,
        outlier=outlier or OutlierDetection(),
        degradation=degradation or Degradation(),
        source=SRC,
    )


def route(name: str, gateways: tuple[str, ...], max_ejected_percent: float = 50.0) -> Route:
    return Route(
        name=name,
        match=Match(path_prefix="/"),
        region=RegionPolicy(default="eu"),
        gateways=gateways,
        max_ejected_percent=max_ejected_percent,
        source=SRC,
    )
