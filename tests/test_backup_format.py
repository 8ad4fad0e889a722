"""The kleidi_backup role's file format (roles/kleidi_backup/module_utils/kleidi_backup_format.py), directly: its
AES-256-GCM (libcrypto through ctypes) gives what the cryptography package gives, a wrong passphrase and every kind
of damage are told apart and refused before any plaintext comes out, and the tar inside cannot name a path outside
the store."""

from __future__ import annotations

import io
import os
import struct
import tarfile
from types import ModuleType

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.role_modules import ROLES, load

pytestmark = pytest.mark.unit

FAST = {"n": 1 << 10, "r": 8, "p": 1}  # scrypt cheap enough for unit tests; the role's default is N=2^16


@pytest.fixture(scope="module")
def fmt() -> ModuleType:
    return load(ROLES / "kleidi_backup" / "module_utils" / "kleidi_backup_format.py", "kleidi_backup_format")


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 4096, 100_003])
def test_gcm_is_the_standard_aes_256_gcm(fmt: ModuleType, size: int) -> None:
    key, nonce, aad, data = os.urandom(32), os.urandom(12), os.urandom(40), os.urandom(size)
    sealed = fmt._gcm(key, nonce, aad, data)
    assert sealed == AESGCM(key).encrypt(nonce, data, aad)
    assert fmt._gcm(key, nonce, aad, sealed[:-16], tag=sealed[-16:]) == data


def test_a_round_trip_keeps_names_contents_and_meta(fmt: ModuleType) -> None:
    files = {"tok/token.object": os.urandom(320), "tok/a.object": os.urandom(803), "db.sqlite3": b""}
    blob = fmt.seal(fmt.make_tar(files), "correct horse battery staple", {"backend": "softhsm"}, scrypt=FAST)
    header, plain = fmt.open_sealed(blob, "correct horse battery staple")
    assert header["meta"] == {"backend": "softhsm"}
    assert fmt.read_tar(plain) == files


def test_each_backup_has_its_own_salt_and_nonce(fmt: ModuleType) -> None:
    tar = fmt.make_tar({"a": b"same"})
    one, two = (fmt.read_header(fmt.seal(tar, "passphrase-xyz", {}, scrypt=FAST))[0] for _ in range(2))
    assert one["kdf"]["salt"] != two["kdf"]["salt"] and one["nonce"] != two["nonce"]


def test_a_wrong_passphrase_is_named_as_such(fmt: ModuleType) -> None:
    blob = fmt.seal(fmt.make_tar({"a": b"x"}), "the right one", {}, scrypt=FAST)
    with pytest.raises(fmt.WrongPassphrase, match="kleidi_backup_passphrase does not open this backup"):
        fmt.open_sealed(blob, "the wrong one")


@pytest.mark.parametrize("where", ["body", "tag", "meta"])
def test_any_change_fails_the_integrity_check(fmt: ModuleType, where: str) -> None:
    blob = bytearray(fmt.seal(fmt.make_tar({"a": b"x" * 600}), "pass-phrase", {"node": "cp-1"}, scrypt=FAST))
    if where == "body":
        blob[-100] ^= 1
    elif where == "tag":
        blob[-1] ^= 1
    else:  # the authenticated header: cp-1 -> cp-2, same length
        index = bytes(blob).index(b'"node": "cp-1"')
        blob[index + 12] = ord("2")
    with pytest.raises(fmt.Damaged, match="integrity check"):
        fmt.open_sealed(bytes(blob), "pass-phrase")


@pytest.mark.parametrize(
    "blob",
    [b"", b"not a backup at all", b"KLDIBAK1" + struct.pack(">I", 1 << 30), b"KLDIBAK1" + struct.pack(">I", 2) + b"{}"],
)
def test_what_is_not_a_backup_is_refused_as_damaged(fmt: ModuleType, blob: bytes) -> None:
    with pytest.raises(fmt.Damaged):
        fmt.open_sealed(blob, "pass-phrase")


def test_a_truncated_backup_is_refused(fmt: ModuleType) -> None:
    blob = fmt.seal(fmt.make_tar({"a": b"x" * 100}), "pass-phrase", {}, scrypt=FAST)
    with pytest.raises(fmt.Damaged):
        fmt.open_sealed(blob[:-30], "pass-phrase")


def _tar(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return out.getvalue()


@pytest.mark.parametrize("name", ["/etc/passwd", "../escape", "a/../../b", "a//b", "./a"])
def test_names_outside_the_store_are_refused(fmt: ModuleType, name: str) -> None:
    member = tarfile.TarInfo(name)
    member.size = 1
    with pytest.raises(fmt.Damaged, match="an entry kleidi never writes"):
        fmt.read_tar(_tar(member, b"x"))


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_links_and_devices_are_refused(fmt: ModuleType, kind: bytes) -> None:
    member = tarfile.TarInfo("token")
    member.type, member.linkname = kind, "/etc/shadow"
    with pytest.raises(fmt.Damaged, match="an entry kleidi never writes"):
        fmt.read_tar(_tar(member))


def test_out_of_range_scrypt_parameters_are_refused_before_any_work(fmt: ModuleType) -> None:
    blob = fmt.seal(fmt.make_tar({"a": b"x"}), "pass-phrase", {}, scrypt=FAST)
    header_len = struct.unpack(">I", blob[8:12])[0]
    header = blob[12 : 12 + header_len].replace(b'"n": 1024', b'"n": 1073741824'[: len(b'"n": 1024')])
    # Same length keeps the layout; N is now 1073, not a power of two: refused before scrypt runs.
    forged = blob[:12] + header + blob[12 + header_len :]
    with pytest.raises(fmt.Damaged, match="scrypt parameters"):
        fmt.open_sealed(forged, "pass-phrase")
