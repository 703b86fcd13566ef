"""Trace files: Mooncake JSONL and the plain format read alike; bad lines are named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nencache.errors import TraceError
from nencache.policy.trace import load_trace


def test_mooncake_and_plain_lines_give_the_same_trace(tmp_path: Path) -> None:
    rows = [(0, 1100, [0, 1, 2]), (2500, 600, [0, 3])]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps({"timestamp": t, "input_length": n, "output_length": 9, "hash_ids": h}) + "\n"
                             for t, n, h in rows))
    plain = tmp_path / "t.txt"
    plain.write_text("# seconds tokens blocks\n0 1100 0 1 2\n\n2.5 600 0,3  # a comment\n")
    a, b = load_trace(jsonl), load_trace(plain)
    for field in ("times", "offsets", "ids", "tokens"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert a.tokens.tolist() == [512, 512, 76, 512, 88] and a.times.tolist() == [0.0, 2.5]
    assert a.unique_blocks() == 4 and a.num_requests == 2


@pytest.mark.parametrize("text, message", [
    ('{"timestamp": 0, "input_length": 5}\n', r"t.jsonl:1: not a Mooncake request line"),
    ("1 100 3\n0 100 4\n", r"t.jsonl:2: requests must be in arrival order"),
    ("1.0 many 3 4\n", r"t.jsonl:1: not a plain trace line"),
    ("# nothing\n", r"holds no requests"),
])
def test_bad_traces_are_refused_with_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(text)
    with pytest.raises(TraceError, match=message):
        load_trace(path)


def test_a_missing_file_is_a_trace_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read trace"):
        load_trace(tmp_path / "absent.jsonl")
