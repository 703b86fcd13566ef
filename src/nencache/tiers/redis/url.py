"""Parsing Redis/Valkey URLs into a `RedisTarget`: where to connect and how.

Accepted forms (user and password are optional and percent-decoded)::

    redis://[[user]:password@]host[:port][/db][?options]
    rediss://...                         same, over TLS
    valkey://..., valkeys://...          aliases of redis:// and rediss://
    unix://[[user]:password@]/path/to/redis.sock[?db=N]
    redis-cluster://[[user]:password@]host:port[,host:port...]   (rediss-cluster:// for TLS)

Options: `db`, and for TLS `ssl_cert_reqs` (required|optional|none), `ssl_ca_certs`,
`ssl_certfile`, `ssl_keyfile`, `ssl_check_hostname` (true|false).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

from nencache.errors import ConfigError

DEFAULT_PORT = 6379
_FLAGS: dict[str, tuple[bool, bool]] = {  # scheme -> (tls, cluster); which tier a scheme builds is the assembler's

    "redis": (False, False), "valkey": (False, False),
    "rediss": (True, False), "valkeys": (True, False),
    "redis-cluster": (False, True), "valkey-cluster": (False, True),
    "rediss-cluster": (True, True), "valkeys-cluster": (True, True),
}
SCHEMES = frozenset([*_FLAGS, "unix"])  # every scheme `parse_url` accepts
_TLS_OPTIONS = {"ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"}
_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}

Address = tuple[str, int] | str  # (host, port) or a unix socket path


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Everything needed to open connections to one Redis deployment."""

    nodes: tuple[Address, ...]
    cluster: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    tls: dict[str, str] | None = None

    def display(self) -> str:
        """The URL with the password left out (for logs and errors)."""
        scheme = ("rediss" if self.tls else "redis") + ("-cluster" if self.cluster else "")
        hosts = ",".join(n if isinstance(n, str) else f"{n[0]}:{n[1]}" for n in self.nodes)
        if isinstance(self.nodes[0], str):
            scheme = "unix"
        user = f"{self.username or ''}:***@" if self.password else ""
        return f"{scheme}://{user}{hosts}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for `rediss://` targets, `None` for plain ones."""
        if self.tls is None:
            return None
        ctx = ssl.create_default_context(cafile=self.tls.get("ssl_ca_certs"))
        reqs = _CERT_REQS[self.tls.get("ssl_cert_reqs", "required")]
        check = self.tls.get("ssl_check_hostname", "true" if reqs == ssl.CERT_REQUIRED else "false")
        ctx.check_hostname = check == "true"
        ctx.verify_mode = reqs
        if "ssl_certfile" in self.tls:
            ctx.load_cert_chain(self.tls["ssl_certfile"], self.tls.get("ssl_keyfile"))
        return ctx


def parse_url(url: str) -> RedisTarget:
    """Parse a Redis/Valkey URL; raise `ConfigError` saying what is wrong with it."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in sorted(SCHEMES))
        raise ConfigError(f"unsupported Redis URL {_redact(url)!r}; use one of {known}")
    rest = rest.partition("#")[0]
    rest, _, query = rest.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    creds, at, location = rest.rpartition("@")
    username, password = _credentials(creds) if at else (None, None)
    if scheme == "unix":
        if not location.startswith("/"):
            raise ConfigError(f"unix:// URL needs an absolute socket path, e.g. unix:///run/redis.sock (got {url!r})")
        nodes: tuple[Address, ...] = (unquote(location),)
        tls, cluster, db_text = False, False, options.pop("db", "0")
    else:
        tls, cluster = _FLAGS[scheme]
        hosts, _, path = location.partition("/")
        db_text = options.pop("db", path or "0")
        nodes = tuple(_host_port(h, url) for h in hosts.split(","))
        if len(nodes) > 1 and not cluster:
            raise ConfigError(f"several hosts in {_redact(url)!r}: use redis-cluster://host:port,host:port for a cluster")
    try:
        db = int(db_text)
    except ValueError:
        raise ConfigError(f"Redis database must be a number, got {db_text!r} in {_redact(url)!r}") from None
    if cluster and db != 0:
        raise ConfigError("Redis Cluster has only database 0; remove the /db part of the URL")
    tls_options = {k: options.pop(k) for k in list(options) if k in _TLS_OPTIONS}
    if options:
        raise ConfigError(f"unknown Redis URL option(s) {sorted(options)}; known: db, {', '.join(sorted(_TLS_OPTIONS))}")
    if tls_options and not tls:
        raise ConfigError("ssl_* options need a TLS URL (rediss:// or rediss-cluster://)")
    if tls_options.get("ssl_cert_reqs", "required") not in _CERT_REQS:
        raise ConfigError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}")
    return RedisTarget(nodes, cluster, username, password, db, tls_options if tls else None)


def _credentials(creds: str) -> tuple[str | None, str | None]:
    user, _, password = creds.partition(":")
    return unquote(user) or None, unquote(password) or None


def _host_port(text: str, url: str) -> tuple[str, int]:
    if text.startswith("["):  # [ipv6]:port
        host, _, port_text = text[1:].partition("]")
        port_text = port_text.removeprefix(":")
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ConfigError(f"Redis URL {_redact(url)!r} has no host; e.g. redis://127.0.0.1:6379")
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        raise ConfigError(f"bad port {port_text!r} in Redis URL {_redact(url)!r}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"port {port} out of range in Redis URL {_redact(url)!r}")
    return unquote(host), port


def _redact(url: str) -> str:
    head, sep, rest = url.partition("://")
    _, at, tail = rest.rpartition("@")
    return f"{head}{sep}***@{tail}" if at else url
