"""Codec names and ids."""

from __future__ import annotations

import pytest

from nencache.codecs import (
    Fp8Codec, Int4Codec, Int8Codec, Lz4Codec, RawCodec, VQCodec, ZstdCodec, codec_names, get_codec,
)
from nencache.codecs.base import Codec
from nencache.errors import ConfigError


def test_names_and_ids() -> None:
    expected = {"raw": (RawCodec, 0), "int8": (Int8Codec, 1), "fp8": (Fp8Codec, 2), "int4": (Int4Codec, 3),
                "vq": (VQCodec, 4)}
    for name, (cls, ident) in expected.items():
        codec = get_codec(name)
        assert isinstance(codec, cls) and isinstance(codec, Codec)
        assert codec.name == name and codec.codec_id == ident
        assert codec.lossy == (name != "raw")
    zstd = get_codec("zstd")
    assert isinstance(zstd, ZstdCodec) and isinstance(zstd.inner, RawCodec) and zstd.name == "zstd"
    assert zstd.wrapper_id == 1 and get_codec("lz4").wrapper_id == 2
    wrapped = get_codec("lz4+int8")
    assert isinstance(wrapped, Lz4Codec) and wrapped.name == "lz4+int8" and wrapped.codec_id == 1 and wrapped.lossy
    assert get_codec("zstd+raw").name == "zstd"
    for name in codec_names():
        assert get_codec(name).name == name


def test_options() -> None:
    assert get_codec("int4", key_group=32).key_group == 32
    assert get_codec("zstd+int4", level=9).level == 9
    assert get_codec("vq", bits=4).bits == 4
    with pytest.raises(ConfigError):
        get_codec("int8", bogus=1)
    with pytest.raises(ConfigError):
        get_codec("int8", level=3)
    with pytest.raises(ConfigError):
        get_codec("int4", key_group=-1)
    with pytest.raises(ConfigError):
        get_codec("zstd", level=99)


@pytest.mark.parametrize("name", ["", "int2", "zstd+lz4", "zstd+int8+int4", "int8+zstd", "+int8"])
def test_unknown_names(name: str) -> None:
    with pytest.raises(ConfigError, match="available"):
        get_codec(name)
