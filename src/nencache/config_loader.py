"""`load_config`: the effective `CacheConfig` from defaults, a YAML file, the environment and overrides.

Precedence, lowest first: defaults < YAML file (`--config`, `NENCACHE_CONFIG_FILE` or
`LMCACHE_CONFIG_FILE`) < environment (`NENCACHE_<KEY>`, `LMCACHE_<KEY>`) < explicit overrides.
Keys are flat (`cpu_size`, `server_port`); a YAML file may also nest them by section
(`server: {port: 6000}`, `tiers: {disk: {path: /var/cache/kv}}`). LMCache's key names work everywhere
as aliases (`nencache.compat.keys.ALIASES`). This is the config edge: the one module that reads
LMCache's names into NenCache's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nencache.compat import env as lmcache_env
from nencache.compat.keys import ALIASES, ignored_message, is_lmcache_only
from nencache.config import FLAT_KEYS, CacheConfig, coerce_text, suggest
from nencache.errors import ConfigError

log = logging.getLogger("nencache.config")

NENCACHE_PREFIX = "NENCACHE_"
NENCACHE_CONFIG_FILE = "NENCACHE_CONFIG_FILE"

__all__ = ["LoadedConfig", "is_config_key", "load_config"]


@dataclass(slots=True)
class LoadedConfig:
    """A config and, for every flat key that is not a default, where its value came from."""

    config: CacheConfig
    sources: dict[str, str] = field(default_factory=dict)


def is_config_key(key: str, *, lmcache: bool = False) -> bool:
    """Whether `key` is a flat `CacheConfig` key or, with `lmcache`, any key of LMCache's config that
    `load_config` takes (an alias of a NenCache key, or an LMCache-only key it accepts with a warning)."""
    return key in FLAT_KEYS or (lmcache and (key in ALIASES or is_lmcache_only(key)))


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LoadedConfig:
    """Build the effective config from defaults, a YAML file, the environment and explicit overrides."""
    env = os.environ if env is None else env
    reader = _Reader()
    file = path or env.get(NENCACHE_CONFIG_FILE) or env.get(lmcache_env.CONFIG_FILE)
    if file:
        for key, value in _flatten(_read_yaml(Path(file)), f"file {file}"):
            reader.apply(key, value, f"file {file}", from_env=False)
    for prefix in (lmcache_env.PREFIX, NENCACHE_PREFIX):  # NENCACHE_ wins over LMCACHE_
        for name, text in sorted(env.items()):
            if not name.startswith(prefix) or name in (NENCACHE_CONFIG_FILE, lmcache_env.CONFIG_FILE):
                continue
            key = name.removeprefix(prefix).lower()
            if prefix == lmcache_env.PREFIX:
                if key in lmcache_env.PROCESS_ENV:
                    continue  # LMCache's own telemetry and banner, not cache settings
                text = lmcache_env.unquote(text)
            reader.apply(key, text, f"env {name}", from_env=True)
    for key, value in (overrides or {}).items():
        reader.apply(key, value, "argument", from_env=False)
    return LoadedConfig(CacheConfig(**reader.values), reader.sources)


@dataclass(slots=True)
class _Reader:
    """Flat values gathered so far, their origins, and the LMCache-only keys already warned about."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)

    def apply(self, key: str, value: Any, origin: str, *, from_env: bool) -> None:
        if key in ALIASES:
            target, convert = ALIASES[key]
            targets, converted = ((target,), (convert(value),)) if isinstance(target, str) else (target, convert(value))
            for name, item in zip(targets, converted):
                self.values[name] = item
                self.sources[name] = origin if name == key else f"{origin} (LMCache key {key})"
        elif key in FLAT_KEYS:
            self.values[key] = coerce_text(key, value) if from_env and isinstance(value, str) else value
            self.sources[key] = origin
        elif is_lmcache_only(key):
            if key not in self.warned:
                log.warning(ignored_message(key, value, origin))
            self.warned.add(key)
        else:
            raise ConfigError(f"unknown config key {key!r} in {origin}{suggest(key, [*FLAT_KEYS, *ALIASES])}")


_BY_PATH: dict[tuple[str, ...], str] = {path: key for key, path in FLAT_KEYS.items()}
_SECTIONS = {path[:n] for path in FLAT_KEYS.values() for n in range(1, len(path))}  # ("tiers",), ("tiers", "cpu"), ...


def _flatten(data: Mapping[Any, Any], origin: str, path: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """A YAML mapping's (flat key, value) pairs: flat keys as they are, nested sections by attribute path."""
    pairs: list[tuple[str, Any]] = []
    for raw, value in data.items():
        inner = (*path, str(raw))
        if inner in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{'.'.join(inner)!r} in {origin} is a section: give it a mapping of its keys, "
                                  f"got {type(value).__name__} {value!r}")
            pairs += _flatten(value, origin, inner)
        elif not path:
            pairs.append((str(raw), value))
        elif inner in _BY_PATH:
            pairs.append((_BY_PATH[inner], value))
        else:
            known = sorted({p[len(path)] for p in [*_BY_PATH, *_SECTIONS] if len(p) > len(path) and p[:len(path)] == path})
            raise ConfigError(f"unknown config key {'.'.join(inner)!r} in {origin}; section {'.'.join(path)!r} "
                              f"has {', '.join(known)}")
    return pairs


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys to values, got {type(data).__name__}")
    return data
