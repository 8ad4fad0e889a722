"""KEKs on a PKCS#11 token (SoftHSM2, a hardware HSM, a TPM2 through tpm2-pkcs11).

aes-gcm wraps with CKM_AES_GCM (random 96-bit IV, 128-bit tag, the blob header as associated data).
aes-cbc-hmac is for tokens without GCM, such as a TPM: AES-CBC with a random IV, then
CKM_SHA256_HMAC over header, IV and ciphertext, verified before anything is decrypted.
Both run on the token; kleidi never sees key material. See pkcs11_blob for the format."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import PyKCS11

from kleidi.config import Pkcs11Config
from kleidi.errors import (
    BackendUnavailable,
    ConfigError,
    IntegrityError,
    InvalidInput,
    KeyNotFound,
    KleidiError,
    WouldBlock,
)
from kleidi.observability import Metrics
from kleidi.providers.base import INLINE, Wrapped, reject_annotations
from kleidi.providers.pkcs11_blob import (
    AES_BLOCK,
    CBC_IV_BYTES,
    FINGERPRINT_BYTES,
    GCM_IV_BYTES,
    GCM_TAG_BYTES,
    Blob,
    KeyRef,
    Mechanism,
    parse,
)
from kleidi.providers.pkcs11_token import LOST, PIN_REJECTED, Session, Token, ckr_name

log = logging.getLogger("kleidi.pkcs11")

T = TypeVar("T")

_TAG_MISMATCH = frozenset(
    {
        PyKCS11.CKR_ENCRYPTED_DATA_INVALID,
        PyKCS11.CKR_ENCRYPTED_DATA_LEN_RANGE,
        PyKCS11.CKR_GENERAL_ERROR,
        PyKCS11.CKR_FUNCTION_FAILED,
        PyKCS11.CKR_DATA_INVALID,
        PyKCS11.CKR_DATA_LEN_RANGE,
    }
)
_ZERO_BLOCK = bytes(AES_BLOCK)
_KCV_MESSAGE = b"kleidi key check value"


class _Kek:
    """Object handles of one KEK on the current connection, with its reference and prebuilt header."""

    __slots__ = ("aes", "aes_handle", "conn", "copy", "header", "key_id", "mac", "mac_handle", "ref", "verified")

    def __init__(self, ref: KeyRef, conn: object, aes: Any, mac: Any, copy: int | None) -> None:
        self.ref = ref
        self.conn = conn
        self.aes = aes
        self.copy = copy  # a session copy of ``aes`` (pkcs11.session_keys), or None
        self.aes_handle: int = aes.value() if copy is None else copy  # what the direct calls use
        self.mac = mac
        self.mac_handle: int = mac.value() if mac is not None else 0
        self.verified = time.monotonic()  # when the token object behind ``copy`` was last seen
        self.header = ref.header()  # also the GCM associated data
        self.key_id = ref.key_id


_TAG_BITS = GCM_TAG_BYTES * 8
# How long Encrypt may wrap with a session copy before it checks again that the token still has the key.
_VERIFY_EVERY = 1.0


def _kcv(sess: Session, mechanism: Mechanism, aes: Any, mac: Any) -> bytes:
    """A fingerprint computed by the key itself on the token (like a classic key check value), so it is
    the same on every restart and every copy of the key, and different for different key material."""
    if mechanism == "aes-gcm":
        check = sess.direct.gcm_encrypt(sess.handle, aes.value(), bytes(GCM_IV_BYTES), b"", _TAG_BITS, _ZERO_BLOCK)
    else:
        check = _cbc(sess, aes.value(), _ZERO_BLOCK, bytes(CBC_IV_BYTES), encrypt=True)
        check += sess.direct.hmac_sha256(sess.handle, mac.value(), _KCV_MESSAGE)
    return hashlib.sha256(b"kleidi-kcv-v1" + check).digest()[:FINGERPRINT_BYTES]


def _key_answers(sess: Session, kek: _Kek) -> bool:
    """Whether the token still encrypts with this KEK: tells a failed tag check from a failed device."""
    try:
        sess.direct.gcm_encrypt(sess.handle, kek.aes_handle, bytes(GCM_IV_BYTES), b"", _TAG_BITS, _ZERO_BLOCK)
    except PyKCS11.PyKCS11Error:
        return False
    return True


def _pad(data: bytes) -> bytes:
    size = AES_BLOCK - len(data) % AES_BLOCK
    return data + bytes((size,)) * size


def _unpad(data: bytes) -> bytes:
    # Reached only after the MAC verified, so a bad pad is corruption on the token side, not an oracle.
    size = data[-1] if data else 0
    if not 0 < size <= AES_BLOCK or data[-size:] != bytes((size,)) * size:
        raise IntegrityError("ciphertext failed authentication: bad padding after a valid MAC")
    return data[:-size]


def _cbc(sess: Session, key: int, data: bytes, iv: bytes, *, encrypt: bool) -> bytes:
    """Raw CKM_AES_CBC on whole blocks, padding done here: tpm2-pkcs11's CKM_AES_CBC_PAD returns wrong
    results, and its CKM_AES_CBC answers unaligned input with an empty output and CKR_OK. The bytes
    are the same as CKM_AES_CBC_PAD's."""
    out = sess.direct.cbc(sess.handle, key, iv, data, encrypt=encrypt)
    if len(out) != len(data):
        raise BackendUnavailable(f"token returned {len(out)} bytes for a {len(data)}-byte AES-CBC operation")
    return out


def _touch_original(sess: Session, kek: _Kek) -> None:
    """Read an attribute of the token object behind a session copy. Once that object is gone this raises
    CKR_OBJECT_HANDLE_INVALID, which rebuilds the connection as any lost handle does."""
    sess.raw.getAttributeValue(kek.aes, [PyKCS11.CKA_CLASS])


def _find(raw: Any, label: str) -> list[Any]:
    """Secret keys stored on the token with this label (never session objects, such as kleidi's own copies)."""
    template = [(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY), (PyKCS11.CKA_TOKEN, True), (PyKCS11.CKA_LABEL, label)]
    return list(raw.findObjects(template))


class Pkcs11Provider:
    """The Provider for PKCS#11 tokens."""

    name = "pkcs11"

    def __init__(self, cfg: Pkcs11Config, metrics: Metrics) -> None:
        self._cfg = cfg
        self._inline_allowed = cfg.tuned(cfg.inline_calls)
        self._token = Token(cfg)
        self._mechanism: Mechanism = cfg.mechanism
        self._labels: tuple[str, ...] = (cfg.key_label,) + ((cfg.hmac_key_label,) if cfg.hmac_key_label else ())
        self._current: _Kek | None = None
        # The KEK the last health check published: new data is wrapped under it, whatever the labels say now.
        self._current_ref: KeyRef | None = None
        self._key_id = ""
        # KEKs found for decryption. Handles belong to one connection; an entry from an older one is looked up again.
        self._keks: dict[KeyRef, _Kek] = {}
        self._kek_lock = threading.Lock()
        self._time = {op: metrics.backend_seconds.labels(self.name, op) for op in ("encrypt", "decrypt", "check")}
        self._errors = metrics.backend_errors

    # --- Provider -------------------------------------------------------------------------------------------

    def key_id(self) -> str:
        return self._key_id

    def encrypt(self, plaintext: bytes, uid: str, deadline: float | None = None) -> Wrapped:
        def op(sess: Session) -> Wrapped:
            kek = self._current_kek(sess)
            if kek.copy is not None:
                now = time.monotonic()
                if now - kek.verified > _VERIFY_EVERY:
                    # New data must not be wrapped for long under a key that is gone from the token: that data
                    # could never be read again.
                    _touch_original(sess, kek)
                    kek.verified = now
            return self._wrap(sess, kek, plaintext)

        return self._run("encrypt", deadline, op)

    def decrypt(
        self,
        ciphertext: bytes,
        key_id: str,
        annotations: Mapping[str, bytes],
        uid: str,
        deadline: float | None = None,
    ) -> bytes:
        reject_annotations(annotations, self.name)
        blob = parse(ciphertext)
        if key_id and key_id != blob.ref.key_id:
            raise InvalidInput("key_id does not match the key reference inside the ciphertext")

        def op(sess: Session) -> bytes:
            kek = self._kek_for(sess, blob.ref)
            return self._unwrap(sess, kek, blob)

        return self._run("decrypt", deadline, op)

    def check(self) -> None:
        """Find the KEK that the labels name now (it may have been replaced), do a real round trip with it,
        and only then make it current: Status (published right after) and Encrypt switch together."""
        deadline = time.monotonic() + self._cfg.check_timeout
        probe = os.urandom(32)

        def round_trip(sess: Session) -> _Kek:
            self._verify_copies(sess)
            kek = self._resolve_by_label(sess)
            blob = parse(self._wrap(sess, kek, probe).ciphertext)
            if not hmac.compare_digest(self._unwrap(sess, kek, blob), probe):
                raise IntegrityError("health round trip returned a different plaintext")
            return kek

        kek = self._run("check", deadline, round_trip)
        if kek.key_id != self._key_id:
            log.info("current KEK", extra={"key_id": kek.key_id, "previous": self._key_id or "none"})
        self._current, self._current_ref, self._key_id = kek, kek.ref, kek.key_id

    @property
    def inline_safe(self) -> bool:
        """Only a local software token, and only while a session is free on a live connection: a call that
        would wait for a session or reconnect goes to the worker pool instead."""
        return self._inline_allowed and self._token.ready()

    def close(self) -> None:
        self._token.close()

    # --- internals ------------------------------------------------------------------------------------------

    def _run(self, operation: str, deadline: float | None, op: Callable[[Session], T]) -> T:
        """Run ``op`` on a pooled session; retry once on a fresh connection if the token connection was lost."""
        started = time.perf_counter()
        inline = INLINE.get()
        try:
            for attempt in (1, 2):
                try:
                    with self._token.session(deadline, nowait=inline) as sess:
                        return op(sess)
                except PyKCS11.PyKCS11Error as exc:
                    if exc.value in LOST and attempt == 1 and (deadline is None or time.monotonic() < deadline):
                        if inline:  # reconnecting is slow: not on the event loop, a worker does it
                            raise WouldBlock("token connection lost") from None
                        continue
                    raise self._translate(exc, operation) from None
            raise AssertionError("unreachable")
        except WouldBlock:
            raise  # not a failure: the server retries the call on a worker
        except KleidiError as exc:
            self._errors.labels(self.name, operation, exc.kind).inc()
            raise
        finally:
            self._time[operation].observe(time.perf_counter() - started)

    def _translate(self, exc: PyKCS11.PyKCS11Error, operation: str) -> KleidiError:
        name = ckr_name(exc)
        if exc.value in PIN_REJECTED:
            return BackendUnavailable(f"token refused the PIN during {operation} ({name})")
        if exc.value in LOST:
            return BackendUnavailable(f"token {self._cfg.token_label!r} unavailable during {operation} ({name})")
        if exc.value in (
            PyKCS11.CKR_MECHANISM_INVALID,
            PyKCS11.CKR_KEY_TYPE_INCONSISTENT,
            PyKCS11.CKR_KEY_FUNCTION_NOT_PERMITTED,
            PyKCS11.CKR_MECHANISM_PARAM_INVALID,
        ):
            return ConfigError(f"the token cannot {operation} with mechanism {self._mechanism} on this key ({name})")
        return BackendUnavailable(f"token {operation} failed ({name})")

    def _current_kek(self, sess: Session) -> _Kek:
        """The KEK that the last health check published (so Encrypt's key_id is Status' key_id), found again
        on a new connection by its reference; before the first check, the one the labels name."""
        current = self._current
        if current is not None and current.conn is sess.conn:
            return current
        ref = self._current_ref
        kek = self._kek_for(sess, ref) if ref is not None else self._resolve_by_label(sess)
        self._current = kek
        return kek

    def _resolve_by_label(self, sess: Session) -> _Kek:
        """The KEK that ``key_label`` (and ``hmac_key_label``) name now; its labels must be unique."""
        handles = []
        for label in self._labels:
            found = _find(sess.raw, label)
            if not found:
                raise KeyNotFound(f"no secret key labelled {label!r} on token {self._cfg.token_label!r}")
            if len(found) > 1:
                raise ConfigError(
                    f"{len(found)} secret keys carry the label {label!r}; the current KEK's label must be unique "
                    "(give a new KEK a new label and point key_label at it)"
                )
            handles.append(found[0])
        aes, mac = handles[0], handles[1] if len(handles) > 1 else None
        self._require_aes256(sess, aes)
        ref = KeyRef(self._mechanism, self._labels, self._fingerprint(sess, aes, mac))
        return self._kek(sess, ref, aes, mac)

    def _kek(self, sess: Session, ref: KeyRef, aes: Any, mac: Any) -> _Kek:
        """The entry for a KEK found on the token, with a session copy of its AES key where
        pkcs11.session_keys asks for one. An entry with a copy is kept (not copied again at every health
        check); _verify_copies notices when the token object is gone."""
        with self._kek_lock:  # callers racing to the same new KEK make one copy, not one each
            known = self._keks.get(ref)
            if known is not None and known.conn is sess.conn and known.copy is not None:
                return known
            kek = self._keks[ref] = _Kek(ref, sess.conn, aes, mac, sess.conn.session_copy(aes.value()))
            return kek

    def _verify_copies(self, sess: Session) -> None:
        """A session copy works on after its token object is gone (deleted, or the token removed): touch every
        original, so the connection is rebuilt, the copies die with it and the KEKs are looked up again."""
        for kek in list(self._keks.values()):
            if kek.copy is not None and kek.conn is sess.conn:
                _touch_original(sess, kek)

    def _wrap(self, sess: Session, kek: _Kek, plaintext: bytes) -> Wrapped:
        if kek.ref.mechanism == "aes-gcm":
            iv = os.urandom(GCM_IV_BYTES)
            body = sess.direct.gcm_encrypt(sess.handle, kek.aes_handle, iv, kek.header, _TAG_BITS, plaintext)
            return Wrapped(kek.header + iv + body, kek.key_id)
        iv = os.urandom(CBC_IV_BYTES)
        body = _cbc(sess, kek.aes_handle, _pad(plaintext), iv, encrypt=True)
        signed = kek.header + iv + body
        return Wrapped(signed + sess.direct.hmac_sha256(sess.handle, kek.mac_handle, signed), kek.key_id)

    def _require_aes256(self, sess: Session, aes: Any) -> None:
        """New data is wrapped only under AES-256; an older, weaker key may still decrypt what it wrote."""
        key_type, size = sess.raw.getAttributeValue(aes, [PyKCS11.CKA_KEY_TYPE, PyKCS11.CKA_VALUE_LEN])
        if key_type != PyKCS11.CKK_AES or size != 32:
            kind = "AES" if key_type == PyKCS11.CKK_AES else str(PyKCS11.CKK.get(key_type, key_type))
            raise ConfigError(
                f"key {self._labels[0]!r} is {kind} with {size or '?'} bytes; the KEK must be an AES-256 key"
            )

    def _fingerprint(self, sess: Session, aes: Any, mac: Any) -> bytes:
        try:
            return _kcv(sess, self._mechanism, aes, mac)
        except PyKCS11.PyKCS11Error as exc:
            if exc.value in LOST:
                raise
            raise ConfigError(
                f"key {self._labels[0]!r} cannot be used with mechanism {self._mechanism} ({ckr_name(exc)})"
            ) from None

    def _kek_for(self, sess: Session, ref: KeyRef) -> _Kek:
        """The KEK a blob names: by label, then by fingerprint, so a reused label never matches wrongly."""
        kek = self._keks.get(ref)
        if kek is not None and kek.conn is sess.conn:
            return kek
        candidates = [_find(sess.raw, label) for label in ref.labels]
        macs = candidates[1] if len(candidates) > 1 else [None]
        for aes in candidates[0]:
            for mac in macs:
                try:
                    fingerprint = _kcv(sess, ref.mechanism, aes, mac)
                except PyKCS11.PyKCS11Error as exc:
                    if exc.value in LOST:
                        raise
                    continue  # a key with that label that cannot do this mechanism is not the one
                if hmac.compare_digest(fingerprint, ref.fingerprint):
                    return self._kek(sess, ref, aes, mac)
        raise KeyNotFound(f"the KEK that wrapped this data ({ref.key_id}) is not on token {self._cfg.token_label!r}")

    def _unwrap(self, sess: Session, kek: _Kek, blob: Blob) -> bytes:
        if blob.ref.mechanism == "aes-gcm":
            try:
                return sess.direct.gcm_decrypt(
                    sess.handle, kek.aes_handle, blob.iv, kek.header, _TAG_BITS, blob.ciphertext
                )
            except PyKCS11.PyKCS11Error as exc:
                # A failed tag check: SoftHSM says CKR_GENERAL_ERROR, the standard says ENCRYPTED_DATA_INVALID.
                # CKR_GENERAL_ERROR is also what a failing device says: the key is asked to encrypt once more,
                # and only if it still can was it the data. Otherwise the connection is rebuilt (UNAVAILABLE).
                if exc.value not in _TAG_MISMATCH or (exc.value in LOST and not _key_answers(sess, kek)):
                    raise
                raise IntegrityError("ciphertext failed authentication: tampered, corrupted or truncated") from None
        # Encrypt-then-MAC: the MAC is checked before the token decrypts anything; token errors here are
        # token failures, not tampering.
        expected = sess.direct.hmac_sha256(sess.handle, kek.mac_handle, blob.header + blob.iv + blob.ciphertext)
        if not hmac.compare_digest(expected, blob.mac):
            raise IntegrityError("ciphertext failed authentication (MAC mismatch): tampered or corrupted")
        return _unpad(_cbc(sess, kek.aes_handle, blob.ciphertext, blob.iv, encrypt=False))
