"""Logical routing: which route does a request belong to, and which regions does it try.

Owns: `Router`, compiled once per rules snapshot, and `RoutePlan`, a route with everything
the request path needs precomputed (region order, gateways grouped by region).
Must not: know about gateway health, limits or HTTP clients; `pick` lives in the balancer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import orjson
from multidict import CIMultiDictProxy

from proxy.config.model import BodyMatch, Gateway, Idempotency, Route, Rules
from proxy.upstream.state import GatewayState

_NO_BODY = object()


@dataclass(frozen=True, slots=True)
class RoutePlan:
    route: Route
    name: str
    regions: frozenset[str]
    #: region asked for -> regions to try, in order (itself first, then its fallbacks)
    region_order: Mapping[str, tuple[str, ...]]
    #: region -> the route's gateways in it, in the order the route lists them
    by_region: Mapping[str, tuple[Gateway, ...]]
    gateways: tuple[Gateway, ...]
    region_header: str
    country_header: str | None
    matches: Callable[[str, str, CIMultiDictProxy[str]], bool]
    body: tuple[BodyMatch, ...]
    #: lower-case names of the headers the route reads and the gateway must get as sent
    #: (its idempotency key header): a client's Connection header cannot strip them
    owned_headers: frozenset[str] = frozenset()
    #: The route's own settings read on every request, copied here so the compiled
    #: request path reads them as fields rather than through the rules' Python objects.
    idempotency: Idempotency | None = None
    max_body: int = 0
    default_region: str = ""

    def region_for(self, headers: CIMultiDictProxy[str]) -> str:
        """The request's region: the region header if it names one of the route's regions,
        else the country header mapped through the route's countries, else the default."""
        raw = headers.get(self.region_header)
        if raw is not None:
            value = raw.strip().lower()
            if value in self.regions:
                return value
        if self.country_header is not None:
            country = headers.get(self.country_header)
            if country is not None:
                mapped = self.route.region.countries.get(country.strip().upper())
                if mapped is not None:
                    return mapped
        return self.default_region


def _compile_match(route: Route) -> Callable[[str, str, CIMultiDictProxy[str]], bool]:
    m = route.match
    exact = m.path
    prefix = m.path_prefix
    methods = m.methods
    headers = tuple((h.name, None if h.values is None else frozenset(h.values)) for h in m.headers)

    def matches(method: str, path: str, hdrs: CIMultiDictProxy[str]) -> bool:
        if methods is not None and method not in methods:
            return False
        if exact is not None and path != exact:
            return False
        if prefix is not None and not (
            path.startswith(prefix)
            and (len(path) == len(prefix) or prefix.endswith("/") or path[len(prefix)] in "/.")
        ):
            return False
        for name, values in headers:
            got = hdrs.get(name)
            if got is None or (values is not None and got not in values):
                return False
        return True

    return matches


def _body_value(doc: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return _NO_BODY
        doc = doc[key]
    return doc


def body_matches(conditions: tuple[BodyMatch, ...], doc: Any) -> bool:
    for cond in conditions:
        value = _body_value(doc, cond.path)
        # bool is an int in Python: keep `true` from matching 1.
        if value is _NO_BODY or not any(value == v and type(value) is type(v) for v in cond.values):
            return False
    return True


def compile_plan(route: Route, gateways: Mapping[str, Gateway]) -> RoutePlan:
    gws = tuple(gateways[g] for g in route.gateways)
    by_region: dict[str, list[Gateway]] = {}
    for gw in gws:
        by_region.setdefault(gw.region, []).append(gw)
    regions = frozenset(by_region)
    order: dict[str, tuple[str, ...]] = {}
    for region in regions:
        seq = [region, *route.region.fallback.get(region, ())]
        order[region] = tuple(dict.fromkeys(r for r in seq if r in regions))
    return RoutePlan(
        route=route,
        name=route.name,
        regions=regions,
        region_order=MappingProxyType(order),
        by_region=MappingProxyType({r: tuple(v) for r, v in by_region.items()}),
        gateways=gws,
        region_header=route.region.header,
        country_header=route.region.country_header,
        matches=_compile_match(route),
        body=route.match.body,
        owned_headers=(
            frozenset({route.idempotency.header.lower()}) if route.idempotency else frozenset()
        ),
        idempotency=route.idempotency,
        max_body=route.max_body,
        default_region=route.region.default,
    )


class Router:
    """Routes in order; the first whose match accepts the request wins."""

    __slots__ = ("max_body", "needs_body", "plans", "rules", "states", "transaction_headers")

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.transaction_headers = rules.transaction_headers
        #: The runtime state of each of these rules' gateways, bound when the rules are
        #: published: a request keeps the gateways of the rules it started with even when a
        #: reload removes them meanwhile.
        self.states: Mapping[str, GatewayState] = MappingProxyType({})
        self.plans = tuple(compile_plan(r, rules.gateways) for r in rules.routes)
        self.max_body = max((p.max_body for p in self.plans), default=0)
        self.needs_body = any(p.body for p in self.plans)

    def match(
        self, method: str, path: str, headers: CIMultiDictProxy[str], body: bytes = b""
    ) -> RoutePlan | None:
        doc: Any = _NO_BODY
        for plan in self.plans:
            if not plan.matches(method, path, headers):
                continue
            if plan.body:
                if doc is _NO_BODY:
                    try:
                        doc = orjson.loads(body) if body else None
                    except orjson.JSONDecodeError:
                        doc = None
                if not body_matches(plan.body, doc):
                    continue
            return plan
        return None

    def match_without_body(
        self, method: str, path: str, headers: CIMultiDictProxy[str]
    ) -> RoutePlan | None:
        """The first route whose path, method and headers match, ignoring body conditions."""
        for plan in self.plans:
            if plan.matches(method, path, headers):
                return plan
        return None


def compile_router(rules: Rules) -> Router:
    return Router(rules)
