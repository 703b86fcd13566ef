"""What the connector reads from vLLM's config: `kv_connector_extra_config`, request salts, identities."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from nencache.config_loader import load_config
from nencache.errors import ConfigError
from nencache.integrations.vllm.settings import ConnectorOptions, connector_settings, model_identity, request_salt


def test_nencache_keys_work_with_and_without_prefix_and_lmcache_keys_with_theirs(caplog) -> None:
    overrides, options = connector_settings({
        "disk_path": "/tmp/kv", "cpu_size": "512MiB", "nencache.disk_size": "2GiB",
        "lmcache.chunk_size": 64, "lmcache.max_local_cpu_size": 1.5,
        "async_load": "true", "nencache.lookup_wait_ms": 5, "lmcache.save_decode_cache": False,
    })
    assert overrides == {"disk_path": "/tmp/kv", "cpu_size": "512MiB", "disk_size": "2GiB", "chunk_size": 64,
                         "max_local_cpu_size": 1.5}
    assert options == ConnectorOptions(async_load=True, lookup_wait_ms=5.0, save_decode=False)
    config = load_config(env={}, overrides=overrides).config
    assert config.tiers.disk.path == "/tmp/kv" and config.chunk_size == 64 and config.tiers.cpu.size == int(1.5 * 1e9)


def test_entries_that_are_not_ours_are_named_in_one_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="nencache.vllm"):
        overrides, options = connector_settings({"disk_path": "/x", "nixl_backend": "UCX", "other.thing": 1})
    assert overrides == {"disk_path": "/x"} and options == ConnectorOptions()
    [record] = [r for r in caplog.records if "ignores" in r.getMessage()]
    assert "nixl_backend" in record.getMessage() and "other.thing" in record.getMessage()


def test_unknown_nencache_keys_and_bad_option_values_are_errors() -> None:
    with pytest.raises(ConfigError, match="nencache.disk_pth"):
        connector_settings({"nencache.disk_pth": "/x"})
    with pytest.raises(ConfigError, match="true or false"):
        connector_settings({"save_decode": "maybe"})
    with pytest.raises(ConfigError, match="number"):
        connector_settings({"pin_seconds": "soon"})
    with pytest.raises(ConfigError, match="negative"):
        connector_settings({"lookup_wait_ms": -1})


def test_request_salt_covers_cache_salt_lora_and_images() -> None:
    plain = SimpleNamespace(cache_salt=None, lora_request=None, mm_features=None)
    assert request_salt(plain) is None
    lora = SimpleNamespace(cache_salt="t1", lora_request=SimpleNamespace(lora_name="sql", lora_int_id=3),
                           mm_features=[SimpleNamespace(identifier="img-abc",
                                                        mm_position=SimpleNamespace(offset=4, length=9))])
    assert request_salt(lora) == "salt=t1|lora=sql:3|mm=img-abc@4+9"


def test_model_identity_changes_with_dtype_and_kv_cache_dtype() -> None:
    def config(dtype: str, cache_dtype: str) -> SimpleNamespace:
        model = SimpleNamespace(model="m", revision=None, dtype=dtype, quantization=None, hf_config=None)
        return SimpleNamespace(model_config=model, cache_config=SimpleNamespace(cache_dtype=cache_dtype))

    base = model_identity(config("float32", "auto"))
    assert base[0] == "m"
    assert model_identity(config("bfloat16", "auto"))[1] != base[1]
    assert model_identity(config("float32", "fp8"))[1] != base[1]
    assert model_identity(config("float32", "auto")) == base
