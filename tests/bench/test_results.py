"""The figures' arithmetic: percentiles, medians and ranges, paired ratios."""

from __future__ import annotations

import pytest

from nencache.bench.results import Summary, fmt, paired, percentile


def test_percentiles_are_nearest_rank() -> None:
    samples = list(range(1, 101))  # 1..100
    assert percentile(samples, 0.5) == 50 and percentile(samples, 0.99) == 99 and percentile(samples, 1.0) == 100
    assert percentile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_paired_ratios_are_taken_rep_by_rep() -> None:
    # ours was twice theirs in every rep although both drifted: the ratio says 2x, not the drift
    ratio = paired([2.0, 4.0, 8.0], [1.0, 2.0, 4.0])
    assert (ratio.median, ratio.low, ratio.high, ratio.n) == (2.0, 2.0, 2.0, 3)
    assert Summary.of([3.0, 1.0, 2.0]).cell() == "2 (1-3)"
    with pytest.raises(ValueError):
        paired([1.0, 2.0], [1.0])


def test_cells() -> None:
    assert fmt(None) == "-" and fmt(1234.5) == "1,234" and fmt(0.012345) == "0.0123"
