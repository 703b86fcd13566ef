"""`ReuseModel`: an online estimate of when each chunk will be used next, from what the cache saw.

Each key's last access is an example whose label (the gap to its next access) the cache learns
later: at the next access (`learn`), or never (the example stays open, or is censored when the key
is forgotten). Examples are grouped into classes by the features the cache knows at the access —
access count, whether the chunk is partial, the length of the prefix chain it came in, and the gap
before this access — all log-binned, so no bin edge depends on one workload's time scale. Gaps and
ages are log-binned too (three bins per octave, from one second to about 36 hours).

Per class and age bin, the model keeps the Kaplan–Meier estimate of the reuse hazard: reuses seen
in the bin over examples that reached it (closed ones, and open ones as far as their age goes).
Sparse classes borrow strength from their coarser parent class (count and size only), which
borrows from all examples, with a prior weight of `prior` examples. From the hazards it derives,
for every class and age, the expected time to the next access (a use not seen within the bins counts
as `horizon` from now): the farther it is, the better the chunk is to evict (Belady's rule, in
expectation).

Deterministic: counting only, no sampling, no random state.
"""

from __future__ import annotations

import numpy as np

AGE_BINS_PER_OCTAVE = 3
AGE_OCTAVES = 17  # 2**17 s: about 36 hours
NUM_AGE_BINS = 2 + AGE_BINS_PER_OCTAVE * AGE_OCTAVES  # bin 0: under a second; the last: beyond the horizon

COUNT_BINS = 7  # 0 (never observed), 1, 2, 3-4, 5-8, 9-16, 17+
CHAIN_BINS = 8  # chain length 0, 1, 2-3, 4-7, ..., 64+
GAP_BINS = 8  # no previous access, then gaps under 2 s, 2-8 s, 8-32 s, ..., over 2048 s
NUM_CLASSES = COUNT_BINS * 2 * CHAIN_BINS * GAP_BINS
NUM_PARENTS = COUNT_BINS * 2
WILSON_Z = 1.645  # one-sided 95% bound on a chance estimated from few examples


def age_bin(seconds: np.ndarray) -> np.ndarray:
    """The log-spaced bin of an age or gap in seconds (bin 0: under a second)."""
    mantissa, exponent = np.frexp(np.minimum(np.asarray(seconds, dtype=np.float64), 1e300))  # x = m * 2**e
    bins = AGE_BINS_PER_OCTAVE * (exponent - 1) + 1 + (mantissa >= _THIRD) + (mantissa >= _TWO_THIRDS)
    return np.clip(bins, 0, NUM_AGE_BINS - 1)


_THIRD, _TWO_THIRDS = 2.0 ** (1 / 3) / 2, 2.0 ** (2 / 3) / 2  # where the mantissa crosses a third of an octave


def _bin_edges() -> np.ndarray:
    edges = np.empty(NUM_AGE_BINS + 1)
    edges[0] = 0.0
    edges[1:] = 2.0 ** (np.arange(NUM_AGE_BINS) / AGE_BINS_PER_OCTAVE)
    return edges


_COUNT_EDGES = np.array([1, 2, 3, 5, 9, 17])  # count bins: 0 (never observed), 1, 2, 3-4, 5-8, 9-16, 17+
_GAP_EDGES = np.array([0.0, 2.0, 8.0, 32.0, 128.0, 512.0, 2048.0])  # gap bins: none, <2 s, 2-8 s, ..., 2048+ s


class ReuseModel:
    """Reuse hazards per (class, age bin) and the expected time to next access they imply."""

    def __init__(self, *, prior: float = 8.0, refresh_every: int = 1024) -> None:
        self.prior = prior
        self.refresh_every = refresh_every
        self.hits = np.zeros((NUM_CLASSES, NUM_AGE_BINS))  # closed examples reused in each age bin
        self.ends = np.zeros((NUM_CLASSES, NUM_AGE_BINS))  # closed examples (reused or censored) by end bin
        edges = _bin_edges()
        self.width = np.diff(edges)
        self.width[-1] = self.width[-2]  # beyond the horizon: one more bin, then capped
        self.horizon = float(edges[-1])
        self.expected = np.full((NUM_CLASSES, NUM_AGE_BINS), self.horizon)  # seconds to next access
        self.survive = np.ones((NUM_CLASSES, NUM_AGE_BINS))  # P(no reuse before the start of each age bin)
        self.at_risk = np.zeros((NUM_CLASSES, NUM_AGE_BINS))  # examples that reached each age bin
        self.edges = edges
        self.expected_rows: list[list[float]] = self.expected.tolist()
        self.learned = 0  # examples closed since the last refresh
        self._closed: list[tuple[np.ndarray, np.ndarray]] = []  # (classes, gaps) not yet counted
        self.refreshes = 0

    # --- the Learner protocol of AccessHistory ---------------------------------------------------
    def classify(self, count: np.ndarray, partial: np.ndarray, chain: int, gap: np.ndarray) -> np.ndarray:
        """The class of each access: its count, whether the chunk is partial, the chain's length and the gap
        before it (NaN: first access)."""
        count_bin = np.searchsorted(_COUNT_EDGES, count, side="right")
        chain_bin = min(CHAIN_BINS - 1, int(chain).bit_length())
        gap_bin = np.searchsorted(_GAP_EDGES, gap, side="right")  # NaN sorts last: masked to 0 below
        gap_bin[np.isnan(gap)] = 0
        return count_bin * (2 * CHAIN_BINS * GAP_BINS) + partial * (CHAIN_BINS * GAP_BINS) + (chain_bin * GAP_BINS + gap_bin)

    def learn(self, classes: np.ndarray, gaps: np.ndarray) -> None:
        """Examples closed by a reuse after `gaps` seconds (counted at the next refresh)."""
        self._closed.append((classes, gaps))
        self.learned += len(classes)

    def censor(self, classes: np.ndarray, ages: np.ndarray) -> None:
        np.add.at(self.ends, (classes, age_bin(ages)), 1.0)

    # --- estimates -------------------------------------------------------------------------------
    def stale(self) -> bool:
        """Whether enough was learned since the last refresh: `refresh_every` examples, or a sixteenth of all
        examples so far when that is more (frequent while the model is young, cheap once it is not)."""
        return self.refreshes == 0 or self.learned >= max(self.refresh_every, self.hits.sum() / 16)

    def refresh(self, open_classes: np.ndarray, open_ages: np.ndarray, weight: float = 1.0) -> None:
        """Recompute the expected-time table from the closed examples and the open ones (class, age), each
        open one standing for `weight` (a sample of them)."""
        if self._closed:
            classes = np.concatenate([c for c, _ in self._closed])
            bins = age_bin(np.concatenate([g for _, g in self._closed]))
            self._closed.clear()
            closed = np.bincount(classes * NUM_AGE_BINS + bins, minlength=NUM_CLASSES * NUM_AGE_BINS)
            closed = closed.reshape(NUM_CLASSES, NUM_AGE_BINS)
            self.hits += closed
            self.ends += closed
        pending = weight * np.bincount(open_classes * NUM_AGE_BINS + age_bin(open_ages),
                                       minlength=NUM_CLASSES * NUM_AGE_BINS).reshape(NUM_CLASSES, NUM_AGE_BINS)
        at_risk = np.cumsum((self.ends + pending)[:, ::-1], axis=1)[:, ::-1]
        self.at_risk = at_risk
        hazard = self._shrunk(self.hits, at_risk)
        hazard = np.clip(hazard, 0.0, 0.999)
        survive = np.cumprod(np.concatenate([np.ones((NUM_CLASSES, 1)), 1.0 - hazard[:, :-1]], axis=1), axis=1)
        # From the start of age bin a, given no reuse yet: E[time to the next use], a use never seen within
        # the bins counting as `horizon` from now (so an unknown chunk's expectation does not shrink with age).
        reuse = survive * hazard  # P(reuse in bin j), from age 0
        middle = self.edges[:-1] + self.width / 2
        later = np.cumsum(reuse[:, ::-1], axis=1)[:, ::-1]  # P(reuse in bin a or later)
        when = np.cumsum((reuse * middle)[:, ::-1], axis=1)[:, ::-1]
        never = survive[:, -1:] * (1.0 - hazard[:, -1:])  # P(no reuse within the bins)
        alive = np.maximum(survive, 1e-300)
        self.expected = (when - self.edges[:-1] * later + never * self.horizon) / alive
        self.survive = survive
        self.expected_rows = self.expected.tolist()  # for scoring one chunk without numpy's per-call cost
        self.learned = 0
        self.refreshes += 1

    def _shrunk(self, hits: np.ndarray, at_risk: np.ndarray) -> np.ndarray:
        """Hazards per class, each pulled toward its parent class's, which is pulled toward the global one."""
        k = self.prior
        total_hits, total_risk = hits.sum(axis=0), at_risk.sum(axis=0)
        overall = total_hits / np.maximum(total_risk, 1.0)
        parent_of = np.arange(NUM_CLASSES) // (CHAIN_BINS * GAP_BINS)
        parent_hits = np.zeros((NUM_PARENTS, NUM_AGE_BINS))
        parent_risk = np.zeros((NUM_PARENTS, NUM_AGE_BINS))
        np.add.at(parent_hits, parent_of, hits)
        np.add.at(parent_risk, parent_of, at_risk)
        parent = (parent_hits + k * overall) / (parent_risk + k)
        return (hits + k * parent[parent_of]) / (at_risk + k)

    def best_window(self, cls: int, window: float) -> tuple[float, float]:
        """(delay, probability): when, after a chunk's last access, a `window`-second stay is most likely to
        see its next use, and a lower bound of that probability (given no use before the delay).

        The bound is Wilson's (one-sided 95%) over the examples of the class that reached the delay, so a
        delay backed by a handful of examples does not win by chance.
        """
        survive = self.survive[cls]
        starts = self.edges[:-1]
        ends = age_bin(starts + window)
        chance = 1.0 - survive[ends] / np.maximum(survive, 1e-300)
        n = self.at_risk[cls] + 1.0
        z2 = WILSON_Z * WILSON_Z
        bound = (chance + z2 / (2 * n) - WILSON_Z * np.sqrt(chance * (1 - chance) / n + z2 / (4 * n * n))) / (1 + z2 / n)
        bound[survive <= 1e-12] = 0.0
        best = int(np.argmax(bound))
        return float(starts[best]), float(bound[best])

    # --- persistence -----------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        return {"hits": self.hits, "ends": self.ends}

    def load_state(self, state: dict[str, np.ndarray]) -> bool:
        """Adopt saved counts; False (and nothing changed) if their shape is not this model's."""
        hits, ends = state.get("hits"), state.get("ends")
        if hits is None or ends is None or hits.shape != self.hits.shape or ends.shape != self.ends.shape:
            return False
        self.hits, self.ends = hits.astype(np.float64), ends.astype(np.float64)
        self.refreshes = 0
        return True
