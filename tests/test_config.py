"""The config schema: sections, flat keys, types from the annotations, sizes, clear errors."""

from __future__ import annotations

import dataclasses

import pytest

from nencache.config import (
    FLAT_KEYS, CacheConfig, CpuTierConfig, DiskTierConfig, ServerConfig, TiersConfig, coerce_text, parse_size,
)
from nencache.errors import ConfigError


@pytest.mark.parametrize(("text", "size"), [("4GiB", 4 * 2**30), ("512MB", 512 * 10**6), (1048576, 1048576),
                                            ("1.5 GiB", int(1.5 * 2**30)), ("100", 100), ("2k", 2000)])
def test_parse_size(text, size) -> None:
    assert parse_size(text) == size


def test_lmcache_gb_floats() -> None:
    assert parse_size(5.0, gb_floats=True) == 5 * 10**9
    assert parse_size("2.5", gb_floats=True) == int(2.5 * 10**9)


@pytest.mark.parametrize("bad", ["lots", "-1GiB", "4 parsecs", True])
def test_bad_sizes_raise(bad) -> None:
    with pytest.raises(ConfigError):
        parse_size(bad, key="cpu_size")


def test_defaults() -> None:
    config = CacheConfig()
    assert config.chunk_size == 256 and config.save_unfull_chunk and config.tiers.cpu.size == 2 * 2**30
    assert config.server.max_request_bytes == 64 * 2**20 and config.tiers.disk.path is None


@pytest.mark.parametrize("kwargs", [{"chunk_size": 0}, {"chunk_size": "3"}, {"local_cpu": "yes"}, {"cpu_size": "x"},
                                    {"remote_timeout": -1.0}, {"io_threads": 0}, {"write_drop": "random"},
                                    {"server_port": 1.5}, {"eviction": "belady"}, {"tiers": 3}])
def test_bad_constructor_values(kwargs) -> None:
    with pytest.raises(ConfigError):
        CacheConfig(**kwargs)


def test_flat_keywords_land_in_their_sections() -> None:
    config = CacheConfig(cpu_size="1MiB", local_cpu=False, disk_path="file:///var/kv", remote_url="redis://h",
                         io_threads=3, write_drop="newest", enable_p2p=True, metrics_port=0, server_port=6000)
    assert (config.tiers.cpu.size, config.tiers.cpu.enabled, config.tiers.disk.path) == (2**20, False, "/var/kv")
    assert (config.tiers.remote.url, config.tiers.io_threads, config.write.drop) == ("redis://h", 3, "newest")
    assert (config.p2p.enabled, config.metrics.port, config.server.port) == (True, 0, 6000)


def test_sections_and_flat_keys_together() -> None:
    config = CacheConfig(server=ServerConfig(port=6000, host="0.0.0.0"), server_port=6001,
                         tiers=TiersConfig(disk=DiskTierConfig(path="/a")), disk_size="1GiB")
    assert (config.server.host, config.server.port) == ("0.0.0.0", 6001)
    assert (config.tiers.disk.path, config.tiers.disk.size) == ("/a", 2**30)


def test_replace_takes_flat_keys_and_keeps_the_rest() -> None:
    config = CacheConfig(cpu_size="1MiB", server_port=6000)
    changed = config.replace(local_cpu=False)
    assert (changed.tiers.cpu.enabled, changed.tiers.cpu.size, changed.server.port) == (False, 2**20, 6000)
    assert dataclasses.replace(config, cpu_codec="int8").tiers.cpu.codec == "int8"
    assert config.tiers.cpu.enabled, "replace copies; the original is unchanged"


def test_as_dict_is_flat_and_round_trips() -> None:
    config = CacheConfig(remote_url="nencache://h:5870", p2p_ttl=2.0, server_tls_cert="/c.pem")
    flat = config.as_dict()
    assert list(flat) == list(FLAT_KEYS)
    assert flat["remote_url"] == "nencache://h:5870" and flat["p2p_ttl"] == 2.0
    assert CacheConfig(**flat) == config


def test_flat_keys_are_prefix_and_field_unless_declared() -> None:
    assert FLAT_KEYS["cpu_size"] == ("tiers", "cpu", "size")
    assert FLAT_KEYS["local_cpu"] == ("tiers", "cpu", "enabled")
    assert FLAT_KEYS["enable_p2p"] == ("p2p", "enabled")
    assert FLAT_KEYS["io_threads"] == ("tiers", "io_threads")
    assert FLAT_KEYS["server_max_keys"] == ("server", "max_keys")
    assert len(set(FLAT_KEYS.values())) == len(FLAT_KEYS) == 48
    assert FLAT_KEYS["p2p_mirror_keys"] == ("p2p", "mirror_keys")


def test_errors_name_the_flat_key() -> None:
    with pytest.raises(ConfigError, match="^cpu_size: cannot read"):
        CpuTierConfig(size="lots")
    with pytest.raises(ConfigError, match="^server_max_keys: expected int, got str"):
        CacheConfig(server_max_keys="10")
    with pytest.raises(ConfigError, match="unknown config key 'chunk_sise'; did you mean 'chunk_size'"):
        CacheConfig(chunk_sise=3)


def test_types_come_from_the_annotations() -> None:
    assert coerce_text("server_admin_port", "null") is None
    assert coerce_text("server_admin_port", "5871") == 5871
    assert coerce_text("remote_timeout", "2") == 2.0
    assert coerce_text("pin_memory", "off") is False
    assert coerce_text("cpu_size", "4GiB") == "4GiB", "sizes are parsed by the section, which names the key"
    assert coerce_text("disk_path", "/kv") == "/kv"
    with pytest.raises(ConfigError, match="p2p_port: expected an integer"):
        coerce_text("p2p_port", "eighty")


def test_auth_token_stays_out_of_repr() -> None:
    assert "s3cret" not in repr(CacheConfig(auth_token="s3cret"))
