"""LMCache `remote_serde` names as NenCache codecs.

naive = the tensor bytes; kivi = KIVI-style 4-bit; cachegen = LMCache's best lossy ratio at small loss,
which here is 4-bit + zstd (4.1x, +0.5% perplexity on SmolLM2-135M; benchmarks/RESULTS.md, "codecs").
"""

from __future__ import annotations

from nencache.codecs import Codec, get_codec
from nencache.errors import ConfigError

SERDE_CODECS: dict[str, str] = {"naive": "raw", "kivi": "int4", "cachegen": "zstd+int4"}


def codec_name(serde: object) -> str:
    """The NenCache codec name standing in for an LMCache `remote_serde` value."""
    key = str(serde).strip().lower()
    if key not in SERDE_CODECS:
        raise ConfigError(f"remote_serde: unknown value {serde!r}; LMCache's values are "
                          f"{', '.join(SERDE_CODECS)}")
    return SERDE_CODECS[key]


def codec_for_serde(serde: object) -> Codec:
    """The codec standing in for an LMCache `remote_serde` value."""
    return get_codec(codec_name(serde))
