"""Eviction, admission and prefetch policies for the tiers, and the trace simulator that judges them.

`base.EvictionPolicy` is what a tier asks for its next victim; `index.PolicyIndex` is the key map
the memory tier and the disk index keep their chunks in. `history.AccessHistory` records what the
cache saw per chunk key; `model.ReuseModel` learns from it when chunks come back. `simulate` replays
a request trace through the real tier classes (see `docs/policies.md`).
"""

from nencache.policy.base import EvictionPolicy
from nencache.policy.index import PolicyIndex
from nencache.config import EVICTION_POLICIES, PREFETCH_POLICIES
from nencache.policy.registry import PolicyContext, make_policy

__all__ = ["EVICTION_POLICIES", "PREFETCH_POLICIES", "EvictionPolicy", "PolicyContext", "PolicyIndex", "make_policy"]
