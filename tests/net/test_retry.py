"""`Reconnector`: probes with doubling delays up to its cap, calls `on_up` once, stops when closed."""

from __future__ import annotations

import threading
import time

from nencache.net.retry import FIRST_RETRY, Reconnector


def test_probes_back_off_then_on_up_once() -> None:
    probes: list[float] = []
    up = threading.Event()
    closed = threading.Event()

    def probe() -> bool:
        probes.append(time.monotonic())
        return len(probes) == 3

    retry = Reconnector("test-retry", probe, up.set, closed, cap=0.6)
    started = time.monotonic()
    retry.start()
    retry.start()  # idempotent while running
    assert up.wait(5)
    retry.join()
    gaps = [b - a for a, b in zip([started, *probes], probes)]
    assert len(probes) == 3
    assert gaps[0] >= FIRST_RETRY * 0.9 and gaps[1] >= 2 * FIRST_RETRY * 0.9  # doubling
    assert 0.6 * 0.9 <= gaps[2] < 1.0  # 4 x FIRST_RETRY, capped at 0.6


def test_closing_stops_the_probes() -> None:
    closed = threading.Event()
    calls: list[int] = []
    retry = Reconnector("test-retry", lambda: calls.append(1) or False, lambda: None, closed, cap=FIRST_RETRY)
    retry.start()
    time.sleep(FIRST_RETRY * 2.5)
    closed.set()
    retry.join(2.0)
    seen = len(calls)
    time.sleep(FIRST_RETRY * 2)
    assert seen >= 1 and len(calls) == seen
    retry.start()  # closed: starts nothing
    time.sleep(FIRST_RETRY * 1.5)
    assert len(calls) == seen
