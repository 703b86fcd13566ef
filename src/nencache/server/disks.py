"""`NamespaceDisks`: the server's disk tiers, one per namespace, seen by its store as one byte tier.

The server keeps every namespace's chunks in one store, each under its namespace's key prefix
followed by the 16-byte chunk key (`nencache.server.store`). This tier sends each key to the
`DiskTier` of its namespace as the bare chunk key, so a namespace's directory holds the same files a
`KVCache` disk tier of that namespace would.

Namespaces are case-sensitive, on disk too: a lower-case hex namespace (what `KVCache` sends: its
namespace digest) names its directory under the root itself; any other namespace lives under
`root/by-digest/` in the directory named by its BLAKE2b digest, so `ABCDEF` and `abcdef`, or a
namespace and a digest, never share a directory.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from nencache.errors import ConfigError, TierError
from nencache.format import KEY_SIZE
from nencache.tiers.base import Distance, TierStats
from nencache.tiers.disk.tier import DiskTier

Blob = bytes | bytearray | memoryview
_HEX = re.compile(r"[0-9a-f]{1,128}")
DIGESTS = "by-digest"  # not hex: never the directory of a namespace named by itself


def _prefix(key: bytes) -> bytes:
    return key[:-KEY_SIZE]


class NamespaceDisks:
    """The disk tiers of the namespaces opened so far under `root`, as one `Tier` over prefixed keys.

    Keys whose namespace has no tier open are held by none (a `put` of them raises `TierError`).
    Thread-safe; blocking.
    """

    name = DiskTier.name
    checks_payload = DiskTier.checks_payload
    publish_only = False
    distance = DiskTier.distance

    def __init__(self, root: str | Path, capacity_bytes: int, *, io_threads: int = 2) -> None:
        self.root = Path(root).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"disk_path {self.root}: cannot create it ({exc.strerror or exc}); choose "
                              "a writable directory") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise ConfigError(f"disk_path {self.root} is not writable by this user; choose another")
        self.capacity_bytes = capacity_bytes
        self.io_threads = io_threads
        self._tiers: dict[bytes, DiskTier] = {}  # by key prefix
        self._lock = threading.Lock()

    # --- namespaces ------------------------------------------------------------------------------
    def has(self, name: bytes) -> bool:
        """Whether namespace `name` has a directory (chunks stored by an earlier run, or another process)."""
        root, directory = self._directory(name)
        return (root / directory).is_dir()

    def open(self, name: bytes, prefix: bytes) -> DiskTier:
        """Open the disk tier of namespace `name` (creating its directory), which from now on takes the keys
        that start with `prefix`. Blocking: it reads the directory's index."""
        root, directory = self._directory(name)
        tier = DiskTier(str(root), directory, self.capacity_bytes, io_threads=self.io_threads)
        with self._lock:
            self._tiers[prefix] = tier
        return tier

    def clear_namespace(self, prefix: bytes) -> None:
        """Forget every chunk of the namespace whose keys start with `prefix`."""
        tier = self._tiers.get(prefix)
        if tier is not None:
            tier.clear()

    def __len__(self) -> int:
        return len(self._tiers)

    def _directory(self, name: bytes) -> tuple[Path, str]:
        """(parent, directory name) of a namespace's disk tier (see the module docstring)."""
        text = name.decode("ascii")
        if _HEX.fullmatch(text):
            return self.root, text
        return self.root / DIGESTS, hashlib.blake2b(name, digest_size=16).hexdigest()

    def _by_tier(self, keys: Sequence[bytes]) -> list[tuple[DiskTier | None, list[int]]]:
        """The positions of `keys` grouped by the tier of their namespace (None: no tier open)."""
        groups: dict[bytes, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(_prefix(key), []).append(i)
        return [(self._tiers.get(prefix), indices) for prefix, indices in groups.items()]

    def _all(self) -> list[DiskTier]:
        with self._lock:
            return list(self._tiers.values())

    # --- the Tier protocol -----------------------------------------------------------------------
    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        held = 0
        for prefix, run in itertools.groupby(keys, _prefix):
            bare = [key[-KEY_SIZE:] for key in run]
            tier = self._tiers.get(prefix)
            found = tier.contains_prefix(bare) if tier is not None else 0
            held += found
            if found < len(bare):
                break
        return held

    def get(self, keys: Sequence[bytes]) -> list[Blob | None]:
        blobs: list[Blob | None] = [None] * len(keys)
        for tier, indices in self._by_tier(keys):
            if tier is not None:
                for i, blob in zip(indices, tier.get([keys[i][-KEY_SIZE:] for i in indices])):
                    blobs[i] = blob
        return blobs

    def put(self, items: Sequence[tuple[bytes, Blob]]) -> None:
        groups = self._by_tier([key for key, _ in items])
        for tier, indices in groups:
            if tier is not None:
                tier.put([(items[i][0][-KEY_SIZE:], items[i][1]) for i in indices])
        if any(tier is None for tier, _ in groups):
            raise TierError("a chunk's namespace has no disk tier open; open the namespace before storing in it")

    def delete(self, keys: Sequence[bytes]) -> None:
        for tier, indices in self._by_tier(keys):
            if tier is not None:
                tier.delete([keys[i][-KEY_SIZE:] for i in indices])

    def clear(self) -> None:
        self._each(DiskTier.clear)

    def flush(self) -> None:
        self._each(DiskTier.flush)

    def stats(self) -> TierStats:
        """The sum of every namespace's disk tier counters (a snapshot)."""
        total = TierStats()
        for tier in self._all():
            total.add(**tier.stats().as_dict())
        return total

    def close(self) -> None:
        self._each(DiskTier.close)

    def _each(self, call: Callable[[DiskTier], object]) -> None:
        """`call` on every namespace's tier; one that fails does not spare the others (the first error is
        raised after)."""
        failed: Exception | None = None
        for tier in self._all():
            try:
                call(tier)
            except Exception as exc:
                failed = failed or exc
        if failed is not None:
            raise failed
