"""Who may ask: the API keys and access codes a request names (``Authorization``, or ``x-api-key``), and the
``Host`` names served."""

from __future__ import annotations

import hashlib
import hmac

from polychat.server.gateway.config import GatewayConfig

__all__ = ["Hosts", "Keys", "host_name", "key_id"]

# Host names (without the port) a loopback server is reached by; always allowed.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# Addresses that mean "every interface": not names a client sends.
ANY_ADDRESS = ("0.0.0.0", "::", "")


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]


class Keys:
    """The API keys and the access codes, as bytes with their ids; rebuilt when the config changes."""

    def __init__(self) -> None:
        self._source: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        self._keys: list[tuple[bytes, str]] = []
        self._codes: list[tuple[bytes, str]] = []

    def identify(self, authorization: bytes | None, config: GatewayConfig, api_key: bytes | None = None) -> str | None:
        """The id of the key or code in ``authorization`` (``Bearer <key>`` or ``Bearer nk-<key>``) or in
        ``api_key`` (an ``x-api-key`` header, as Anthropic's clients send the key), or None."""
        source = (tuple(config.api_keys), tuple(config.access_codes))
        if source != self._source:
            self._source = source
            self._keys = [(key.encode(), key_id(key)) for key in source[0]]
            self._codes = [(code.encode(), key_id(code)) for code in source[1]]
        candidates = [api_key.strip()] if api_key and api_key.strip() else []
        if authorization and authorization[:7].lower() == b"bearer ":
            token = authorization[7:].strip()
            candidates += [token, token[3:]] if token.startswith(b"nk-") else [token]
        if not candidates:
            return None
        known = [*self._keys, *self._codes]
        found = None
        # Every key is compared (no early exit), each in constant time.
        for candidate in candidates:
            for key, identity in known:
                if hmac.compare_digest(candidate, key):
                    found = identity
        return found


class Hosts:
    """The ``Host`` header names served (the port aside); rebuilt when the config changes."""

    def __init__(self) -> None:
        self._source: tuple[str, tuple[str, ...]] = ("", ())
        self._names: frozenset[str] = frozenset(LOOPBACK_HOSTS)
        self._domains: tuple[str, ...] = ()
        self._any = False

    def allows(self, host: bytes | None, config: GatewayConfig) -> bool:
        """Whether a request whose ``Host`` header is ``host`` is for this server (no header: HTTP/1.0, allowed)."""
        source = (config.host, tuple(config.allowed_hosts))
        if source != self._source:
            self._source = source
            allowed = [name.strip().lower().rstrip(".") for name in (config.host, *config.allowed_hosts)]
            allowed = [name[1:-1] if name.startswith("[") and name.endswith("]") else name for name in allowed]
            self._any = "*" in allowed
            self._names = frozenset(
                (*LOOPBACK_HOSTS, *(name for name in allowed if name not in ANY_ADDRESS and name[0] != "."))
            )
            self._domains = tuple(name for name in allowed if name.startswith(".") and len(name) > 1)
        if host is None or self._any:
            return True
        name = host_name(host.decode("latin-1"))
        return name in self._names or any(name.endswith(domain) or name == domain[1:] for domain in self._domains)


def host_name(host: str) -> str:
    """The name in a ``Host`` header value, lower-case, without the port or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    if host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host.rstrip(".")
