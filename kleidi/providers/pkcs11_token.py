"""One PKCS#11 token: the loaded module, the slot, the login and a pool of logged-in sessions.

When the token goes away (unplugged HSM, stopped TPM resource manager, SoftHSM store moved) every
session and object handle dies with it. The pool then throws the whole connection away and builds a
new one on the next use: unload the module, load it again, find the token by label, log in."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import PyKCS11

from kleidi.config import Pkcs11Config
from kleidi.errors import AuthFailed, BackendUnavailable, ConfigError, KleidiError, WouldBlock
from kleidi.providers.pkcs11_direct import Direct

log = logging.getLogger("kleidi.pkcs11")

# The token is gone or the session died with it: rebuild the connection.
LOST = frozenset(
    {
        PyKCS11.CKR_SESSION_HANDLE_INVALID,
        PyKCS11.CKR_SESSION_CLOSED,
        PyKCS11.CKR_TOKEN_NOT_PRESENT,
        PyKCS11.CKR_TOKEN_NOT_RECOGNIZED,
        PyKCS11.CKR_DEVICE_REMOVED,
        PyKCS11.CKR_DEVICE_ERROR,
        PyKCS11.CKR_DEVICE_MEMORY,
        PyKCS11.CKR_USER_NOT_LOGGED_IN,
        PyKCS11.CKR_CRYPTOKI_NOT_INITIALIZED,
        PyKCS11.CKR_OBJECT_HANDLE_INVALID,
        PyKCS11.CKR_KEY_HANDLE_INVALID,
        PyKCS11.CKR_GENERAL_ERROR,
        PyKCS11.CKR_SLOT_ID_INVALID,
    }
)
# The token refused the PIN. Retrying the same PIN counts down to a locked token: never do it.
PIN_REJECTED = frozenset(
    {
        PyKCS11.CKR_PIN_INCORRECT,
        PyKCS11.CKR_PIN_INVALID,
        PyKCS11.CKR_PIN_LEN_RANGE,
        PyKCS11.CKR_PIN_EXPIRED,
        PyKCS11.CKR_PIN_LOCKED,
    }
)
# After a failed connect, requests fail fast instead of reloading the module on every call.
_RECONNECT_BACKOFF = 1.0


def ckr_name(exc: PyKCS11.PyKCS11Error) -> str:
    return str(PyKCS11.CKR.get(exc.value, f"CKR_0x{exc.value:08X}"))


@dataclass(eq=False, slots=True)
class _Connection:
    lib: Any
    slot: int
    idle: list[Session]
    direct: Direct
    # Owns the session copies of keys (pkcs11.session_keys): never lent out, never replaced, so the copies
    # live exactly as long as the connection.
    keeper: Any = None
    borrowed: int = 0
    dead: bool = False
    keeper_lock: threading.Lock = field(default_factory=threading.Lock)
    copies_refused: bool = False

    def session_copy(self, key: int) -> int | None:
        """A session copy of token object ``key``; None when this connection keeps none, or when the token
        refused a copy once (a key without CKA_COPYABLE, a token without C_CopyObject): then not again."""
        with self.keeper_lock:  # one thread at a time per session, as PKCS#11 asks
            if self.keeper is None or self.copies_refused:
                return None
            try:
                return self.direct.session_copy(self.keeper.session.value(), key)
            except PyKCS11.PyKCS11Error as exc:
                if exc.value in LOST:
                    raise
                log.warning("token refused a session copy of a KEK; using token objects", extra={"ckr": ckr_name(exc)})
                self.copies_refused = True
                return None


class Session:
    """A logged-in session of the pool: ``raw`` is the PyKCS11 session, ``handle`` its number for the
    connection's ``direct`` calls (read once: the SWIG call costs more than a token call's bookkeeping)."""

    __slots__ = ("conn", "direct", "handle", "raw")

    def __init__(self, raw: Any, conn: _Connection) -> None:
        self.conn = conn
        self.direct = conn.direct
        self.replace(raw)

    def replace(self, raw: Any) -> None:
        self.raw = raw
        self.handle: int = raw.session.value()


class _Lease:
    """``with token.session(deadline) as sess``: a class rather than a generator, as it runs on every call."""

    __slots__ = ("_deadline", "_nowait", "_sess", "_token")

    def __init__(self, token: Token, deadline: float | None, nowait: bool) -> None:
        self._token = token
        self._deadline = deadline
        self._nowait = nowait

    def __enter__(self) -> Session:
        self._sess = self._token._checkout(self._deadline, self._nowait)
        return self._sess

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        lost = isinstance(exc, PyKCS11.PyKCS11Error) and exc.value in LOST
        if lost:
            log.warning("token connection lost; reconnecting on next use", extra={"ckr": ckr_name(exc)})
        self._token._checkin(self._sess, lost, dirty=exc is not None)


class Token:
    """The token named by ``token_label``, with ``pool_size`` logged-in sessions.

    A lost connection's module is unloaded only once every session borrowed from it is back: PyKCS11
    crashes the process if a session is used after its module is unloaded, and loading the module again
    while the old copy is still loaded would reuse it instead of rescanning the tokens."""

    def __init__(self, cfg: Pkcs11Config) -> None:
        self._cfg = cfg
        self._cond = threading.Condition()
        self._conn: _Connection | None = None
        self._dying: list[_Connection] = []
        self._connecting = False
        self._closed = False
        self._last_failure: KleidiError | None = None
        self._last_attempt = 0.0
        # The digest of a PIN the token refused: that PIN is never offered again, a new one is.
        self._rejected_pin: bytes | None = None

    def session(self, deadline: float | None, nowait: bool = False) -> _Lease:
        """Check out a logged-in session, connecting first if needed; waits for a free one until ``deadline``.

        A PKCS#11 error inside the block that means the token or session is gone throws the connection away."""
        return _Lease(self, deadline, nowait)

    def _checkout(self, deadline: float | None, nowait: bool = False) -> Session:
        """``nowait``: for a caller on the event loop, raise WouldBlock rather than wait or connect."""
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise BackendUnavailable("the request's deadline passed before a PKCS#11 session was free")
        wait = self._cfg.session_timeout if deadline is None else min(self._cfg.session_timeout, deadline - now)
        until = now + wait
        with self._cond:
            while True:
                if self._closed:
                    raise BackendUnavailable("kleidi is shutting down")
                conn = self._conn
                if conn is None:
                    if nowait:
                        raise WouldBlock("no live token connection")
                    try:
                        self._connect_locked(until)
                    except KleidiError as exc:
                        self._last_failure = exc
                        raise
                    continue
                if conn.idle:
                    conn.borrowed += 1
                    return conn.idle.pop()
                if nowait:
                    raise WouldBlock("no free session")
                left = until - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    raise BackendUnavailable(
                        f"no free PKCS#11 session within {wait:.2f}s (pool_size {self._cfg.pool_size}): "
                        "the token is overloaded or a call hangs"
                    )

    def ready(self) -> bool:
        """True when a session is free on a live connection right now, so a checkout will not wait."""
        conn = self._conn
        return conn is not None and bool(conn.idle) and not self._connecting and not self._closed

    def _checkin(self, sess: Session, lost: bool, dirty: bool) -> None:
        conn = sess.conn
        if dirty and not lost and not conn.dead:
            # Some tokens (tpm2-pkcs11) leave a failed operation active on the session, so every later call
            # on it fails with CKR_OPERATION_ACTIVE. A session that saw an error is replaced, not reused.
            try:
                fresh = conn.lib.openSession(conn.slot, PyKCS11.CKF_SERIAL_SESSION)
                with contextlib.suppress(PyKCS11.PyKCS11Error):
                    sess.raw.closeSession()
                sess.replace(fresh)
            except PyKCS11.PyKCS11Error as exc:
                log.warning("cannot replace a failed session; reconnecting", extra={"ckr": ckr_name(exc)})
                lost = True
        with self._cond:
            conn.borrowed -= 1
            if lost and conn is self._conn:
                self._retire_locked()
            if conn.dead:
                if conn.borrowed == 0:
                    self._unload_locked(conn)
            else:
                conn.idle.append(sess)
            self._cond.notify_all()

    def _connect_locked(self, until: float) -> None:
        """Open a connection; called with the lock held. The slow part (loading the module, C_Initialize,
        login) runs with the lock released, so checkins and other callers are not stuck behind it, and
        only one caller connects at a time: the others wait for its outcome."""
        while self._connecting:
            if not self._cond.wait(max(until - time.monotonic(), 0.0)):
                raise BackendUnavailable("timed out waiting for the token connection to be re-established")
        if self._conn is not None or self._closed:
            return
        now = time.monotonic()
        if self._last_failure is not None and now - self._last_attempt < _RECONNECT_BACKOFF:
            raise type(self._last_failure)(str(self._last_failure))
        # Calls still running on the lost connection must finish before its module can be unloaded.
        if not self._cond.wait_for(lambda: not self._dying, max(until - now, 0.0)):
            raise BackendUnavailable("token connection lost; waiting for in-flight calls before reconnecting")
        if self._conn is not None or self._connecting or self._closed:
            return  # someone else connected (or is connecting, or we closed) while we waited; the caller loops
        self._connecting = True
        self._last_attempt = time.monotonic()
        self._cond.release()
        try:
            conn = self._open()
        finally:  # whatever _open raised, the lock is held again before anything else is touched
            self._cond.acquire()
            self._connecting = False
            self._cond.notify_all()
        # Only a successful _open gets here; a failure left through the finally and _checkout records it.
        self._last_failure = None
        if self._closed:
            _unload(conn.lib)
        else:
            self._conn = conn

    def _open(self) -> _Connection:
        cfg = self._cfg
        pin = cfg.pin()
        digest = hashlib.sha256(pin.encode()).digest()
        if self._rejected_pin == digest:
            raise AuthFailed(
                f"token {cfg.token_label!r} refused this PIN before; not retrying it so the token does not lock. "
                "Fix the PIN file or environment; kleidi uses the new PIN on its next check"
            )
        lib = PyKCS11.PyKCS11Lib()
        try:
            lib.load(cfg.module)
        except PyKCS11.PyKCS11Error as exc:
            if exc.value == -1 or not os.path.isfile(cfg.module):  # dlopen failed: not a PKCS#11 module
                raise ConfigError(f"pkcs11.module: cannot load {cfg.module}") from None
            # C_Initialize failed: tpm2-pkcs11 does that while its resource manager is unreachable.
            raise BackendUnavailable(
                f"token unavailable: {cfg.module} failed to initialise ({ckr_name(exc)})"
            ) from None
        sessions: list[Any] = []
        try:
            slot, serial = self._find_slot(lib)
            first = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION)
            sessions.append(first)
            try:
                first.login(pin)
            except PyKCS11.PyKCS11Error as exc:
                if exc.value in PIN_REJECTED:
                    # A locked token refuses every PIN, the right one too, and a TPM's lockout ends by itself:
                    # trying again later cannot count against it, so only a refused PIN is remembered.
                    if exc.value == PyKCS11.CKR_PIN_LOCKED:
                        raise AuthFailed(
                            f"token {cfg.token_label!r} is locked (CKR_PIN_LOCKED): too many wrong PINs. kleidi "
                            "tries again at each health check; a TPM unlocks by itself, an HSM needs its SO"
                        ) from None
                    self._rejected_pin = digest
                    raise AuthFailed(
                        f"token {cfg.token_label!r} refused the PIN ({ckr_name(exc)}); not retrying it so the "
                        "token does not lock. Fix the PIN file or environment"
                    ) from None
                if exc.value != PyKCS11.CKR_USER_ALREADY_LOGGED_IN:
                    raise
            self._rejected_pin = None
            # A login is per application, not per session: the other sessions are logged in already.
            sessions.extend(lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION) for _ in range(cfg.pool_size - 1))
            direct = Direct(cfg.module)
            keeper = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION) if cfg.tuned(cfg.session_keys) else None
        except PyKCS11.PyKCS11Error as exc:
            _unload(lib)
            raise BackendUnavailable(f"token {cfg.token_label!r}: {ckr_name(exc)}") from None
        except KleidiError:
            _unload(lib)
            raise
        log.info("token connected", extra={"token": cfg.token_label, "serial": serial, "sessions": len(sessions)})
        conn = _Connection(lib, slot, [], direct, keeper)
        conn.idle.extend(Session(raw, conn) for raw in sessions)
        return conn

    def _find_slot(self, lib: Any) -> tuple[int, str]:
        label = self._cfg.token_label
        seen = []
        for slot in lib.getSlotList(tokenPresent=True):
            info = lib.getTokenInfo(slot)
            name = info.label.strip()
            if name == label:
                return slot, str(info.serialNumber).strip()
            seen.append(name)
        others = ", ".join(repr(s) for s in seen if s) or "none"
        raise BackendUnavailable(f"no token labelled {label!r} is present (tokens seen: {others})")

    def _retire_locked(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.dead = True
        conn.idle.clear()
        if conn.borrowed:
            self._dying.append(conn)
        else:
            self._unload_locked(conn)

    def _unload_locked(self, conn: _Connection) -> None:
        if conn in self._dying:
            self._dying.remove(conn)
        _unload(conn.lib)

    def close(self) -> None:
        """Release the token for good: later calls fail instead of connecting again."""
        with self._cond:
            self._closed = True
            self._retire_locked()
            self._cond.notify_all()


def _unload(lib: Any) -> None:
    # C_Finalize inside unload closes every session. No C_CloseAllSessions first: SoftHSM crashes the
    # process in it when its token store has disappeared, which is exactly when we get here.
    try:
        lib.unload()
    except PyKCS11.PyKCS11Error:
        log.debug("module unload failed", exc_info=True)
