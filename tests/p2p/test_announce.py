"""The announcement format (`nencache.tiers.peer.announce`): round trips, and nothing malformed gets through."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nencache.tiers.peer.announce import Announcement

keys = st.binary(min_size=16, max_size=16)
placements = st.one_of(st.none(), st.binary(min_size=1, max_size=255))


@st.composite
def announcements(draw: st.DrawFn) -> Announcement:
    held = draw(st.booleans())
    count = draw(st.integers(0, 40))
    return Announcement(draw(st.text(max_size=60)), held, draw(st.integers(0, 2**64 - 1)),
                        draw(st.lists(keys, min_size=count, max_size=count)),
                        draw(st.lists(placements, min_size=count, max_size=count)))


@given(announcements())
def test_an_announcement_round_trips(announcement: Announcement) -> None:
    again = Announcement.unpack(announcement.pack())
    assert again is not None
    assert (again.peer, again.held, again.expires_ms) == (announcement.peer, announcement.held, announcement.expires_ms)
    assert list(again.keys) == list(announcement.keys) and list(again.placements) == list(announcement.placements)


@given(announcements(), st.data())
def test_a_cut_or_lengthened_announcement_is_refused(announcement: Announcement, data: st.DataObject) -> None:
    packed = announcement.pack()
    cut = data.draw(st.integers(0, len(packed) - 1))
    assert Announcement.unpack(packed[:cut]) is None
    assert Announcement.unpack(packed + data.draw(st.binary(min_size=1, max_size=20))) is None


@given(st.binary(max_size=300))
def test_any_bytes_unpack_to_none_or_to_what_packs_back_to_them(data: bytes) -> None:
    found = Announcement.unpack(data)
    assert found is None or found.pack() == data


@given(announcements(), st.integers(0, 20), st.integers(1, 255))
def test_a_flipped_header_byte_is_refused_or_still_consistent(announcement: Announcement, at: int, flip: int) -> None:
    packed = bytearray(announcement.pack())
    packed[at] ^= flip
    found = Announcement.unpack(bytes(packed))
    assert found is None or found.pack() == bytes(packed)


@pytest.mark.parametrize("bad", [
    dict(keys=[b"short"], placements=[None]),
    dict(keys=[b"k" * 16], placements=[b"p" * 256]),
    dict(keys=[b"k" * 16], placements=[]),
    dict(peer="h" * 1025),
])
def test_pack_refuses_what_peers_could_not_read(bad: dict[str, object]) -> None:
    fields: dict[str, object] = dict(peer="127.0.0.1:1", held=True, expires_ms=1, keys=[], placements=[])
    with pytest.raises(ValueError):
        Announcement(**{**fields, **bad}).pack()  # type: ignore[arg-type]
