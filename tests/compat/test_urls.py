"""LMCache `remote_url` values become NenCache URLs; NenCache URLs pass through untouched."""

from __future__ import annotations

import logging

import pytest

from nencache.compat.urls import remote_url
from nencache.errors import ConfigError


@pytest.mark.parametrize("url", ["redis://h:6379/1", "rediss://h:6380", "unix:///run/redis.sock",
                                 "redis-cluster://h1:7000,h2:7001", "valkey://h", "nencache://h:5870",
                                 "nencaches://h:5870", "s4://a-scheme-only-the-assembly-module-may-know"])
def test_nencache_urls_pass_through(url) -> None:
    assert remote_url(url) == url


def test_lmcache_schemes_are_renamed(caplog) -> None:
    assert remote_url("RESP://h:6379") == "redis://h:6379"
    with caplog.at_level(logging.WARNING, logger="nencache.config"):
        assert remote_url("lm://h:65432") == "nencache://h:65432"
        assert remote_url("blackhole://") is None
    assert [("nencache serve" in r.getMessage(), "discards" in r.getMessage()) for r in caplog.records] == [
        (True, False), (False, True)]


@pytest.mark.parametrize("value", [None, "", "None", "null"])
def test_no_remote(value) -> None:
    assert remote_url(value) is None


@pytest.mark.parametrize("url", ["infinistore://127.0.0.1:12345", "h:6379", "s3://bucket"])
def test_backends_without_an_equivalent_are_errors(url) -> None:
    with pytest.raises(ConfigError, match=r"remote_url .*redis://.*nencache://"):
        remote_url(url)
