"""copy_into and SmallCopier: exact bytes for any strides; the memmove path only where it is safe."""

from __future__ import annotations

import pytest
import torch

from nencache.copy import SmallCopier, copy_into


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8])
def test_copy_into_any_strides(dtype) -> None:
    base = torch.randn(3, 2, 40, 3, 8).to(dtype)
    for src in (base[:, :, 5:21], base.permute(0, 1, 3, 2, 4)[:, :, 1:], base[1:, :, ::2], base[0, 0, 0, 0],
                base[:, :, 5:21].contiguous()):
        dst = torch.zeros_like(src)
        copy_into(dst, src)
        assert torch.equal(dst, src)
        wide = torch.zeros((*src.shape[:-1], src.shape[-1] * 2), dtype=dtype)[..., ::2] if src.dim() else None
        if wide is not None:
            copy_into(wide, src)
            assert torch.equal(wide, src)


def test_copy_into_large_chunks_are_exact() -> None:  # above the memmove size: numpy's row copies
    src = torch.randn(4, 2, 300, 4, 16).to(torch.bfloat16)
    for dst in (torch.zeros_like(src), torch.zeros(4, 2, 4, 300, 16, dtype=torch.bfloat16).transpose(2, 3)):
        copy_into(dst, src)
        assert torch.equal(dst, src)


def small(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.view(torch.int16).numpy()).cast("B")


def test_small_copier_copies_into_a_matching_tensor_at_its_offset() -> None:
    copier = SmallCopier()
    src = torch.randn(2, 2, 4, 3, 8).to(torch.bfloat16)
    base = torch.zeros(5, *src.shape[1:], dtype=torch.bfloat16)
    for dst in (base[1:3], base[2:4], base[1:3]):  # contiguous, not at its storage's start; a view made, reused
        base.zero_()
        assert copier.copy(dst, src.dtype, src.shape, small(src))
        assert torch.equal(dst, src)
        assert int((base != 0).sum()) == int((src != 0).sum())  # nothing written outside `dst`
    other = torch.randn(1, 2, 4, 3, 8).to(torch.bfloat16)  # a smaller chunk at an address seen before
    base.zero_()
    assert copier.copy(base[1:2], other.dtype, other.shape, small(other))
    assert torch.equal(base[1:2], other) and not base[2:].any()


def test_small_copier_makes_fresh_views_past_its_limit() -> None:
    copier = SmallCopier(limit=2)
    src = torch.randn(4, 8).to(torch.bfloat16)
    base = torch.zeros(6, 4, 8, dtype=torch.bfloat16)
    for round_ in range(2):
        for i in range(6):
            assert copier.copy(base[i], src.dtype, src.shape, small(src + i + round_))
        assert all(torch.equal(base[i], src + i + round_) for i in range(6))


def test_small_copier_refuses_what_a_byte_copy_would_get_wrong() -> None:
    copier = SmallCopier()
    src = torch.randn(2, 2, 4, 3, 8).to(torch.bfloat16)
    refused = {
        "strided": torch.zeros(2, 2, 3, 4, 8, dtype=torch.bfloat16).transpose(2, 3),
        "other dtype": torch.zeros(2, 2, 4, 3, 8, dtype=torch.float16),
        "other shape": torch.zeros(2, 2, 3, 4, 8, dtype=torch.bfloat16),
        "meta device": torch.empty(2, 2, 4, 3, 8, dtype=torch.bfloat16, device="meta"),
    }
    for name, dst in refused.items():
        before = dst.clone() if dst.device.type == "cpu" else None
        assert not copier.copy(dst, src.dtype, src.shape, small(src)), name
        if before is not None:
            assert torch.equal(dst.view(torch.int16), before.view(torch.int16)), name
