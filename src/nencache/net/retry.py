"""Living with a flaky endpoint: `Reconnector` probes it with exponential backoff until it answers again."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

FIRST_RETRY = 0.25  # seconds before the first probe; each failed probe doubles it, up to the cap


class Reconnector:
    """Calls `probe` (0.25 s, 0.5 s, ... up to `cap` apart) until it returns True, then `on_up`.

    `start` is idempotent while a thread runs; setting `closed` stops it.
    """

    def __init__(self, name: str, probe: Callable[[], bool], on_up: Callable[[], None], closed: threading.Event,
                 cap: float) -> None:
        self._name, self._probe, self._on_up, self._closed, self._cap = name, probe, on_up, closed, cap
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is not None or self._closed.is_set():
                return
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def join(self, timeout: float = 1.0) -> None:
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        delay = FIRST_RETRY
        try:
            while not self._closed.wait(delay):
                if self._probe():
                    with self._lock:  # cleared first: a failure right after `on_up` starts a new thread
                        self._thread = None
                    self._on_up()
                    return
                delay = min(delay * 2, self._cap)
        finally:
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None
