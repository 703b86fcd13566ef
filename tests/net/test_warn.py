"""`WarnOnce` and `ThrottledWarning`: a failure that repeats is one warning, the repeats go to debug."""

from __future__ import annotations

import logging
import threading

import pytest

from nencache.net.warn import ThrottledWarning, WarnOnce

log = logging.getLogger("nencache.test-warn")


def levels(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == log.name]


def test_warn_once_per_topic(caplog: pytest.LogCaptureFixture) -> None:
    warn = WarnOnce(log)
    with caplog.at_level(logging.DEBUG, logger=log.name):
        assert warn("tier:redis", "redis failed (%s)", "refused") is True
        assert warn("tier:redis", "redis failed again") is False
        assert warn("tier:disk", "disk failed") is True
    assert levels(caplog) == [(logging.WARNING, "redis failed (refused)"), (logging.DEBUG, "redis failed again"),
                              (logging.WARNING, "disk failed")]
    assert warn.seen("tier:redis") and not warn.seen("tier:peer")


def test_forget_warns_again(caplog: pytest.LogCaptureFixture) -> None:
    warn = WarnOnce(log)
    with caplog.at_level(logging.WARNING, logger=log.name):
        warn("tier:redis", "down")
        warn.forget("tier:redis")
        warn("tier:redis", "down again")
    assert [m for _, m in levels(caplog)] == ["down", "down again"]


def test_warn_once_is_one_warning_across_threads(caplog: pytest.LogCaptureFixture) -> None:
    warn = WarnOnce(log)
    start = threading.Barrier(8)

    def hammer() -> None:
        start.wait()
        for _ in range(200):
            warn("tier:redis", "down")

    with caplog.at_level(logging.WARNING, logger=log.name):
        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert levels(caplog) == [(logging.WARNING, "down")]


def test_throttled_warning_is_loud_once_per_interval(caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("nencache.net.warn.time.monotonic", lambda: now[0])
    warn = ThrottledWarning(log, every=60.0)
    with caplog.at_level(logging.DEBUG, logger=log.name):
        warn("first")
        now[0] += 59.0
        warn("quiet")
        now[0] += 1.0
        warn("loud again")
    assert levels(caplog) == [(logging.WARNING, "first"), (logging.DEBUG, "quiet"), (logging.WARNING, "loud again")]
