"""The PKCS#11 provider in-process on a real SoftHSM2 token: both mechanisms, the session pool, faults."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import PyKCS11
import pytest

from kleidi.config import Pkcs11Config
from kleidi.errors import BackendUnavailable, ConfigError, IntegrityError, InvalidInput, KeyNotFound
from kleidi.observability import Metrics
from kleidi.providers.pkcs11 import Pkcs11Provider
from kleidi.providers.pkcs11_blob import parse
from kleidi.providers.pkcs11_direct import Direct
from tests.backends.softhsm import SoftHsm

pytestmark = pytest.mark.integration


@pytest.fixture
def hsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftHsm:
    token = SoftHsm(tmp_path)
    token.keygen("kek-1")
    token.keygen("mac-1", "GENERIC:32")
    monkeypatch.setenv("SOFTHSM2_CONF", str(token.conf))
    return token


def _provider(hsm: SoftHsm, **settings: object) -> Pkcs11Provider:
    cfg = Pkcs11Config.model_validate(hsm.config(str(settings.pop("key_label", "kek-1")), **settings))
    return Pkcs11Provider(cfg, Metrics())


@pytest.fixture
def gcm(hsm: SoftHsm) -> Iterator[Pkcs11Provider]:
    provider = _provider(hsm)
    provider.check()
    yield provider
    provider.close()


@pytest.fixture
def cbc(hsm: SoftHsm) -> Iterator[Pkcs11Provider]:
    provider = _provider(hsm, mechanism="aes-cbc-hmac", hmac_key_label="mac-1")
    provider.check()
    yield provider
    provider.close()


def test_cbc_hmac_round_trip_and_format(cbc: Pkcs11Provider) -> None:
    seed = os.urandom(32)
    wrapped = cbc.encrypt(seed, "u")
    assert wrapped.key_id == cbc.key_id() and wrapped.key_id.startswith("pkcs11:aes-cbc-hmac:kek-1+mac-1:")
    blob = parse(wrapped.ciphertext)
    assert blob.ref.labels == ("kek-1", "mac-1") and len(blob.iv) == 16 and len(blob.mac) == 32
    assert len(blob.ciphertext) == 48  # 32 bytes plus a whole block of PKCS#7 padding
    assert cbc.decrypt(wrapped.ciphertext, wrapped.key_id, {}, "u") == seed


def test_cbc_hmac_any_flipped_byte_is_rejected(cbc: Pkcs11Provider) -> None:
    seed = os.urandom(32)
    blob = cbc.encrypt(seed, "u").ciphertext
    for index in range(len(blob)):
        tampered = bytearray(blob)
        tampered[index] ^= 0x80
        with pytest.raises((IntegrityError, InvalidInput, KeyNotFound)):
            cbc.decrypt(bytes(tampered), "", {}, "u")
    assert cbc.decrypt(blob, "", {}, "u") == seed


def test_gcm_any_flipped_byte_is_rejected(gcm: Pkcs11Provider) -> None:
    seed = os.urandom(32)
    blob = gcm.encrypt(seed, "u").ciphertext
    for index in range(len(blob)):
        tampered = bytearray(blob)
        tampered[index] ^= 0x01
        with pytest.raises((IntegrityError, InvalidInput, KeyNotFound)):
            gcm.decrypt(bytes(tampered), "", {}, "u")


def test_a_device_fault_during_a_gcm_decrypt_is_unavailable_not_tampering(
    gcm: Pkcs11Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CKR_GENERAL_ERROR is both SoftHSM's failed tag check and a failing device's answer: only when the key can no
    longer encrypt either is it the device, reported UNAVAILABLE (the connection rebuilt), not tampered data."""
    seed = os.urandom(32)
    blob = gcm.encrypt(seed, "u").ciphertext

    def device_fault(*args: object) -> bytes:
        raise PyKCS11.PyKCS11Error(PyKCS11.CKR_GENERAL_ERROR)

    with monkeypatch.context() as faulty:
        faulty.setattr(Direct, "gcm_decrypt", device_fault)
        with pytest.raises(IntegrityError):  # the key still encrypts: it was the data
            gcm.decrypt(blob, "", {}, "u")
        faulty.setattr(Direct, "gcm_encrypt", device_fault)
        with pytest.raises(BackendUnavailable, match="unavailable during decrypt"):
            gcm.decrypt(blob, "", {}, "u")
    assert gcm.decrypt(blob, "", {}, "u") == seed  # the device back: the rebuilt connection serves again


def test_switching_mechanism_keeps_old_data_readable(hsm: SoftHsm, gcm: Pkcs11Provider, cbc: Pkcs11Provider) -> None:
    seed_gcm, seed_cbc = os.urandom(32), os.urandom(32)
    from_gcm = gcm.encrypt(seed_gcm, "u")
    from_cbc = cbc.encrypt(seed_cbc, "u")
    assert from_gcm.key_id != from_cbc.key_id
    # each deployment reads what the other wrote: the blob names its mechanism and keys
    assert cbc.decrypt(from_gcm.ciphertext, from_gcm.key_id, {}, "u") == seed_gcm
    assert gcm.decrypt(from_cbc.ciphertext, from_cbc.key_id, {}, "u") == seed_cbc


def test_rotating_the_hmac_key_changes_key_id_and_keeps_old_data(hsm: SoftHsm, cbc: Pkcs11Provider) -> None:
    seed = os.urandom(32)
    old = cbc.encrypt(seed, "u")
    hsm.keygen("mac-2", "GENERIC:32")
    rotated = _provider(hsm, mechanism="aes-cbc-hmac", hmac_key_label="mac-2")
    rotated.check()
    assert rotated.key_id() != old.key_id and "+mac-2:" in rotated.key_id()
    assert rotated.decrypt(old.ciphertext, old.key_id, {}, "u") == seed
    rotated.close()


def test_invalidated_session_is_replaced_without_restart(gcm: Pkcs11Provider, caplog: pytest.LogCaptureFixture) -> None:
    seed = os.urandom(32)
    blob = gcm.encrypt(seed, "u")
    # Close every pooled session behind the pool's back: the token now answers CKR_SESSION_HANDLE_INVALID.
    with gcm._token.session(None) as sess:
        sess.raw.lib.C_CloseAllSessions(sess.conn.slot)
    assert gcm.decrypt(blob.ciphertext, blob.key_id, {}, "u") == seed
    assert [r.ckr for r in caplog.records if r.msg.startswith("token connection lost")] == [
        "CKR_SESSION_HANDLE_INVALID"
    ]
    assert gcm.encrypt(seed, "u").key_id == blob.key_id
    gcm.check()


def test_pool_serves_parallel_callers(hsm: SoftHsm) -> None:
    provider = _provider(hsm, pool_size=3)
    provider.check()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(200):
                seed = os.urandom(32)
                assert provider.decrypt(provider.encrypt(seed, "u").ciphertext, "", {}, "u") == seed
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    provider.close()
    assert errors == []


def test_exhausted_pool_fails_unavailable_within_the_deadline(hsm: SoftHsm) -> None:
    provider = _provider(hsm, pool_size=1, session_timeout="200ms")
    provider.check()
    with provider._token.session(None), pytest.raises(BackendUnavailable, match="no free PKCS#11 session"):
        provider.encrypt(b"k" * 32, "u")
    provider.close()


def test_duplicate_current_label_is_a_clear_error(hsm: SoftHsm) -> None:
    hsm.keygen("kek-1")
    provider = _provider(hsm)
    with pytest.raises(Exception, match="2 secret keys carry the label 'kek-1'"):
        provider.check()
    provider.close()


def test_the_current_kek_must_be_aes_256(hsm: SoftHsm) -> None:
    hsm.keygen("kek-128", "AES:16")
    provider = _provider(hsm, key_label="kek-128")
    with pytest.raises(Exception, match="'kek-128' is AES with 16 bytes; the KEK must be an AES-256 key"):
        provider.check()
    provider.close()


def test_parallel_calls_after_a_token_loss_reconnect_once(hsm: SoftHsm, caplog: pytest.LogCaptureFixture) -> None:
    import PyKCS11

    provider = _provider(hsm, pool_size=4, session_keys="never")  # with copies, calls do not notice the loss
    provider.check()
    aside = hsm.take_away()

    def call() -> None:
        with contextlib.suppress(BackendUnavailable, KeyNotFound):
            provider.encrypt(os.urandom(32), "u")

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    hsm.bring_back(aside)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="kleidi")
    errors: list[BaseException] = []

    def call_ok() -> None:
        for _ in range(20):
            try:
                seed = os.urandom(32)
                assert provider.decrypt(provider.encrypt(seed, "u").ciphertext, "", {}, "u") == seed
                return
            except BackendUnavailable:
                time.sleep(0.2)  # inside the reconnect backoff
        errors.append(AssertionError("never recovered"))

    threads = [threading.Thread(target=call_ok) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(r.msg == "token connected" for r in caplog.records) == 1
    assert PyKCS11.PyKCS11Lib._loaded_libs[hsm.module]["nb_users"] == 1  # no orphaned module instance
    provider.close()
    assert hsm.module not in PyKCS11.PyKCS11Lib._loaded_libs


def test_inline_only_while_a_session_is_free(hsm: SoftHsm) -> None:
    provider = _provider(hsm, pool_size=1)
    assert not provider.inline_safe  # not connected yet: connecting must not happen on the event loop
    provider.check()
    assert provider.inline_safe
    with provider._token.session(None):
        assert not provider.inline_safe
    other = _provider(hsm, inline_calls="never")
    other.check()
    assert not other.inline_safe
    provider.close()
    other.close()


def test_encrypt_keeps_the_published_kek_until_the_next_check(hsm: SoftHsm) -> None:
    provider = _provider(hsm)
    provider.check()
    published = provider.key_id()
    hsm.delete_key("kek-1")
    hsm.keygen("kek-1")  # a different key under the same label
    with provider._token.session(None) as sess:  # force a new connection, as a token hiccup would
        sess.raw.lib.C_CloseAllSessions(sess.conn.slot)
    # Status still says `published`: Encrypt must not answer with another key_id before the check says so
    with pytest.raises(KeyNotFound):
        provider.encrypt(os.urandom(32), "u")
    provider.check()
    assert provider.key_id() != published
    assert provider.encrypt(os.urandom(32), "u").key_id == provider.key_id()
    provider.close()


def test_a_closed_provider_never_reconnects(hsm: SoftHsm) -> None:
    provider = _provider(hsm)
    provider.check()
    provider.close()
    with pytest.raises(BackendUnavailable, match="shutting down"):
        provider.encrypt(os.urandom(32), "u")


def test_direct_calls_bind_only_the_module_pkcs11_loaded(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not loaded"):
        Direct(str(tmp_path / "libnot-loaded.so"))


def test_gcm_blobs_from_the_direct_path_open_with_pykcs11(gcm: Pkcs11Provider, hsm: SoftHsm) -> None:
    """The ctypes GCM call and PyKCS11's own AES_GCM_Mechanism produce and accept the same bytes."""
    seed = os.urandom(32)
    blob = parse(gcm.encrypt(seed, "u").ciphertext)
    lib = PyKCS11.PyKCS11Lib().load(hsm.module)
    slot = next(s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).label.strip() == hsm.label)
    session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION)  # the provider's module: logged in already
    key = session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY), (PyKCS11.CKA_LABEL, "kek-1")])[0]
    mechanism = PyKCS11.AES_GCM_Mechanism(blob.iv, blob.ref.header(), 128)
    assert bytes(session.decrypt(key, blob.ciphertext, mechanism)) == seed
    iv = os.urandom(12)
    theirs = bytes(session.encrypt(key, seed, PyKCS11.AES_GCM_Mechanism(iv, blob.ref.header(), 128)))
    mine = blob.ref.header() + iv + theirs
    assert gcm.decrypt(mine, blob.ref.key_id, {}, "u") == seed
    session.closeSession()


def test_session_copy_of_a_deleted_kek_is_dropped_at_the_next_check(hsm: SoftHsm) -> None:
    """SoftHSM2 (session_keys auto): requests use a session copy of the KEK, so a key deleted from the token
    keeps working until the next health check, which notices and drops the copy."""
    provider = _provider(hsm)
    try:
        provider.check()
        seed = os.urandom(32)
        wrapped = provider.encrypt(seed, "u")
        hsm.delete_key("kek-1")
        assert provider.decrypt(wrapped.ciphertext, wrapped.key_id, {}, "u") == seed
        with pytest.raises(KeyNotFound):
            provider.check()
        with pytest.raises(KeyNotFound):
            provider.decrypt(wrapped.ciphertext, wrapped.key_id, {}, "u")
        with pytest.raises(KeyNotFound):
            provider.encrypt(seed, "u")
    finally:
        provider.close()


def test_without_session_copies_a_deleted_kek_fails_at_once(hsm: SoftHsm) -> None:
    provider = _provider(hsm, session_keys="never")
    try:
        provider.check()
        seed = os.urandom(32)
        wrapped = provider.encrypt(seed, "u")
        hsm.delete_key("kek-1")
        with pytest.raises((KeyNotFound, BackendUnavailable)):
            provider.decrypt(wrapped.ciphertext, wrapped.key_id, {}, "u")
    finally:
        provider.close()


def test_health_checks_reuse_the_session_copy(hsm: SoftHsm, gcm: Pkcs11Provider) -> None:
    """One copy per KEK and connection, not one per health check."""
    seed = os.urandom(32)
    first = gcm.encrypt(seed, "u")
    for _ in range(5):
        gcm.check()
    with gcm._token.session(None) as sess:
        copies = sess.raw.findObjects([(PyKCS11.CKA_TOKEN, False), (PyKCS11.CKA_LABEL, "kek-1")])
    assert len(copies) == 1
    assert gcm.decrypt(first.ciphertext, first.key_id, {}, "u") == seed


def test_encrypt_stops_using_a_copy_whose_key_is_gone(hsm: SoftHsm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Encrypt checks the original behind its session copy (at most once a second): new data is not wrapped
    for long under a key that the token no longer has."""
    from kleidi.providers import pkcs11

    provider = _provider(hsm)
    try:
        provider.check()
        provider.encrypt(os.urandom(32), "u")
        hsm.delete_key("kek-1")
        provider.encrypt(os.urandom(32), "u")  # within the second: the copy still answers
        monkeypatch.setattr(pkcs11, "_VERIFY_EVERY", 0.0)
        with pytest.raises(KeyNotFound):
            provider.encrypt(os.urandom(32), "u")
    finally:
        provider.close()


def test_direct_call_retries_once_with_the_size_the_token_asks_for() -> None:
    """A token may answer CKR_BUFFER_TOO_SMALL with the room it wants; the operation is still active then."""
    import ctypes

    from kleidi.providers.pkcs11_direct import _call

    sizes: list[int] = []

    def init(session: int, mechanism: object, key: int) -> int:
        return 0

    def run(session: int, data: bytes, size: int, out: ctypes.Array[ctypes.c_char], length: object) -> int:
        holder = length._obj  # type: ignore[attr-defined]  # ctypes.byref keeps the object it points to
        sizes.append(len(out))
        if len(out) < 64:
            holder.value = 64
            return PyKCS11.CKR_BUFFER_TOO_SMALL
        ctypes.memmove(out, data[::-1], len(data))
        holder.value = len(data)
        return 0

    assert _call(init, run, 1, ctypes.c_int(0), 2, b"abc", 16) == b"cba"
    assert sizes == [16, 64]
