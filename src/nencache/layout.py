"""`KVLayout`: the KV geometry of one model, and the checks that keep tensors honest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nencache.errors import LayoutError

# Stable one-byte codes for dtypes in keys and on the wire; never renumber.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float8_e4m3fn: 4,
    torch.float8_e5m2: 5,
    torch.uint8: 6,
    torch.int8: 7,
}
CODE_DTYPES: dict[int, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}
_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """Turn `"bf16"`, `"torch.bfloat16"` or a torch dtype into a torch dtype."""
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.").lower()
    if name not in _DTYPE_NAMES:
        raise LayoutError(f"unknown KV dtype {value!r}; use one of fp32, fp16, bf16")
    return _DTYPE_NAMES[name]


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Layers, KV heads, head size and dtype: everything that fixes the bytes of one token's KV.

    A chunk of `t` tokens is one contiguous tensor of shape `[num_layers, 2, t, num_kv_heads, head_dim]`
    (2 = keys, values).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LayoutError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if self.dtype not in DTYPE_CODES:
            raise LayoutError(f"KVLayout.dtype {self.dtype} is not supported; use fp32, fp16 or bf16")

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.itemsize

    def shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_dim)

    def nbytes(self, num_tokens: int) -> int:
        return num_tokens * self.bytes_per_token

    def describe(self) -> str:
        """A canonical text form, used in namespace digests and headers."""
        return f"L{self.num_layers}-H{self.num_kv_heads}-D{self.head_dim}-{str(self.dtype).removeprefix('torch.')}"

    def check(self, kv: Any, num_tokens: int) -> torch.Tensor:
        """Return `kv` if it is a tensor of this layout holding `num_tokens` tokens, else raise `LayoutError`."""
        if not isinstance(kv, torch.Tensor):
            raise LayoutError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
        expected = self.shape(num_tokens)
        if tuple(kv.shape) != expected:
            raise LayoutError(
                f"kv has shape {tuple(kv.shape)}, expected {expected} "
                "([num_layers, 2, num_tokens, num_kv_heads, head_dim] for this layout and token count)"
            )
        if kv.dtype != self.dtype:
            raise LayoutError(f"kv has dtype {kv.dtype}, but the cache layout is {self.dtype}; convert it first")
        return kv

    @classmethod
    def from_model_config(cls, config: Any, dtype: torch.dtype | None = None) -> "KVLayout":
        """Derive the layout from a transformers `PretrainedConfig` (Llama, Qwen2, Mistral, ... shaped)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        layers = getattr(text, "num_hidden_layers", None)
        heads = getattr(text, "num_attention_heads", None)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
        if not (layers and kv_heads and head_dim):
            raise LayoutError(
                f"cannot derive a KV layout from {type(config).__name__}: it lacks num_hidden_layers, "
                "num_key_value_heads or head_dim; build a KVLayout by hand"
            )
        chosen = dtype or getattr(text, "dtype", None) or getattr(text, "torch_dtype", None) or torch.float32
        return cls(int(layers), int(kv_heads), int(head_dim), parse_dtype(chosen))
