"""Request traces for the simulator: Mooncake-style JSONL, or a plain text format for one's own logs.

Mooncake JSONL (one request a line): `{"timestamp": <ms>, "input_length": <tokens>,
"hash_ids": [<block id>, ...]}` — block ids are prefix hashes of `block_tokens`-token blocks:
equal ids mean reusable prefix KV. Other fields are ignored.

Plain format (one request a line, `#` starts a comment): `<seconds> <input tokens> <id> <id> ...`,
the same block ids, separated by spaces or commas.

A request's blocks are full (`block_tokens`) except its last, which holds the rest of its input.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nencache.errors import TraceError

_SPLIT = re.compile(r"[,\s]+")


@dataclass(slots=True)
class Trace:
    """Requests in arrival order; request `i`'s blocks are `ids[offsets[i]:offsets[i+1]]`."""

    times: np.ndarray  # seconds, float64, non-decreasing
    offsets: np.ndarray  # int64, len = requests + 1
    ids: np.ndarray  # int64 block ids
    tokens: np.ndarray  # int64 tokens per block
    block_tokens: int

    @property
    def num_requests(self) -> int:
        return len(self.times)

    @property
    def num_blocks(self) -> int:
        return len(self.ids)

    def unique_blocks(self) -> int:
        return len(np.unique(self.ids))

    def head(self, requests: int) -> "Trace":
        """The first `requests` requests."""
        end = int(self.offsets[requests])
        return Trace(self.times[:requests], self.offsets[: requests + 1], self.ids[:end], self.tokens[:end],
                     self.block_tokens)


def block_tokens_of(input_length: int, blocks: int, block_tokens: int) -> list[int]:
    """Tokens in each of a request's `blocks` blocks: full ones, then the rest (at least one token)."""
    if input_length <= 0:  # length unknown: every block full
        return [block_tokens] * blocks
    last = min(block_tokens, max(1, input_length - block_tokens * (blocks - 1)))
    return [block_tokens] * (blocks - 1) + [last] if blocks else []


def load_trace(path: str | Path, *, block_tokens: int = 512) -> Trace:
    """Read a Mooncake JSONL or plain trace (the format is told by its first request line)."""
    if block_tokens <= 0:
        raise TraceError(f"block_tokens must be positive, got {block_tokens}")
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror or exc}") from None
    times: list[float] = []
    counts: list[int] = []
    ids: list[int] = []
    tokens: list[int] = []
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("{") else raw.strip()
        if not line:
            continue
        when, length, blocks = (_json_request if line.startswith("{") else _plain_request)(line, path, number)
        if times and when < times[-1]:
            raise TraceError(f"{path}:{number}: requests must be in arrival order ({when} s after {times[-1]} s)")
        times.append(when)
        counts.append(len(blocks))
        ids.extend(blocks)
        tokens.extend(block_tokens_of(length, len(blocks), block_tokens))
    if not times:
        raise TraceError(f"trace {path} holds no requests")
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Trace(np.asarray(times, dtype=np.float64), offsets, np.asarray(ids, dtype=np.int64),
                 np.asarray(tokens, dtype=np.int64), block_tokens)


def _json_request(line: str, path: Path, number: int) -> tuple[float, int, list[int]]:
    try:
        record = json.loads(line)
        when = float(record["timestamp"]) / 1000.0
        blocks = [int(b) for b in record["hash_ids"]]
        length = int(record.get("input_length", 0))
    except (ValueError, KeyError, TypeError) as exc:
        raise TraceError(f"{path}:{number}: not a Mooncake request line (timestamp, input_length, hash_ids): "
                         f"{exc}") from None
    return when, length, blocks


def _plain_request(line: str, path: Path, number: int) -> tuple[float, int, list[int]]:
    fields = [f for f in _SPLIT.split(line) if f]
    try:
        if len(fields) < 2:
            raise ValueError("expected '<seconds> <input tokens> <block id> ...'")
        return float(fields[0]), int(fields[1]), [int(f) for f in fields[2:]]
    except ValueError as exc:
        raise TraceError(f"{path}:{number}: not a plain trace line '<seconds> <input tokens> <block id> ...': "
                         f"{exc}") from None
