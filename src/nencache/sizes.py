"""Sizes in config values: `"4GiB"`, `"512MB"`, byte counts, and LMCache's GB floats."""

from __future__ import annotations

import re
from typing import Any

from nencache.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: Any, *, key: str = "size", gb_floats: bool = False) -> int:
    """Bytes from `"4GiB"`, `"512MB"`, `1048576`; with `gb_floats` a bare number means GB (LMCache style)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like '4GiB', '512MB' or a byte count, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ("gb" if gb_floats else "")
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"{key}: cannot read {value!r} as a size; write e.g. '4GiB', '512MB' or 1073741824")
        number, unit = float(match.group(1)), match.group(2).lower() or ("gb" if gb_floats else "")
    size = int(number * _UNITS[unit])
    if size < 0:
        raise ConfigError(f"{key}: a size cannot be negative ({value!r})")
    return size
