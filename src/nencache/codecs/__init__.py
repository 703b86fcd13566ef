"""Codecs: chunk tensor <-> the shared byte format. `get_codec(name)` finds one by name.

Names: `raw`, `int8`, `fp8`, `int4`, `vq`, and lossless wrappers over any of them: `zstd+int4`,
`lz4+int8`, ... (`zstd` and `lz4` alone wrap raw). Ids (stable, in the chunk header): raw 0, int8 1,
fp8 2, int4 3, vq 4; wrappers zstd 1, lz4 2. See docs/format.md; how fast the lossy decoders are is
under "Limits" in the README.
"""

from __future__ import annotations

from typing import Any

import torch

from nencache.codecs.base import Codec
from nencache.codecs.fp8 import Fp8Codec
from nencache.codecs.int4 import Int4Codec
from nencache.codecs.int8 import Int8Codec
from nencache.codecs.lossless import WRAPPER_IDS, WRAPPERS, Lz4Codec, ZstdCodec
from nencache.codecs.raw import RawCodec
from nencache.codecs.vq import VQCodec
from nencache.codecs.vq_codebook import CodebookStore
from nencache.errors import ConfigError, CorruptChunkError
from nencache.format import parse_header

_CODECS: dict[str, type] = {"raw": RawCodec, "int8": Int8Codec, "fp8": Fp8Codec, "int4": Int4Codec, "vq": VQCodec}
_BY_ID: dict[int, type] = {cls.codec_id: cls for cls in _CODECS.values()}


def codec_names() -> list[str]:
    """Every name `get_codec` takes."""
    return sorted(_CODECS) + [f"{w}+{c}" if c != "raw" else w for w in WRAPPERS for c in sorted(_CODECS)]


def get_codec(name: str, *, level: int | None = None, **options: Any) -> Codec:
    """Return a codec by name; `options` go to the base codec (e.g. `get_codec("vq", bits=4)`),
    `level` to a zstd wrapper."""
    parts = str(name).strip().lower().split("+")
    if len(parts) == 1 and parts[0] in WRAPPERS:
        parts = [parts[0], "raw"]
    if len(parts) > 2 or parts[-1] not in _CODECS or (len(parts) == 2 and parts[0] not in WRAPPERS):
        raise ConfigError(f"unknown codec {name!r}; available: {', '.join(codec_names())}")
    try:
        codec = _CODECS[parts[-1]](**options)
        if len(parts) == 1:
            if level is not None:
                raise ConfigError(f"codec {name!r} takes no compression level; use e.g. 'zstd+{name}'")
            return codec
        wrapper = WRAPPERS[parts[0]]
        return wrapper(codec, level) if level is not None and wrapper is ZstdCodec else wrapper(codec)
    except TypeError as exc:
        raise ConfigError(f"bad options for codec {name!r}: {exc}") from None


_DEFAULTS: dict[tuple[int, int], Codec] = {}


def decode_any(blob: bytes | bytearray | memoryview, expected_key: bytes | None = None) -> torch.Tensor:
    """Decode a chunk whatever codec and wrapper wrote it (vq codebooks from the process-wide store)."""
    header = parse_header(blob)
    ids = (header.codec_id, header.wrapper_id)
    codec = _DEFAULTS.get(ids)
    if codec is None:
        if header.codec_id not in _BY_ID or (header.wrapper_id and header.wrapper_id not in WRAPPER_IDS):
            raise CorruptChunkError(f"chunk names codec id {header.codec_id} / wrapper id {header.wrapper_id}, "
                                    "which this build does not know")
        codec = _BY_ID[header.codec_id]()
        codec = WRAPPER_IDS[header.wrapper_id](codec) if header.wrapper_id else codec
        _DEFAULTS[ids] = codec
    return codec.decode(blob, expected_key)


__all__ = [
    "Codec", "CodebookStore", "Fp8Codec", "Int4Codec", "Int8Codec", "Lz4Codec", "RawCodec", "VQCodec", "ZstdCodec",
    "codec_names", "decode_any", "get_codec",
]
