"""Policy names, as the config and the simulator spell them, and the objects they build."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from nencache.config import EVICTION_POLICIES
from nencache.errors import ConfigError
from nencache.policy.base import Clock, EvictionPolicy
from nencache.policy.belady import BeladyPolicy
from nencache.policy.history import AccessHistory
from nencache.policy.learned import LearnedPolicy
from nencache.policy.leaf_lru import LeafLruPolicy
from nencache.policy.lru import LruPolicy
from nencache.policy.model import ReuseModel
from nencache.policy.s3fifo import S3FifoPolicy

SIM_POLICIES = EVICTION_POLICIES + ("belady",)  # belady needs the future: the simulator only
OBSERVING = ("leaf-lru", "learned")  # policies that read the access history (fed once per request)


@dataclass(slots=True)
class PolicyContext:
    """What the policies of one cache share: the access history and, for `learned`, the reuse model."""

    history: AccessHistory
    model: ReuseModel = field(default_factory=ReuseModel)
    lock: threading.RLock = field(default_factory=threading.RLock)  # serialises the history for live tiers

    @classmethod
    def create(cls, clock: Clock, chunk_tokens: int, *, max_keys: int = 1 << 18, learn: bool = True) -> "PolicyContext":
        """A fresh history; `learn`: with the reuse model learning from it (what `learned` needs)."""
        model = ReuseModel()
        history = AccessHistory(clock, chunk_tokens=chunk_tokens, max_keys=max_keys, learner=model if learn else None)
        return cls(history, model)


_BUILDERS: dict[str, Callable[[PolicyContext], EvictionPolicy]] = {
    "lru": lambda ctx: LruPolicy(),
    "leaf-lru": lambda ctx: LeafLruPolicy(ctx.history),
    "s3fifo": lambda ctx: S3FifoPolicy(),
    "learned": lambda ctx: LearnedPolicy(ctx.history, ctx.model),
    "belady": lambda ctx: BeladyPolicy(),
}


def check_policy(name: str, allowed: tuple[str, ...], what: str) -> str:
    """`name` if it is one of `allowed`, else a ConfigError naming the choices."""
    if name not in allowed:
        raise ConfigError(f"{what} must be one of {', '.join(allowed)}; got {name!r}")
    return name


def make_policy(name: str, context: PolicyContext | None, *, simulator: bool = False) -> EvictionPolicy:
    """The eviction policy called `name` (`belady` only when `simulator`); those in `OBSERVING` need a context."""
    check_policy(name, SIM_POLICIES if simulator else EVICTION_POLICIES, "eviction")
    if context is None:
        if name in OBSERVING:
            raise ConfigError(f"eviction {name!r} reads the access history: build it with a PolicyContext")
        return _BUILDERS[name](None)  # type: ignore[arg-type]
    return _BUILDERS[name](context)
