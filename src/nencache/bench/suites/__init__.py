"""The suites of `nencache bench`, in the order they run. Each module has `run(ctx) -> SuiteResult` and
`STEPS` (how many progress steps it reports)."""

from __future__ import annotations

import importlib
from types import ModuleType

SUITE_NAMES = ("tiers", "latency", "p2p", "memory", "disk", "ttft", "trace")


def suite(name: str) -> ModuleType:
    """The module of suite `name`."""
    if name not in SUITE_NAMES:
        from nencache.errors import ConfigError

        raise ConfigError(f"unknown suite {name!r}; choose from {', '.join(SUITE_NAMES)}")
    return importlib.import_module(f"nencache.bench.suites.{name}")
