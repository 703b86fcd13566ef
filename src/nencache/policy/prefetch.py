"""`PrefetchPlanner`: when to bring a request's chain back into the CPU tier before its next turn.

After a request, the `ReuseModel` knows, for the class of the request's chunks, how likely a reuse
is in each window of time from now. The planner takes the window as long as chunks currently stay
in the CPU tier after their last use (`MeteredPolicy.residence`), finds the delay at which that window is
most likely to see the next use, and plans a promotion then if that likelihood is at least
`1 - max_waste`: so, if the model is right, at most `max_waste` of prefetched bytes are wasted.
A bandwidth budget (bytes per second, a token bucket one second deep) bounds the promotions.
"""

from __future__ import annotations

import numpy as np

from nencache.errors import ConfigError
from nencache.policy.history import AccessHistory
from nencache.policy.model import ReuseModel


class PrefetchPlanner:
    """Plans (due time) for chains, and meters the promotion bandwidth."""

    def __init__(self, history: AccessHistory, model: ReuseModel, *, max_waste: float = 0.2,
                 bandwidth: float = float(1 << 30)) -> None:
        if not 0.0 < max_waste < 1.0:
            raise ConfigError(f"prefetch max_waste must be between 0 and 1, got {max_waste}")
        if bandwidth <= 0:
            raise ConfigError(f"prefetch bandwidth must be positive bytes per second, got {bandwidth}")
        self.history = history
        self.model = model
        self.max_waste = max_waste
        self.bandwidth = bandwidth
        self._budget = bandwidth
        self._budget_time = -np.inf

    def plan(self, slots: np.ndarray, now: float, residence: float) -> float | None:
        """The time to promote the chain whose deepest full chunk is `slots[-1]`, or None (not worth it);
        `residence`: how long the CPU tier keeps a chunk after its last use, in seconds."""
        self.history.refresh_learner()
        if not len(slots) or residence <= 0.0:
            return None
        delay, chance = self.model.best_window(int(self.history.cls[slots[-1]]), residence)
        if chance < 1.0 - self.max_waste or delay <= 0.0:
            return None
        return now + delay

    def spend(self, nbytes: int, now: float) -> bool:
        """Whether `nbytes` of promotion fit the bandwidth budget now (and take them if so)."""
        self._budget = min(self.bandwidth, self._budget + (now - self._budget_time) * self.bandwidth) \
            if self._budget_time > -np.inf else self.bandwidth
        self._budget_time = now
        if nbytes > self._budget:
            return False
        self._budget -= nbytes
        return True
