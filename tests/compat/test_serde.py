"""LMCache `remote_serde` names stand for NenCache codecs."""

from __future__ import annotations

import pytest

from nencache.codecs import Int4Codec, RawCodec
from nencache.compat.serde import codec_for_serde, codec_name
from nencache.errors import ConfigError


def test_serde_codecs() -> None:
    assert isinstance(codec_for_serde("naive"), RawCodec)
    assert isinstance(codec_for_serde("kivi"), Int4Codec)
    cachegen = codec_for_serde("cachegen")
    assert cachegen.lossy and cachegen.name == "zstd+int4"
    assert codec_name(" CacheGen ") == "zstd+int4"


def test_unknown_serde_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="remote_serde.*naive, kivi, cachegen"):
        codec_for_serde("torch")
