"""Hashers: sha256 (SGLang's byte hash; full parity with SGLang 0.5.23 in
test_sglang_parity.py), domain-separated blake3, xxh3, mmsched's wide pad values, and the
hash counter."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from mmsched import UnknownNameError, get_hasher, hash_stats
from mmsched.hashing import HASHERS, PAD_VALUE_SHIFT, pad_value_of, padding_sequence, tensor_bytes


def sglang_reference(tensor: torch.Tensor) -> int:
    # What SGLang computes for a float32 feature: sha256 over .tobytes(), first 8 bytes BE.
    return int.from_bytes(hashlib.sha256(tensor.numpy().tobytes()).digest()[:8], "big")


def test_sha256_matches_sglang_formula() -> None:
    t = torch.randn(64, 1176)
    value = get_hasher("sha256").hash_tensor("image", t)
    assert value == sglang_reference(t)
    # mmsched's own pad value (no longer 1,000,000 + hash % 2**30): 62 bits of the hash.
    assert pad_value_of(value, "sha256") == 1_000_000 + (value & (2**62 - 1))


@pytest.mark.parametrize("name", ["blake3", "sha256", "xxh3"])
def test_own_pad_values_are_62_bits_wide_above_the_vocabulary(name: str) -> None:
    h = get_hasher(name)
    pads = {h.pad_value(h.hash_tensor("image", torch.tensor([float(i)]))) for i in range(2000)}
    assert len(pads) == 2000  # a collision among 2000 at 2**-49 odds would be a bug
    assert min(pads) >= PAD_VALUE_SHIFT
    assert max(pads) < 2**63  # an int64 token id
    assert max(pads) >= 2**31  # and no longer confined to int32: 2000 draws all below is 2**-62000
    assert h.pad_values(12345) == (h.pad_value(12345),)


def test_padding_sequence_cycles_from_the_first_value() -> None:
    assert padding_sequence((1, 2, 3, 4), 6) == [1, 2, 3, 4, 1, 2]
    assert padding_sequence((1, 2, 3, 4), 3) == [1, 2, 3]
    assert padding_sequence((9,), 3) == [9, 9, 9]
    assert padding_sequence((1, 2), 0) == []


def test_sha256_ignores_modality_and_shape_as_sglang_does() -> None:
    t = torch.randn(32, 16)
    h = get_hasher("sha256")
    assert h.hash_tensor("image", t) == h.hash_tensor("video", t.reshape(16, 32))


@pytest.mark.parametrize("name", ["blake3", "xxh3"])
def test_preimage_hashers_separate_shape_dtype_and_modality(name: str) -> None:
    h = get_hasher(name)
    t = torch.arange(48, dtype=torch.float32)
    base = h.hash_tensor("image", t.reshape(6, 8))
    assert base == h.hash_tensor("image", t.reshape(6, 8).clone())  # deterministic
    assert base != h.hash_tensor("image", t.reshape(8, 6))  # same bytes, other shape
    assert base != h.hash_tensor("video", t.reshape(6, 8))  # same bytes, other modality
    as_int = t.view(torch.int32).reshape(6, 8)  # same bytes, other dtype
    assert tensor_bytes(as_int) == tensor_bytes(t.reshape(6, 8))
    assert base != h.hash_tensor("image", as_int)


@pytest.mark.parametrize("name", sorted(HASHERS))
def test_hash_changes_with_one_bit(name: str) -> None:
    t = torch.randn(1000, 100)
    u = t.clone()
    u.view(torch.int32)[500, 50] ^= 1
    h = get_hasher(name)
    assert h.hash_tensor("image", t) != h.hash_tensor("image", u)


@pytest.mark.parametrize("name", sorted(HASHERS))
def test_non_contiguous_hashes_like_its_contiguous_copy(name: str) -> None:
    t = torch.randn(64, 32).t()
    assert not t.is_contiguous()
    h = get_hasher(name)
    assert h.hash_tensor("image", t) == h.hash_tensor("image", t.contiguous())


def test_bf16_hashed_over_its_own_bytes() -> None:
    t = torch.randn(128, 64).to(torch.bfloat16)
    raw = t.view(torch.int16).numpy().tobytes()
    assert len(raw) == t.numel() * 2
    expected = int.from_bytes(hashlib.sha256(raw).digest()[:8], "big")
    assert get_hasher("sha256").hash_tensor("image", t) == expected


def test_tensor_bytes_shares_memory() -> None:
    t = torch.zeros(16, dtype=torch.float32)
    view = tensor_bytes(t)
    t[0] = 1.0
    assert bytes(view[:4]) == torch.tensor([1.0]).numpy().tobytes()


def test_large_blake3_uses_threads_and_stays_deterministic() -> None:
    t = torch.randn(4 * (1 << 20) // 4)  # 4 MiB: over the multi-thread threshold
    h = get_hasher("blake3")
    assert h.hash_tensor("image", t) == h.hash_tensor("image", t.clone())


def test_every_hash_is_counted() -> None:
    before = hash_stats()
    t = torch.randn(1000)
    for name in sorted(HASHERS):
        get_hasher(name).hash_tensor("audio", t)
    delta = hash_stats() - before
    assert delta.count == len(HASHERS)
    assert delta.nbytes == len(HASHERS) * 4000
    assert delta.cpu_seconds >= 0


def test_unknown_hasher_lists_known() -> None:
    with pytest.raises(UnknownNameError, match=r"blake3, sglang-0\.5\.23, sha256, xxh3"):
        get_hasher("md5")


def test_a_hash_alone_takes_every_core_and_concurrent_ones_one_each() -> None:
    from mmsched.hashing import _CoreShares

    cores = _CoreShares()
    with cores.share() as alone:
        assert alone == (os.cpu_count() or 1)
        with cores.share() as second:
            assert second == 1
    with cores.share() as again:  # both done: alone again
        assert again == (os.cpu_count() or 1)
