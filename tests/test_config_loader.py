"""Loading a config: defaults, YAML (flat or nested), NENCACHE_* and LMCACHE_* env, overrides, clear errors."""

from __future__ import annotations

import logging

import pytest

from nencache.config_loader import is_config_key, load_config
from nencache.errors import ConfigError


def test_yaml_env_and_overrides_in_order(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("chunk_size: 64\ncpu_size: 1GiB\nremote_url: redis://localhost:6379\n")
    env = {"NENCACHE_CONFIG_FILE": str(path), "NENCACHE_CPU_SIZE": "256MiB", "LMCACHE_CHUNK_SIZE": "32"}
    loaded = load_config(env=env, overrides={"tenant": "t1"})
    assert loaded.config.chunk_size == 32 and loaded.config.tiers.cpu.size == 256 * 2**20
    assert loaded.config.tiers.remote.url == "redis://localhost:6379" and loaded.config.tenant == "t1"
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
    assert config.tiers.cpu.size == 5 * 10**9 and config.tiers.disk.path == "/var/cache/kv"
    assert config.tiers.disk.size == 20 * 10**9
    assert config.tiers.remote.codec == "raw" and config.save_unfull_chunk is False


def test_lmcache_env_aliases() -> None:
    config = load_config(env={"LMCACHE_MAX_LOCAL_CPU_SIZE": "1.5", "LMCACHE_LOCAL_DISK": "file:///tmp/kv",
                              "LMCACHE_SAVE_UNFULL_CHUNK": "False", "LMCACHE_TRACK_USAGE": "false"}).config
    assert config.tiers.cpu.size == int(1.5 * 10**9) and config.tiers.disk.path == "/tmp/kv"
    assert not config.save_unfull_chunk


def test_nested_yaml_sections(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("chunk_size: 64\nserver:\n  port: 6000\n  max_request_bytes: 1MiB\n"
                    "tiers:\n  io_threads: 3\n  disk:\n    path: /var/kv\n  cpu:\n    enabled: false\n"
                    "p2p:\n  enabled: true\n")
    loaded = load_config(path, env={"NENCACHE_SERVER_PORT": "6001"})
    config = loaded.config
    assert (config.server.port, config.server.max_request_bytes, config.tiers.io_threads) == (6001, 2**20, 3)
    assert (config.tiers.disk.path, config.tiers.cpu.enabled, config.p2p.enabled) == ("/var/kv", False, True)
    assert loaded.sources["server_port"] == "env NENCACHE_SERVER_PORT"
    assert loaded.sources["disk_path"] == f"file {path}" and loaded.sources["enable_p2p"] == f"file {path}"


def test_unknown_nested_key_lists_its_section(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("tiers:\n  disk:\n    paht: /kv\n")
    with pytest.raises(ConfigError, match=r"'tiers\.disk\.paht'.*section 'tiers\.disk' has codec, path, size"):
        load_config(path, env={})
    path.write_text("server: 6000\n")
    with pytest.raises(ConfigError, match="'server' .* is a section"):
        load_config(path, env={})


def test_unknown_key_names_the_closest(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("chunk_sise: 64\n")
    with pytest.raises(ConfigError, match="chunk_sise.*did you mean 'chunk_size'"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="max_local_cpu_size"):
        load_config(env={"LMCACHE_MAX_LOCAL_CPU_SIZ": "3"})
    with pytest.raises(ConfigError, match="server_admin_port"):
        load_config(overrides={"server_admin_prot": 1})


@pytest.mark.parametrize(("key", "value"), [("chunk_size", "abc"), ("local_cpu", "maybe"), ("remote_timeout", "x"),
                                            ("server_io_timeout", "soon"), ("cpu_size", "lots")])
def test_bad_env_values_name_the_key(key, value) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(env={f"NENCACHE_{key.upper()}": value})


def test_ignored_lmcache_key_warns_once(caplog, tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("use_layerwise: true\nchunk_size: 128\n")
    with caplog.at_level(logging.WARNING, logger="nencache.config"):
        config = load_config(path, env={"LMCACHE_USE_LAYERWISE": "True"}).config
    assert config.chunk_size == 128
    assert sum("use_layerwise" in r.message for r in caplog.records) == 1


def test_is_config_key() -> None:
    assert is_config_key("server_port") and is_config_key("local_cpu") and not is_config_key("max_local_cpu_size")
    assert is_config_key("max_local_cpu_size", lmcache=True) and is_config_key("use_layerwise", lmcache=True)
    assert not is_config_key("colour", lmcache=True)


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
