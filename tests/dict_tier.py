"""`DictTier`: a NenCache byte tier in a dict that can be made to fail, for tests of what sits above tiers."""

from __future__ import annotations

from nencache.tiers.base import Distance, TierStats


class DictTier:
    """A byte tier in a dict; `broken` makes every call raise; `publish_only`/`distance` as given."""

    checks_payload = False

    def __init__(self, name: str, distance: Distance = Distance.LOCAL, publish_only: bool = False) -> None:
        self.name, self.distance, self.publish_only = name, distance, publish_only
        self.blobs: dict[bytes, bytes] = {}
        self.broken = False
        self.puts: list[list[tuple[bytes, bytes]]] = []

    def _check(self) -> None:
        if self.broken:
            raise ConnectionError(f"{self.name} is down")

    def contains_prefix(self, keys):
        self._check()
        return next((i for i, k in enumerate(keys) if k not in self.blobs), len(keys))

    def get(self, keys):
        self._check()
        return [self.blobs.get(k) for k in keys]

    def put(self, items):
        self._check()
        items = [(k, bytes(v)) for k, v in items]
        self.puts.append(items)
        self.blobs.update(items)

    def delete(self, keys):
        self._check()
        for k in keys:
            self.blobs.pop(k, None)

    def clear(self):
        self.blobs.clear()

    def flush(self):
        self._check()

    def stats(self):
        return TierStats()

    def close(self):
        pass
