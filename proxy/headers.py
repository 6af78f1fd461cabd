"""Which of a client's headers reach a gateway, and which of a gateway's reach the client.

Owns: the hop-by-hop list (RFC 9110 §7.6.1, plus fields a `Connection` header names), the
headers payswitch owns and a client may neither set nor strip (`X-Payswitch-*`, the routes'
idempotency key headers), the forwarding headers (`X-Forwarded-*`, `Forwarded`) which are
payswitch's to write unless the previous hop is a trusted proxy, and dropping header names
with underscores (`Content_Length` is read as `Content-Length` by some servers: a
desync nginx and Envoy also refuse to pass on).
Also `splits_a_line`: whether a head about to be written has a CR or LF inside a line.
Must not: set payswitch's own headers (transaction and attempt ids, the forwarded key):
the request path does, after this has cleaned the client's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from multidict import CIMultiDict, CIMultiDictProxy

#: RFC 9110 §7.6.1 connection-specific fields, plus the de-facto ones proxies drop.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)

#: Ours to write for the hop to the gateway: a client's copy is a claim about a path it
#: did not take, unless the client is a proxy we trust to have written them.
FORWARDING = frozenset(
    {
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-real-ip",
    }
)

OWN_PREFIX = "x-payswitch-"

_NEVER_FORWARDED = frozenset({"host", "content-length"})

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(items: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs or single addresses; ValueError naming the one that is neither."""
    nets: list[IPNetwork] = []
    for item in items:
        text = item.strip()
        if not text:
            continue
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(
                f"not an IP address or CIDR: {text!r} (write e.g. 127.0.0.1, 10.0.0.0/8)"
            ) from None
    return tuple(nets)


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderPolicy:
    """Process-wide header rules, from static settings."""

    trusted_proxies: tuple[IPNetwork, ...] = ()
    drop_underscores: bool = True
    _trust: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def trusts(self, client_ip: str | None) -> bool:
        """Is the previous hop a proxy whose forwarding headers we keep and extend?"""
        if not self.trusted_proxies or client_ip is None:
            return False
        known = self._trust.get(client_ip)
        if known is None:
            try:
                addr = ipaddress.ip_address(client_ip)
            except ValueError:
                known = False
            else:
                known = any(addr in net for net in self.trusted_proxies)
            if len(self._trust) < 4096:  # a handful of peers in practice; bounded anyway
                self._trust[client_ip] = known
        return known


DEFAULT_POLICY = HeaderPolicy()

_CONNECTION_DROPS: dict[tuple[str, frozenset[str]], frozenset[str]] = {}


def hop_by_hop(
    headers: CIMultiDictProxy[str], owned: frozenset[str] = frozenset()
) -> frozenset[str]:
    """The fields not to pass on: RFC 9110's hop-by-hop list plus any named in Connection,
    except fields in `owned` (lower-case), which a Connection header cannot make vanish."""
    conn = headers.get("Connection")
    if not conn:
        return HOP_BY_HOP
    drop = _CONNECTION_DROPS.get((conn, owned))
    if drop is None:
        named = {t.strip().lower() for t in conn.split(",") if t.strip()}
        drop = HOP_BY_HOP | (named - owned)
        if len(_CONNECTION_DROPS) < 256:  # a handful of values in practice; bounded anyway
            _CONNECTION_DROPS[(conn, owned)] = drop
    return drop


def upstream_headers(
    headers: CIMultiDictProxy[str],
    *,
    client_ip: str | None,
    scheme: str,
    host: str | None,
    policy: HeaderPolicy = DEFAULT_POLICY,
    owned: frozenset[str] = frozenset(),
) -> CIMultiDict[str]:
    """The client's headers as the gateway should see them, before payswitch adds its own.

    `owned` are the lower-case names of headers the route reads (its idempotency key header):
    never dropped as hop-by-hop, so the key claimed is the key the gateway dedupes by.
    """
    drop = hop_by_hop(headers, owned)
    trusted = policy.trusts(client_ip)
    underscores = policy.drop_underscores
    verdicts = _verdicts((drop, trusted, underscores))
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        keep = verdicts.get(k)
        if keep is None:
            lk = k.lower()
            keep = not (
                lk in drop
                or lk in _NEVER_FORWARDED
                or lk.startswith(OWN_PREFIX)
                or (underscores and "_" in lk)
                or (not trusted and lk in FORWARDING)
            )
            if len(verdicts) < _NAMES_KEPT and len(k) <= _NAME_KEPT_LEN:
                verdicts[k] = keep
        if keep:
            out.add(k, v)
    if trusted:
        prior = headers.get("X-Forwarded-For")
        if client_ip:
            out["X-Forwarded-For"] = f"{prior}, {client_ip}" if prior else client_ip
        if "X-Forwarded-Proto" not in out:
            out["X-Forwarded-Proto"] = scheme
        if host and "X-Forwarded-Host" not in out:
            out["X-Forwarded-Host"] = host
        return out
    if client_ip:
        out["X-Forwarded-For"] = client_ip
    out["X-Forwarded-Proto"] = scheme
    if host:
        out["X-Forwarded-Host"] = host
    return out


def response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The gateway's response headers as the client should see them (framing is ours)."""
    drop = hop_by_hop(headers)
    verdicts = _verdicts(drop)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        keep = verdicts.get(k)
        if keep is None:
            lk = k.lower()
            keep = not (lk in drop or lk == "content-length")
            if len(verdicts) < _NAMES_KEPT and len(k) <= _NAME_KEPT_LEN:
                verdicts[k] = keep
        if keep:
            out.add(k, v)
    return out


#: Whether a header name (as spelled on the wire) passes, per set of rules that decide
#: it: the same few names arrive on every request, so each is lowered and tested once.
#: Both levels are bounded, as a client chooses the names and the Connection header: at
#: most 16 x 128 names of at most 64 characters, well under a megabyte whatever is sent.
_VERDICTS: dict[object, dict[str, bool]] = {}
_RULE_SETS_KEPT = 16
_NAMES_KEPT = 128
_NAME_KEPT_LEN = 64


def _verdicts(rules: object) -> dict[str, bool]:
    found = _VERDICTS.get(rules)
    if found is None:
        found = {}
        if len(_VERDICTS) < _RULE_SETS_KEPT:
            _VERDICTS[rules] = found
    return found


def splits_a_line(lines: list[str]) -> bool:
    """Whether any of a head's lines (request or status line, then fields) holds a CR or
    an LF: written, it would end the line early and start a header, or a message, of its
    own. `in` on each line is a `memchr`; counting CRs and LFs over the encoded head cost
    about twice as much (twice a request, on both heads)."""
    return any("\r" in line or "\n" in line for line in lines)
