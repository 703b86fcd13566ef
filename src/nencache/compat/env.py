"""LMCache's environment: `LMCACHE_*` variables and how LMCache reads their values."""

from __future__ import annotations

PREFIX = "LMCACHE_"
CONFIG_FILE = "LMCACHE_CONFIG_FILE"
# LMCACHE_* variables about LMCache's own process (usage telemetry, banner): nothing to configure here.
PROCESS_ENV = frozenset({"track_usage", "usage_context", "usage_track_interval", "usage_track_url",
                         "disable_banner"})


def unquote(text: str) -> str:
    """LMCache strips one pair of matching quotes around environment values."""
    text = text.strip()
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text
