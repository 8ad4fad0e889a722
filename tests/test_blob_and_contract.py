"""The wrapped-key format and the apiserver's limits, without a token."""

from __future__ import annotations

import pytest

from kleidi import contract
from kleidi.errors import InvalidInput
from kleidi.providers.pkcs11_blob import KeyRef, parse

pytestmark = pytest.mark.unit

GCM = KeyRef("aes-gcm", ("kek-1",), bytes(range(8)))
CBC = KeyRef("aes-cbc-hmac", ("kek-1", "mac-1"), bytes(range(8, 16)))


def test_headers_round_trip() -> None:
    gcm = parse(GCM.header() + b"i" * 12 + b"c" * 48)
    assert gcm.ref == GCM and gcm.iv == b"i" * 12 and gcm.ciphertext == b"c" * 48 and gcm.header == GCM.header()
    cbc = parse(CBC.header() + b"i" * 16 + b"c" * 48 + b"m" * 32)
    assert cbc.ref == CBC and (cbc.iv, cbc.ciphertext, cbc.mac) == (b"i" * 16, b"c" * 48, b"m" * 32)


def test_key_id_is_derived_from_labels_and_fingerprint() -> None:
    assert GCM.key_id == "pkcs11:aes-gcm:kek-1:0001020304050607"
    assert KeyRef("aes-gcm", ("kek-1",), bytes(8)).key_id != GCM.key_id
    assert CBC.key_id == "pkcs11:aes-cbc-hmac:kek-1+mac-1:08090a0b0c0d0e0f"


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (b"", "bad magic"),
        (b"xx\x01\x01", "bad magic"),
        (b"kl\x02\x01" + b"\x00" * 40, "format version 2"),
        (b"kl\x01\x07" + b"\x00" * 40, "unknown mechanism"),
        (GCM.header()[:7], "truncated"),
        (GCM.header() + b"i" * 12 + b"t" * 16, "truncated"),
        (CBC.header() + b"i" * 16 + b"c" * 47 + b"m" * 32, "whole AES blocks"),
        (b"kl\x01\x01\x00" + b"\x00" * 30, "truncated"),
    ],
)
def test_malformed_blobs_are_rejected(blob: bytes, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        parse(blob)


def test_contract_limits() -> None:
    assert contract.key_id_problems("") == ["key_id is empty"]
    assert contract.key_id_problems("k" * 1025)
    assert contract.ciphertext_problems(b"c" * 1025)
    assert contract.annotation_problems({"version.kleidi.dev": b"1"}) == []
    assert contract.annotation_problems({"kms.example.io/remote-kms-auditid": b"1"})
    assert contract.annotation_problems({"nodots": b"1"})
    assert contract.annotation_problems({"a.b": b"x" * 40000})
    assert contract.status_problems("v2", "ok", "k") == []
    assert len(contract.status_problems("v1", "bad", "")) == 3
