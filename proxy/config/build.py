"""Semantic checks over schema-valid rules documents, and construction of the model.

Owns: what JSON Schema cannot say (names unique across files, references resolve, every
region of a route served by one of its gateways, timeouts consistent) and turning the
documents into the frozen `Rules`; every problem becomes a `ConfigIssue` with its line.
Must not: read files or parse YAML (`proxy.config.load` does), or hold runtime state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, cast
from urllib.parse import urlsplit

from proxy.config import model
from proxy.config.issues import ConfigIssue, Doc
from proxy.config.secrets import gateway_headers, url_credentials
from proxy.config.units import parse_duration, parse_rate, parse_size
from proxy.upstream.tls import TLSConfigError, client_context


class Builder:
    """Semantic checks and model construction over schema-valid documents."""

    def __init__(self, docs: Sequence[Doc], *, read_secrets: bool = True) -> None:
        self.docs = docs
        self.read_secrets = read_secrets
        self.issues: list[ConfigIssue] = []
        #: Gateways defined but refused (a bad url), by name, with their region: a route
        #: naming one is left out without a second message saying it is not defined.
        self.refused: dict[str, str] = {}

    def build(self) -> model.Rules:
        gateways: dict[str, model.Gateway] = {}
        routes: list[model.Route] = []
        route_names: dict[str, str] = {}
        headers = model.TransactionHeaders()
        header_doc: Doc | None = None
        for doc in self.docs:
            for name, spec in doc.data.get("gateways", {}).items():
                where = ["gateways", name]
                if name in gateways:
                    first = gateways[name].source
                    self.issues.append(
                        doc.issue(
                            where,
                            f"gateway {name!r} is already defined at {first.file}:{first.line}",
                        )
                    )
                    continue
                gw = self._gateway(doc, name, spec)
                if gw is not None:
                    gateways[name] = gw
                else:
                    self.refused[name] = spec["region"]
            if "transaction_headers" in doc.data:
                if header_doc is not None:
                    self.issues.append(
                        doc.issue(["transaction_headers"], f"already set in {header_doc.file}")
                    )
                header_doc = doc
                th = doc.data["transaction_headers"]
                headers = model.TransactionHeaders(
                    transaction_id=th.get("transaction_id", headers.transaction_id),
                    attempt_id=th.get("attempt_id", headers.attempt_id),
                )
        for doc in self.docs:
            for i, spec in enumerate(doc.data.get("routes", [])):
                r_where: list[object] = ["routes", i]
                name = spec["name"]
                if name in route_names:
                    self.issues.append(
                        doc.issue(
                            [*r_where, "name"],
                            f"route {name!r} is already defined in {route_names[name]}",
                        )
                    )
                    continue
                route_names[name] = doc.file
                route = self._route(doc, r_where, spec, gateways)
                if route is not None:
                    routes.append(route)
        if not routes and not self.issues:
            first_doc = self.docs[0] if self.docs else None
            self.issues.append(
                ConfigIssue(
                    first_doc.file if first_doc else "-",
                    1,
                    "/routes",
                    "no routes are defined in any rules file",
                )
            )
        return model.Rules(
            gateways=MappingProxyType(gateways),
            routes=tuple(routes),
            transaction_headers=headers,
            files=tuple(d.file for d in self.docs),
            raw=MappingProxyType({d.file: d.data for d in self.docs}),
        )

    # -- helpers --------------------------------------------------------------------------

    def _duration(
        self, doc: Doc, where: Sequence[object], spec: Mapping[str, Any], key: str, default: float
    ) -> float:
        if key not in spec:
            return default
        try:
            return parse_duration(spec[key])
        except ValueError as exc:
            self.issues.append(doc.issue([*where, key], str(exc)))
            return default

    def _gateway(self, doc: Doc, name: str, spec: Mapping[str, Any]) -> model.Gateway | None:
        where: list[object] = ["gateways", name]
        url = spec["url"].rstrip("/")
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # an unclosed "[" of an IPv6 host, among others
            self.issues.append(doc.issue([*where, "url"], f"not a URL ({exc}): {url!r}"))
            return None
        credentials = url_credentials(parts)
        if credentials is not None:
            # Reported, but the gateway is still built: its routes need not fail with it.
            self.issues.append(doc.issue([*where, "url"], credentials))
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            self.issues.append(doc.issue([*where, "url"], f"invalid port in {url!r}"))
            return None
        if not parts.hostname:
            self.issues.append(doc.issue([*where, "url"], f"no host in {url!r}"))
            return None
        headers = gateway_headers(
            doc, [*where, "headers"], spec.get("headers", {}), self.issues, read=self.read_secrets
        )
        lim = spec.get("limits", {})
        rate = parse_rate(lim["rate"]) if "rate" in lim else None
        burst = lim.get("burst")
        if rate is not None and burst is None:
            burst = max(1, int(rate))
        limits = model.Limits(
            rate=rate,
            burst=burst,
            max_in_flight=lim.get("max_in_flight"),
            max_connections=lim.get("max_connections"),
        )
        if burst is not None and rate is None:
            self.issues.append(
                doc.issue([*where, "limits", "burst"], "burst needs a rate to refill it")
            )
        hc_spec = spec.get("health_check")
        health_check = None
        if hc_spec is not None:
            hw = [*where, "health_check"]
            d = model.HealthCheck()
            health_check = model.HealthCheck(
                path=hc_spec.get("path", d.path),
                method=hc_spec.get("method", d.method),
                interval=self._duration(doc, hw, hc_spec, "interval", d.interval),
                timeout=self._duration(doc, hw, hc_spec, "timeout", d.timeout),
                healthy_threshold=hc_spec.get("healthy_threshold", d.healthy_threshold),
                unhealthy_threshold=hc_spec.get("unhealthy_threshold", d.unhealthy_threshold),
                expected_statuses=tuple(hc_spec.get("expected_statuses", d.expected_statuses)),
            )
            if health_check.timeout > health_check.interval:
                self.issues.append(doc.issue([*hw, "timeout"], "timeout must not exceed interval"))
        o_spec = spec.get("outlier", {})
        ow = [*where, "outlier"]
        od = model.OutlierDetection()
        outlier = model.OutlierDetection(
            consecutive_failures=o_spec.get("consecutive_failures", od.consecutive_failures),
            failure_percentage=float(o_spec.get("failure_percentage", od.failure_percentage)),
            window=self._duration(doc, ow, o_spec, "window", od.window),
            min_requests=o_spec.get("min_requests", od.min_requests),
            base_ejection=self._duration(doc, ow, o_spec, "base_ejection", od.base_ejection),
            max_ejection=self._duration(doc, ow, o_spec, "max_ejection", od.max_ejection),
            slow_start=self._duration(doc, ow, o_spec, "slow_start", od.slow_start),
        )
        if outlier.max_ejection < outlier.base_ejection:
            self.issues.append(
                doc.issue([*ow, "max_ejection"], "max_ejection must be at least base_ejection")
            )
        g_spec = spec.get("degradation", {})
        gw_ = [*where, "degradation"]
        dd = model.Degradation()
        degradation = model.Degradation(
            enabled=g_spec.get("enabled", dd.enabled),
            short_window=self._duration(doc, gw_, g_spec, "short_window", dd.short_window),
            long_window=self._duration(doc, gw_, g_spec, "long_window", dd.long_window),
            latency_ratio=float(g_spec.get("latency_ratio", dd.latency_ratio)),
            error_rate=float(g_spec.get("error_rate", dd.error_rate)),
            min_score=float(g_spec.get("min_score", dd.min_score)),
            exploration=float(g_spec.get("exploration", dd.exploration)),
        )
        if degradation.long_window <= degradation.short_window:
            self.issues.append(
                doc.issue([*gw_, "long_window"], "long_window must be longer than short_window")
            )
        return model.Gateway(
            name=name,
            url=url,
            scheme=parts.scheme,
            host=parts.hostname,
            port=port,
            base_path=parts.path.rstrip("/"),
            region=spec["region"],
            weight=spec.get("weight", 1),
            provider=spec.get("provider", name),
            limits=limits,
            health_check=health_check,
            outlier=outlier,
            degradation=degradation,
            tls=self._tls(doc, where, spec, parts.scheme),
            headers=headers,
            source=doc.source(where),
        )

    def _tls(
        self, doc: Doc, where: list[object], spec: Mapping[str, Any], scheme: str
    ) -> model.GatewayTLS | None:
        """The gateway's TLS settings with their context, its files loaded now so a bad one
        refuses the reload; relative paths are from the rules file's folder."""
        t_spec = spec.get("tls")
        if scheme != "https":
            if t_spec is not None:
                self.issues.append(doc.issue([*where, "tls"], "tls needs an https:// url"))
            return None
        t_spec = t_spec or {}
        base = os.path.dirname(doc.file)
        files = {
            k: os.path.join(base, t_spec[k])
            for k in ("ca_file", "client_cert", "client_key")
            if k in t_spec
        }
        try:
            context = client_context(**files)
        except TLSConfigError as exc:
            self.issues.append(doc.issue([*where, "tls"], str(exc)))
            return None
        return model.GatewayTLS(server_name=t_spec.get("server_name"), context=context, **files)

    def _route(
        self,
        doc: Doc,
        where: list[object],
        spec: Mapping[str, Any],
        gateways: Mapping[str, model.Gateway],
    ) -> model.Route | None:
        before = len(self.issues)
        names = tuple(spec["gateways"])
        for j, gname in enumerate(names):
            if gname not in gateways and gname not in self.refused:
                known = ", ".join(sorted(gateways)) or "none"
                self.issues.append(
                    doc.issue(
                        [*where, "gateways", j], f"unknown gateway {gname!r} (defined: {known})"
                    )
                )
        route_regions = {gateways[g].region for g in names if g in gateways}
        route_regions.update(self.refused[g] for g in names if g in self.refused)
        match = self._match(spec["match"])
        region = self._region(doc, where, spec, route_regions)
        t_spec = spec.get("timeouts", {})
        tw = [*where, "timeouts"]
        td = model.Timeouts()
        per_try = self._duration(doc, tw, t_spec, "per_try", td.per_try)
        timeouts = model.Timeouts(
            per_try=per_try,
            total=self._duration(doc, tw, t_spec, "total", max(td.total, per_try)),
            connect=self._duration(doc, tw, t_spec, "connect", min(td.connect, per_try)),
            abandoned=self._duration(doc, tw, t_spec, "abandoned", td.abandoned),
            unknown_after=self._duration(doc, tw, t_spec, "unknown_after", per_try),
        )
        for key in ("per_try", "total", "connect", "unknown_after"):
            if getattr(timeouts, key) <= 0:
                self.issues.append(doc.issue([*tw, key], f"{key} must be greater than zero"))
        if timeouts.per_try > timeouts.total:
            self.issues.append(doc.issue([*tw, "per_try"], "per_try must not exceed total"))
        if timeouts.connect > timeouts.per_try:
            self.issues.append(doc.issue([*tw, "connect"], "connect must not exceed per_try"))
        idem_spec = spec.get("idempotency")
        idempotency: model.Idempotency | None = None
        if idem_spec is True:
            idempotency = model.Idempotency()
        elif isinstance(idem_spec, dict):
            idd = model.Idempotency()
            idempotency = model.Idempotency(
                header=idem_spec.get("header", idd.header),
                required=idem_spec.get("required", idd.required),
                ttl=self._duration(doc, [*where, "idempotency"], idem_spec, "ttl", idd.ttl),
                scope_header=idem_spec.get("scope_header"),
                on_store_down=idem_spec.get("on_store_down", idd.on_store_down),
            )
            if idempotency.ttl <= 0:
                self.issues.append(
                    doc.issue([*where, "idempotency", "ttl"], "ttl must be greater than zero")
                )
        if idempotency is not None:
            self._key_header_is_ours(doc, where, idempotency.header, names, gateways)
        retry = self._retry(doc, where, spec.get("retry", {}), idempotency is not None)
        max_body = model.Route.__dataclass_fields__["max_body"].default
        if "max_body" in spec:
            max_body = parse_size(spec["max_body"])
            if max_body > model.MAX_BODY_LIMIT:
                self.issues.append(
                    doc.issue(
                        [*where, "max_body"],
                        f"max_body must be at most 64MiB ({model.MAX_BODY_LIMIT:,} bytes): "
                        "request bodies are held in memory so that a retry can replay them",
                    )
                )
        if len(self.issues) > before or any(g in self.refused for g in names):
            return None
        return model.Route(
            name=spec["name"],
            match=match,
            region=region,
            gateways=names,
            timeouts=timeouts,
            retry=retry,
            max_body=cast(int, max_body),
            balancing=spec.get("balancing", "weighted-round-robin"),
            max_ejected_percent=float(spec.get("max_ejected_percent", 50.0)),
            panic=spec.get("panic", False),
            idempotency=idempotency,
            source=doc.source(where),
        )

    def _key_header_is_ours(
        self,
        doc: Doc,
        where: list[object],
        header: str,
        names: Sequence[str],
        gateways: Mapping[str, model.Gateway],
    ) -> None:
        """A gateway header must not replace the idempotency key the gateway dedupes by."""
        for name in names:
            gw = gateways.get(name)
            if gw is not None and any(h.name.lower() == header.lower() for h in gw.headers):
                self.issues.append(
                    doc.issue(
                        [*where, "idempotency"],
                        f"gateway {name!r} sets the header `{header}`, which carries this "
                        "route's idempotency keys; payswitch sets it",
                    )
                )

    @staticmethod
    def _match(spec: Mapping[str, Any]) -> model.Match:
        headers = []
        for hname, val in spec.get("headers", {}).items():
            values = None if val is True else (val,) if isinstance(val, str) else tuple(val)
            headers.append(model.HeaderMatch(name=hname.lower(), values=values))
        body = []
        for field, val in spec.get("body", {}).items():
            values = tuple(val) if isinstance(val, list) else (val,)
            body.append(model.BodyMatch(path=tuple(field.split(".")), values=values))
        methods = spec.get("methods")
        return model.Match(
            path=spec.get("path"),
            path_prefix=spec.get("path_prefix"),
            methods=frozenset(methods) if methods else None,
            headers=tuple(headers),
            body=tuple(body),
        )

    def _region(
        self, doc: Doc, where: list[object], spec: Mapping[str, Any], regions: set[str]
    ) -> model.RegionPolicy:
        r_spec = spec.get("region")
        rw = [*where, "region"]
        if r_spec is None:
            # A route without a region block serves every region its gateways are in, the
            # first listed gateway's region first.
            first = sorted(regions)[0] if regions else "default"
            return model.RegionPolicy(
                default=first, fallback=MappingProxyType({first: tuple(sorted(regions - {first}))})
            )
        known = ", ".join(sorted(regions)) or "none"
        if r_spec["default"] not in regions:
            self.issues.append(
                doc.issue(
                    [*rw, "default"],
                    f"no gateway of this route is in region {r_spec['default']!r} (route regions: {known})",
                )
            )
        fallback = r_spec.get("fallback", {})
        for src, targets in fallback.items():
            if src not in regions:
                self.issues.append(
                    doc.issue(
                        [*rw, "fallback", src],
                        f"no gateway of this route is in region {src!r} (route regions: {known})",
                    )
                )
            for k, tgt in enumerate(targets):
                if tgt not in regions:
                    self.issues.append(
                        doc.issue(
                            [*rw, "fallback", src, k],
                            f"no gateway of this route is in region {tgt!r} (route regions: {known})",
                        )
                    )
                elif tgt == src:
                    self.issues.append(
                        doc.issue([*rw, "fallback", src, k], "a region cannot fall back to itself")
                    )
        for country, reg in r_spec.get("countries", {}).items():
            if reg not in regions:
                self.issues.append(
                    doc.issue(
                        [*rw, "countries", country],
                        f"no gateway of this route is in region {reg!r} (route regions: {known})",
                    )
                )
        return model.RegionPolicy(
            header=r_spec.get("header", "X-Region"),
            default=r_spec["default"],
            fallback=MappingProxyType({k: tuple(v) for k, v in fallback.items()}),
            country_header=r_spec.get("country_header"),
            countries=MappingProxyType(dict(r_spec.get("countries", {}))),
        )

    def _retry(
        self, doc: Doc, where: list[object], spec: Mapping[str, Any], idempotent_keys: bool
    ) -> model.RetryPolicy:
        rw = [*where, "retry"]
        on = spec.get("on", ["connect-failure"])
        statuses = {s for s in on if isinstance(s, int)}
        if "5xx" in on:
            statuses |= set(range(500, 600))
        bd = model.Backoff()
        b_spec = spec.get("backoff", {})
        backoff = model.Backoff(
            base=self._duration(doc, [*rw, "backoff"], b_spec, "base", bd.base),
            max=self._duration(doc, [*rw, "backoff"], b_spec, "max", bd.max),
        )
        if backoff.max < backoff.base:
            self.issues.append(doc.issue([*rw, "backoff", "max"], "max must be at least base"))
        default_policy = "same-provider" if idempotent_keys else "never"
        return model.RetryPolicy(
            attempts=spec.get("attempts", 2),
            on_connect_failure=True,
            on_timeout="timeout" in on,
            on_reset="reset" in on,
            on_statuses=frozenset(statuses),
            not_processed=frozenset(spec.get("not_processed", ())),
            after_ambiguous=spec.get("after_ambiguous", default_policy),
            backoff=backoff,
        )
