"""TLS to gateways: the client-side SSLContext of one gateway, built when rules load.

Owns: turning a gateway's `tls:` settings (CA file, client certificate and key) into a
verifying `ssl.SSLContext` — system CAs by default, certificate and hostname always checked,
TLS 1.2 at least — and reusing the context of identical settings whose files did not change,
so a reload keeps its pooled TLS connections and a rotated certificate gets new ones.
Must not: open connections, or ever build a context that skips verification.
"""

from __future__ import annotations

import logging
import os
import ssl

logger = logging.getLogger(__name__)

#: Contexts kept for reuse across reloads; a handful of gateways in practice.
_CACHE_SIZE = 64

_Key = tuple[str | None, str | None, str | None, tuple[float, ...]]
_cache: dict[_Key, ssl.SSLContext] = {}


class TLSConfigError(ValueError):
    """A CA file, certificate or key that cannot be used; the message names which and why."""


def client_context(
    *, ca_file: str | None = None, client_cert: str | None = None, client_key: str | None = None
) -> ssl.SSLContext:
    """A verifying client context; raises TLSConfigError naming the file at fault."""
    files = [f for f in (ca_file, client_cert, client_key) if f is not None]
    key: _Key = (ca_file, client_cert, client_key, tuple(_mtime(f) for f in files))
    ctx = _cache.get(key)
    if ctx is None:
        ctx = _build(ca_file, client_cert, client_key)
        if len(_cache) >= _CACHE_SIZE:
            _cache.clear()
        _cache[key] = ctx
    return ctx


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError as exc:
        raise TLSConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


def _build(ca_file: str | None, client_cert: str | None, client_key: str | None) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"ca_file {ca_file}: not a usable CA bundle ({exc})") from None
    if ca_file is not None and not ctx.get_ca_certs():
        raise TLSConfigError(f"ca_file {ca_file}: holds no CA certificate")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_key is not None and client_cert is None:
        raise TLSConfigError("client_key needs client_cert")
    if client_cert is not None:
        try:
            ctx.load_cert_chain(client_cert, client_key)
        except (OSError, ssl.SSLError) as exc:
            which = f"client_cert {client_cert}" + (
                f" / client_key {client_key}" if client_key else ""
            )
            raise TLSConfigError(f"{which}: cannot load the certificate and key ({exc})") from None
    # Stated, not assumed: a gateway's certificate is always verified, never bypassed.
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    return ctx
