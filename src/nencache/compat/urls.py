"""LMCache `remote_url` values as NenCache URLs.

Only the schemes whose meaning differs are translated: `lm://` is LMCache's own cache server, whose
place the NenCache server takes (`nencache serve`); `resp://` speaks the Redis protocol; `blackhole://`
stores nothing, which is no remote tier at all. Redis-family URLs mean the same in both and pass
through, as does every NenCache URL: which schemes NenCache serves is the assembly module's business.
LMCache backends with no NenCache equivalent are an error here, never a silent miss later.
"""

from __future__ import annotations

import logging
from typing import Any

from nencache.errors import ConfigError

log = logging.getLogger("nencache.config")

RENAMED_SCHEMES: dict[str, str] = {"resp": "redis", "lm": "nencache"}
DISCARDING_SCHEMES = ("blackhole",)
UNSUPPORTED_SCHEMES = (
    "redis-sentinel", "infinistore", "mooncakestore", "fs", "s3", "audit", "external", "mock", "azure", "gcs",
    "eic", "hf3fs", "sagemaker-hyperpod", "plugin", "bigtable", "couchbase", "shmfile", "benchmark", "hfbucket",
)
_USE = "use a NenCache remote URL such as redis://host:6379 or nencache://host:5870 (docs/configuration.md)"


def remote_url(value: Any) -> str | None:
    """`remote_url` as NenCache reads it: LMCache's schemes mapped, its backends without an equivalent a
    `ConfigError`, None for no remote tier."""
    if value in (None, "", "None", "null"):
        return None
    url = str(value)
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ConfigError(f"remote_url {url!r} has no scheme; {_USE}")
    if scheme in UNSUPPORTED_SCHEMES:
        raise ConfigError(f"remote_url {url!r}: LMCache's {scheme}:// backend has no NenCache equivalent; {_USE}")
    if scheme in DISCARDING_SCHEMES:
        log.warning("remote_url %r: %s:// discards every chunk; NenCache runs without a remote tier", url, scheme)
        return None
    if scheme not in RENAMED_SCHEMES:
        return url
    target = f"{RENAMED_SCHEMES[scheme]}://{rest}"
    if scheme == "lm":
        log.warning("remote_url %r: LMCache's server protocol is served by the NenCache server; run "
                    "`nencache serve` at that address (remote_url becomes %s)", url, target)
    return target
