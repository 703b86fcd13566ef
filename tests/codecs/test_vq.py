"""VQ codebooks: learned, versioned by content, persisted, and required to decode."""

from __future__ import annotations

import pytest
import torch

from nencache.codecs import VQCodec, decode_any, get_codec
from nencache.codecs.vq_codebook import CodebookStore
from nencache.errors import ConfigError, CorruptChunkError
from nencache.format import parse_header
from nencache.layout import KVLayout

from tests.codecs.helpers import calibrated_vq, rel_error, synthetic_kv

X = synthetic_kv(layers=2, tokens=128, heads=2, head_dim=16, seed=1)


def test_codebook_id_is_in_the_header_and_stable() -> None:
    a, b = calibrated_vq(X), calibrated_vq(X)
    blob = a.encode(X)
    ident = a.active_codebook(KVLayout(2, 2, 16))
    assert parse_header(blob).codec_param == ident | 1 << 24 and 0 < ident < 1 << 24  # id | exact_tokens << 24
    assert b.active_codebook(KVLayout(2, 2, 16)) == ident  # same data, same codebook, same id
    assert torch.equal(b.decode(blob), a.decode(blob))


def test_unknown_codebook_is_corrupt() -> None:
    blob = calibrated_vq(X).encode(X)
    stranger = VQCodec(store=CodebookStore())
    with pytest.raises(CorruptChunkError, match="codebook"):
        stranger.decode(blob)


def test_codebooks_persist_to_a_file(tmp_path) -> None:
    codec = calibrated_vq(X, bits=4)
    blob = codec.encode(X)
    codec.save_codebooks(tmp_path / "books.nvq")
    other = VQCodec(store=CodebookStore(), auto_calibrate=False)
    ids = other.load_codebooks(tmp_path / "books.nvq")
    assert ids == [parse_header(blob).codec_param & 0xFFFFFF]
    assert torch.equal(other.decode(blob), codec.decode(blob))
    assert other.encode(X) == blob  # the loaded codebook is active for new chunks


def test_damaged_codebook_file_is_refused(tmp_path) -> None:
    codec = calibrated_vq(X)
    path = tmp_path / "books.nvq"
    codec.save_codebooks(path)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError):
        VQCodec(store=CodebookStore()).load_codebooks(path)
    path.write_bytes(bytes(data[:50]))
    with pytest.raises(ConfigError):
        VQCodec(store=CodebookStore()).load_codebooks(path)


def test_codebook_dir_shares_codebooks_between_processes(tmp_path) -> None:
    writer = VQCodec(codebook_dir=tmp_path / "books")
    blob = writer.encode(X)
    assert list((tmp_path / "books").glob("*.nvq"))
    reader = VQCodec(store=CodebookStore(tmp_path / "books"))  # a fresh store: reads the file on demand
    assert torch.equal(reader.decode(blob), writer.decode(blob))


def test_auto_calibration_relearns_and_old_chunks_keep_their_codebook() -> None:
    codec = VQCodec(store=CodebookStore(), calibration_tokens=512)
    chunks = [synthetic_kv(layers=2, tokens=128, heads=2, head_dim=16, seed=s) for s in range(6)]
    blobs = [codec.encode(c) for c in chunks]
    ids = [parse_header(b).codec_param & 0xFFFFFF for b in blobs]
    # 127 tokens a chunk after the exact first token: learned at 127, re-learned when the samples
    # doubled (254, 508), then sampling stops (635 >= calibration_tokens)
    assert ids[0] != ids[1] == ids[2] != ids[3] == ids[4] == ids[5]
    for chunk, blob in zip(chunks, blobs):
        assert rel_error(codec.decode(blob), chunk, 1) < 0.35


def test_explicit_calibration_without_auto() -> None:
    codec = VQCodec(store=CodebookStore(), auto_calibrate=False)
    with pytest.raises(ConfigError, match="calibrate"):
        codec.encode(X)
    codec.calibrate([X[:, :, :64], X[:, :, 64:]])
    assert codec.decode(codec.encode(X)).shape == X.shape
    with pytest.raises(ConfigError):
        codec.calibrate([X, synthetic_kv(layers=1)])
    with pytest.raises(ConfigError):
        VQCodec(bits=5)


def test_calibration_beats_a_uniform_grid() -> None:
    """3 bits a value with learned centroids against int4's 16-level grid at 4 bits a value."""
    x = synthetic_kv(layers=2, tokens=256, heads=2, head_dim=64, seed=3)
    vq = calibrated_vq(synthetic_kv(layers=2, tokens=512, heads=2, head_dim=64, seed=4))
    int4 = get_codec("int4")
    assert len(vq.encode(x)) < len(int4.encode(x))
    assert rel_error(vq.decode(vq.encode(x)), x, 0) < 2.5 * rel_error(int4.decode(int4.encode(x)), x, 0)


def test_decode_any_uses_the_process_store() -> None:
    codec = VQCodec()  # the process-wide store
    codec.calibrate([X])
    assert torch.equal(decode_any(codec.encode(X)), codec.decode(codec.encode(X)))
