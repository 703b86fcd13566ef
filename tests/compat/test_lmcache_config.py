"""LMCache configs work unchanged: YAML files and LMCACHE_* variables give the equivalent NenCache config."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from nencache.compat.keys import ALIASES, LMCACHE_IGNORED, is_lmcache_only
from nencache.config import FLAT_KEYS
from nencache.config_loader import load_config
from nencache.errors import ConfigError

GB = 10**9

# The three setups LMCache's documentation shows: CPU offloading, CPU + local disk, CPU + Redis.
CPU_ONLY = {"chunk_size": 256, "local_cpu": True, "max_local_cpu_size": 5.0}
CPU_DISK = {"chunk_size": 256, "local_cpu": True, "max_local_cpu_size": 5, "local_disk": "file:///tmp/lmcache_disk/",
            "max_local_disk_size": 20}
CPU_REDIS = {"chunk_size": 256, "local_cpu": True, "max_local_cpu_size": 5, "remote_url": "redis://localhost:6379",
             "remote_serde": "naive"}

EXPECTED = {
    "cpu": dict(chunk_size=256, local_cpu=True, cpu_size=5 * GB, disk_path=None, remote_url=None),
    "disk": dict(chunk_size=256, local_cpu=True, cpu_size=5 * GB, disk_path="/tmp/lmcache_disk/", disk_size=20 * GB,
                 remote_url=None),
    "redis": dict(chunk_size=256, local_cpu=True, cpu_size=5 * GB, disk_path=None, remote_url="redis://localhost:6379",
                  remote_codec="raw"),
}
SETUPS = [("cpu", CPU_ONLY), ("disk", CPU_DISK), ("redis", CPU_REDIS)]


def as_yaml(settings: dict) -> str:
    def text(value: object) -> str:
        return ("True" if value else "False") if isinstance(value, bool) else (
            f'"{value}"' if isinstance(value, str) else str(value))
    return "".join(f"{key}: {text(value)}\n" for key, value in settings.items())


def as_env(settings: dict) -> dict[str, str]:
    return {f"LMCACHE_{key.upper()}": str(value) for key, value in settings.items()}


@pytest.mark.parametrize(("name", "settings"), SETUPS)
def test_lmcache_yaml_file(name, settings, tmp_path, caplog) -> None:
    path = tmp_path / "lmcache.yaml"
    path.write_text(as_yaml(settings))
    with caplog.at_level(logging.WARNING, logger="nencache.config"):
        loaded = load_config(env={"LMCACHE_CONFIG_FILE": str(path)})
    assert {k: loaded.config.as_dict()[k] for k in EXPECTED[name]} == EXPECTED[name]
    assert not caplog.records, "every key of these setups has a NenCache equivalent"
    assert loaded.sources["cpu_size"] == f"file {path} (LMCache key max_local_cpu_size)"


@pytest.mark.parametrize(("name", "settings"), SETUPS)
def test_lmcache_environment(name, settings, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="nencache.config"):
        loaded = load_config(env=as_env(settings) | {"LMCACHE_TRACK_USAGE": "false"})
    assert {k: loaded.config.as_dict()[k] for k in EXPECTED[name]} == EXPECTED[name]
    assert not caplog.records
    assert loaded.sources["chunk_size"] == "env LMCACHE_CHUNK_SIZE"


def test_env_overrides_file_and_quotes_are_stripped(tmp_path) -> None:
    path = tmp_path / "lmcache.yaml"
    path.write_text(as_yaml(CPU_REDIS))
    config = load_config(env={"LMCACHE_CONFIG_FILE": str(path), "LMCACHE_CHUNK_SIZE": "64",
                              "LMCACHE_REMOTE_URL": '"rediss://cache.internal:6380/2"'}).config
    assert config.chunk_size == 64 and config.tiers.remote.url == "rediss://cache.internal:6380/2"


def test_p2p_and_controller_settings(tmp_path, caplog) -> None:
    # LMCache's P2P sharing example, unchanged.
    path = tmp_path / "p2p.yaml"
    path.write_text(
        "chunk_size: 256\nlocal_cpu: True\nmax_local_cpu_size: 5\nenable_async_loading: True\n"
        "enable_p2p: True\np2p_host: \"localhost\"\np2p_init_ports: 8200\np2p_lookup_ports: 8201\n"
        "transfer_channel: \"nixl\"\nenable_controller: True\nlmcache_instance_id: \"lmcache_instance_1\"\n"
        "controller_pull_url: \"localhost:8300\"\ncontroller_reply_url: \"localhost:8400\"\nlmcache_worker_ports: 8500\n"
        "extra_config:\n  lookup_backoff_time: 0.001\n")
    with caplog.at_level(logging.WARNING, logger="nencache.config"):
        config = load_config(path, env={"LMCACHE_P2P_LOOKUP_PORTS": "8201"}).config
    assert (config.p2p.enabled, config.p2p.host, config.p2p.port, config.p2p.index_url) == (
        True, "localhost", 8200, "localhost:8300")
    warned = [r.getMessage() for r in caplog.records]
    for key in ("enable_async_loading", "p2p_lookup_ports", "transfer_channel", "enable_controller",
                "lmcache_instance_id", "controller_reply_url", "lmcache_worker_ports", "extra_config"):
        assert sum(f"'{key}'" in message for message in warned) == 1, key  # one warning each, file and env together
    assert any("lookup_backoff_time" in message for message in warned)
    assert len(warned) == 8


def test_older_lmcache_p2p_names() -> None:
    config = load_config(env={"LMCACHE_ENABLE_P2P": "True", "LMCACHE_LOOKUP_URL": "localhost:8100",
                              "LMCACHE_DISTRIBUTED_URL": "10.0.0.7:8200", "LMCACHE_P2P_INIT_PORTS": "8200,8201"}).config
    assert (config.p2p.index_url, config.p2p.host, config.p2p.port) == ("localhost:8100", "10.0.0.7", 8200)
    with pytest.raises(ConfigError, match="host:port"):
        load_config(env={"LMCACHE_DISTRIBUTED_URL": "nowhere"})


@pytest.mark.parametrize(("url", "effective"), [
    ("redis://user:pw@localhost:6379/1", "redis://user:pw@localhost:6379/1"),
    ("rediss://localhost:6380", "rediss://localhost:6380"),
    ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ("redis-cluster://h1:7000,h2:7001", "redis-cluster://h1:7000,h2:7001"),
    ("valkey://localhost:6379", "valkey://localhost:6379"),
    ("resp://localhost:6379", "redis://localhost:6379"),
    ("lm://localhost:65432", "nencache://localhost:65432"),
    ("blackhole://", None),
    ("nencache://cache:5870", "nencache://cache:5870"),
])
def test_remote_url_schemes_map(url, effective) -> None:
    assert load_config(env={"LMCACHE_REMOTE_URL": url}).config.tiers.remote.url == effective


@pytest.mark.parametrize("url", ["redis-sentinel://s1:26379,s2:26379/mymaster", "infinistore://127.0.0.1:12345",
                                 "mooncakestore://127.0.0.1:50051", "s3://bucket.s3.us-east-1.amazonaws.com",
                                 "fs:///mnt/shared", "localhost:6379"])
def test_unsupported_remote_schemes_say_what_is_supported(url) -> None:
    with pytest.raises(ConfigError, match=r"redis://.*nencache://"):
        load_config(env={"LMCACHE_REMOTE_URL": url})


def test_serde_and_disk_values(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="nencache.config"):
        config = load_config(env={"LMCACHE_REMOTE_SERDE": "cachegen", "LMCACHE_LOCAL_DISK": "/mnt/a/,/mnt/b/",
                                  "LMCACHE_BLOCKING_TIMEOUT_SECS": "2"}).config
    assert config.tiers.remote.codec == "zstd+int4" and config.tiers.disk.path == "/mnt/a/" and config.tiers.remote.timeout == 2.0
    assert any("one" in r.getMessage() and "/mnt/a/" in r.getMessage() for r in caplog.records)
    assert load_config(env={"LMCACHE_REMOTE_SERDE": "kivi"}).config.tiers.remote.codec == "int4"


LMCACHE_CONFIG = Path(__file__).resolve().parents[2] / ".venv-lmcache/lib/python3.11/site-packages/lmcache/v1/config.py"


def lmcache_keys() -> list[str]:
    """Every key LMCache's own config defines (its _CONFIG_DEFINITIONS and deprecated aliases)."""
    tree = ast.parse(LMCACHE_CONFIG.read_text())
    keys: list[str] = []
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if getattr(target, "id", None) in ("_CONFIG_DEFINITIONS", "_CONFIG_ALIASES") and isinstance(node.value, ast.Dict):
            keys += [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
    return keys


@pytest.mark.skipif(not LMCACHE_CONFIG.exists(), reason="LMCache is not installed in .venv-lmcache")
def test_every_lmcache_key_is_mapped_or_warned() -> None:
    keys = lmcache_keys()
    assert len(keys) > 50
    unhandled = [k for k in keys if k not in ALIASES and k not in FLAT_KEYS and not is_lmcache_only(k)]
    assert unhandled == []


def test_tables_do_not_overlap() -> None:
    assert not set(ALIASES) & LMCACHE_IGNORED
    assert not set(FLAT_KEYS) & LMCACHE_IGNORED
    assert not any(is_lmcache_only(key) for key in FLAT_KEYS), "a NenCache key must never be ignored"
