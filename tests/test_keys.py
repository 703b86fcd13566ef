"""Keys: deterministic across processes, chained over the prefix, disjoint across namespaces."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nencache.errors import LayoutError
from nencache.keys import chunk_keys, chunk_spans, namespace_digest, partial_key, salted, token_array
from nencache.layout import KVLayout

LAYOUT = KVLayout(30, 3, 64, torch.bfloat16)
NS = namespace_digest("smollm2-135m", LAYOUT, 16)
tokens_st = st.lists(st.integers(min_value=0, max_value=2**31 - 1), min_size=1, max_size=120)


def test_keys_are_16_bytes_and_cover_every_token() -> None:
    spans = chunk_spans(list(range(40)), 16, NS)
    assert [(s.start, s.end) for s in spans] == [(0, 16), (16, 32), (32, 40)]
    assert all(len(s.key) == 16 for s in spans)
    assert len(chunk_spans(list(range(40)), 16, NS, include_partial=False)) == 2


def test_same_keys_in_another_process_with_another_hash_seed() -> None:
    tokens = [int(t) for t in np.random.default_rng(7).integers(0, 50000, 300)]
    script = (
        "import json,sys,torch;from nencache.keys import chunk_keys,namespace_digest;"
        "from nencache.layout import KVLayout;"
        "ns=namespace_digest('smollm2-135m',KVLayout(30,3,64,torch.bfloat16),16);"
        "print(json.dumps([k.hex() for k in chunk_keys(json.loads(sys.argv[1]),16,ns)]))"
    )
    results = set()
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", script, json.dumps(tokens)], env=env, check=True,
                             capture_output=True, text=True).stdout
        results.add(tuple(json.loads(out)))
    assert results == {tuple(k.hex() for k in chunk_keys(tokens, 16, NS))}


@settings(max_examples=200, deadline=None)
@given(tokens=tokens_st, position=st.integers(min_value=0), delta=st.integers(min_value=1, max_value=1000))
def test_changing_a_token_changes_its_chunk_and_all_later_never_earlier(tokens, position, delta) -> None:
    position %= len(tokens)
    changed = list(tokens)
    changed[position] = tokens[position] + delta
    before, after = chunk_keys(tokens, 16, NS), chunk_keys(changed, 16, NS)
    first_changed = position // 16
    assert before[:first_changed] == after[:first_changed]
    assert all(b != a for b, a in zip(before[first_changed:], after[first_changed:]))


@settings(max_examples=100, deadline=None)
@given(tokens=tokens_st)
def test_different_namespaces_give_disjoint_keys(tokens) -> None:
    namespaces = [
        NS,
        namespace_digest("other-model", LAYOUT, 16),
        namespace_digest("smollm2-135m", LAYOUT, 16, fingerprint="other-weights"),
        namespace_digest("smollm2-135m", KVLayout(30, 3, 64, torch.float16), 16),
        namespace_digest("smollm2-135m", KVLayout(30, 2, 64, torch.bfloat16), 16),
        namespace_digest("smollm2-135m", LAYOUT, 16, tenant="team-a"),
        salted(NS, "request-salt"),
    ]
    key_sets = [set(chunk_keys(tokens, 16, ns)) for ns in namespaces]
    key_sets.append(set(chunk_keys(tokens, 32, namespace_digest("smollm2-135m", LAYOUT, 32))))
    for i, a in enumerate(key_sets):
        for b in key_sets[i + 1 :]:
            assert not a & b


@settings(max_examples=100, deadline=None)
@given(tokens=tokens_st)
def test_partial_key_matches_the_trailing_span(tokens) -> None:
    spans = chunk_spans(tokens, 16, NS)
    last = spans[-1]
    parent = spans[-2].key if len(spans) > 1 else NS
    assert partial_key(parent, token_array(tokens)[last.start : last.end]) == last.key


def test_list_tensor_and_array_tokens_agree() -> None:
    tokens = [5, 9, 2**40, 0, 17] * 7
    assert chunk_keys(tokens, 8, NS) == chunk_keys(torch.tensor(tokens), 8, NS) == chunk_keys(np.array(tokens), 8, NS)


@pytest.mark.parametrize("bad", [[[1, 2], [3, 4]], [1.5, 2.0], "abc", torch.tensor([1.0, 2.0]), torch.zeros(2, 2, dtype=torch.long)])
def test_bad_tokens_raise_layout_error(bad) -> None:
    with pytest.raises(LayoutError):
        chunk_keys(bad, 8, NS)


def test_empty_tokens_have_no_chunks() -> None:
    assert chunk_spans([], 8, NS) == []
