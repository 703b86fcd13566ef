"""`NamespaceDisks`: the tier contract, and keys sent to their namespace's own disk tier and directory."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from nencache.errors import ConfigError, TierError
from nencache.server.disks import DIGESTS, NamespaceDisks
from tests.tiers.contract import TierContract, make_blob, make_key


class TestContract(TierContract):
    @pytest.fixture
    def tier(self, tmp_path: Path) -> Iterator[NamespaceDisks]:
        disks = NamespaceDisks(tmp_path, 64 << 20)
        disks.open(b"ab12", b"")  # bare 16-byte keys: the contract's own
        yield disks
        disks.close()


def test_each_key_goes_to_its_namespace_and_clearing_one_namespace_spares_the_others(tmp_path: Path) -> None:
    disks = NamespaceDisks(tmp_path, 64 << 20)
    hexed, named, unopened = b"\x02ab", b"\x06ABCDEF", b"\x03xyz"
    disks.open(b"ab", hexed)
    disks.open(b"ABCDEF", named)
    key = make_key(1)
    disks.put([(hexed + key, make_blob(key, seed=1)), (named + key, make_blob(key, seed=2))])
    assert [bytes(b) for b in disks.get([hexed + key, named + key])] == [make_blob(key, seed=1), make_blob(key, seed=2)]
    assert any((tmp_path / "ab").glob("*.kv"))  # a hex namespace names its directory
    digest = hashlib.blake2b(b"ABCDEF", digest_size=16).hexdigest()
    assert any((tmp_path / DIGESTS / digest).glob("*.kv")) and disks.has(b"ABCDEF") and not disks.has(b"abcdef")
    assert disks.contains_prefix([hexed + key, named + key, named + make_key(2)]) == 2  # a run across namespaces
    assert disks.contains_prefix([unopened + key]) == 0 and disks.get([unopened + key]) == [None]
    with pytest.raises(TierError, match="no disk tier open"):
        disks.put([(hexed + make_key(3), make_blob(make_key(3))), (unopened + key, make_blob(key))])
    assert disks.contains_prefix([hexed + make_key(3)]) == 1  # the namespaces that are open still got theirs
    assert disks.stats().stored_chunks == 3 and len(disks) == 2  # the sum over the namespaces
    disks.clear_namespace(hexed)
    assert disks.get([hexed + key, named + key])[0] is None and disks.contains_prefix([named + key]) == 1
    disks.close()


def test_an_unwritable_root_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ConfigError, match="disk_path"):
        NamespaceDisks(tmp_path / "file" / "disk", 1 << 20)
