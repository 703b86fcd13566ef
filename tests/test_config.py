"""Config: defaults, YAML, NENCACHE_* and LMCACHE_* env, aliases, sizes, clear errors."""

from __future__ import annotations

import logging

import pytest

from nencache.config import CacheConfig, load_config, parse_size
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
    assert config.chunk_size == 256 and config.save_unfull_chunk and config.cpu_size == 2 * 2**30


def test_yaml_env_and_overrides_in_order(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("chunk_size: 64\ncpu_size: 1GiB\nremote_url: redis://localhost:6379\n")
    env = {"NENCACHE_CONFIG_FILE": str(path), "NENCACHE_CPU_SIZE": "256MiB", "LMCACHE_CHUNK_SIZE": "32"}
    loaded = load_config(env=env, overrides={"tenant": "t1"})
    assert loaded.config.chunk_size == 32 and loaded.config.cpu_size == 256 * 2**20
    assert loaded.config.remote_url == "redis://localhost:6379" and loaded.config.tenant == "t1"
    assert loaded.sources["chunk_size"] == "env LMCACHE_CHUNK_SIZE"
    assert loaded.sources["remote_url"].startswith("file ")
    assert "tenant" in loaded.sources and "disk_codec" not in loaded.sources


def test_nencache_env_beats_lmcache_env() -> None:
    loaded = load_config(env={"LMCACHE_CHUNK_SIZE": "32", "NENCACHE_CHUNK_SIZE": "128"})
    assert loaded.config.chunk_size == 128


def test_lmcache_yaml_aliases(tmp_path) -> None:
    path = tmp_path / "lmcache.yaml"
    path.write_text("chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 5.0\nlocal_disk: 'file:///var/cache/kv'\n"
                    "max_local_disk_size: 20\nremote_url: null\nremote_serde: naive\nsave_unfull_chunk: false\n")
    config = load_config(env={"LMCACHE_CONFIG_FILE": str(path)}).config
    assert config.cpu_size == 5 * 10**9 and config.disk_path == "/var/cache/kv" and config.disk_size == 20 * 10**9
    assert config.remote_codec == "raw" and config.save_unfull_chunk is False


def test_lmcache_env_aliases() -> None:
    config = load_config(env={"LMCACHE_MAX_LOCAL_CPU_SIZE": "1.5", "LMCACHE_LOCAL_DISK": "file:///tmp/kv",
                              "LMCACHE_SAVE_UNFULL_CHUNK": "False", "LMCACHE_TRACK_USAGE": "false"}).config
    assert config.cpu_size == int(1.5 * 10**9) and config.disk_path == "/tmp/kv" and not config.save_unfull_chunk


def test_unknown_key_names_the_closest(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("chunk_sise: 64\n")
    with pytest.raises(ConfigError, match="chunk_sise.*did you mean 'chunk_size'"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="max_local_cpu_size"):
        load_config(env={"LMCACHE_MAX_LOCAL_CPU_SIZ": "3"})


@pytest.mark.parametrize(("key", "value"), [("chunk_size", "abc"), ("local_cpu", "maybe"), ("remote_timeout", "x")])
def test_bad_env_values_name_the_key(key, value) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(env={f"NENCACHE_{key.upper()}": value})


@pytest.mark.parametrize("kwargs", [{"chunk_size": 0}, {"chunk_size": "3"}, {"local_cpu": "yes"}, {"cpu_size": "x"},
                                    {"remote_timeout": -1.0}])
def test_bad_constructor_values(kwargs) -> None:
    with pytest.raises(ConfigError):
        CacheConfig(**kwargs)


def test_ignored_lmcache_key_warns_once(caplog, tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("use_layerwise: true\nchunk_size: 128\n")
    with caplog.at_level(logging.WARNING, logger="nencache.config"):
        config = load_config(path, env={}).config
    assert config.chunk_size == 128
    assert sum("use_layerwise" in r.message for r in caplog.records) == 1


def test_bad_yaml_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("chunk_size: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, env={})
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", env={})
