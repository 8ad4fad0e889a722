"""Vault/OpenBao login and token lifecycle: log in, renew before expiry, log in again at max TTL or on refusal."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kleidi.config import VaultConfig, read_secret
from kleidi.errors import AuthFailed, BackendUnavailable, ConfigError, KleidiError
from kleidi.observability import Metrics
from kleidi.providers.vault_http import VaultHttp

log = logging.getLogger("kleidi.vault")

DEFAULT_MOUNTS = {"approle": "approle", "kubernetes": "kubernetes", "jwt": "jwt", "cert": "cert"}

# At most one login a second because Vault refused a token, whatever the request rate.
_REFUSAL_LOGIN_GAP = 1.0
# After a failed login, further attempts wait 0.5 s doubling up to this (requests fail fast meanwhile).
_LOGIN_BACKOFF_MAX = 5.0
# Renew when this share of the token's TTL has passed.
_RENEW_AT = 2 / 3
# Never schedule token maintenance sooner than this, whatever the TTL.
_MIN_MAINTENANCE_DELAY = 0.5
# After a failed renewal, try again after at most this long.
_RETRY_MAINTENANCE = 5.0


@dataclass(frozen=True, slots=True)
class VaultToken:
    """A token and what kleidi knows about it. ``ttl`` 0 means it never expires (a root token)."""

    value: str = field(default="", repr=False)
    generation: int = 0
    ttl: float = 0.0
    renewable: bool = False
    # time.monotonic() instants
    issued_at: float = 0.0
    expires_at: float = float("inf")
    # The TTL the login granted; a renewal that grants less has hit the max TTL.
    login_ttl: float = 0.0

    def __repr__(self) -> str:
        return f"VaultToken(generation={self.generation}, ttl={self.ttl}, renewable={self.renewable})"

    def expired(self, now: float) -> bool:
        return now >= self.expires_at


class VaultAuth:
    """Owns kleidi's Vault token.

    ``current`` returns a usable token, logging in first when there is none, it expired or Vault refused it
    (one login at a time; concurrent callers wait for it). A background thread renews renewable tokens at two
    thirds of their TTL and logs in again before the max TTL ends. Credentials are re-read from their files at
    every login, so rotated files are picked up. Failures never stop the thread: requests fail with
    AuthFailed/BackendUnavailable until a login works again."""

    def __init__(self, config: VaultConfig, http: VaultHttp, metrics: Metrics) -> None:
        self._config = config
        self._auth = config.auth
        self._http = http
        self._metrics = metrics
        self._method = config.auth.method
        self._mount = (config.auth.mount or DEFAULT_MOUNTS.get(self._method, "")).strip("/")
        self._lock = threading.Lock()
        self._token: VaultToken | None = None
        self._stale = False
        self._generation = 0
        self._failure: KleidiError | None = None
        self._failures = 0
        self._retry_login_at = 0.0
        self._last_refusal_login = float("-inf")
        # (monotonic instant, "renew" | "login") of the next maintenance step, or None.
        self._plan: tuple[float, str] | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._maintain, name="kleidi-vault-token", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop maintenance and revoke a token kleidi obtained by logging in (never a configured token)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        token = self._token
        if token is not None and self._method != "token":
            with contextlib.suppress(KleidiError):
                self._http.send("POST", "auth/token/revoke-self", "revoke", token.value, None, 1.0)
        self._token = None

    def ttl_left(self) -> float | None:
        """Seconds left on the current token; None if there is none, inf if it never expires."""
        token = self._token
        if token is None:
            return None
        return max(0.0, token.expires_at - time.monotonic())

    def peek(self) -> VaultToken | None:
        """The current token if it is valid now, without ever waiting for a login."""
        token = self._token
        if token is not None and not self._stale and not token.expired(time.monotonic()):
            return token
        return None

    def current(self, deadline: float) -> VaultToken:
        token = self.peek()
        if token is not None:
            return token
        with self._lock:
            token = self.peek()  # another caller may have logged in while this one waited for the lock
            return token if token is not None else self._login_locked(deadline)

    def refused(self, token: Any) -> bool:
        """Vault refused ``token`` (401/403). True if a new login is worth trying before giving up.

        A token that still passes lookup-self is alive, so the refusal is its policy's and logging in again would
        not help. A dead one (revoked, expired) is replaced, at most once a second whatever the request rate."""
        if not isinstance(token, VaultToken):
            return False
        if token.generation != self._generation:
            return True  # another caller already logged in again
        try:
            reply = self._http.send("GET", "auth/token/lookup-self", "lookup", token.value, None, self._config.timeout)
        except BackendUnavailable:
            return False
        if reply.status == 200:
            return False
        with self._lock:
            if token.generation != self._generation:
                return True
            now = time.monotonic()
            if now - self._last_refusal_login < _REFUSAL_LOGIN_GAP:
                return False
            self._last_refusal_login = now
            self._stale = True
        log.info("vault refused the token (revoked or expired); logging in again", extra={"method": self._method})
        return True

    # --- login ---------------------------------------------------------------------------------------------

    def _login_locked(self, deadline: float) -> VaultToken:
        now = time.monotonic()
        if self._failure is not None and now < self._retry_login_at:
            raise self._failure
        try:
            token = self._login(deadline)
        except KleidiError as exc:
            self._failures += 1
            self._failure = exc
            self._retry_login_at = time.monotonic() + min(0.5 * 2 ** (self._failures - 1), _LOGIN_BACKOFF_MAX)
            self._metrics.vault_logins.labels(self._method, "error").inc()
            log.warning("vault login failed", extra={"method": self._method, "reason": str(exc)})
            raise
        self._failures = 0
        self._failure = None
        self._generation += 1
        token = replace(token, generation=self._generation)
        self._token = token
        self._stale = False
        self._metrics.vault_logins.labels(self._method, "ok").inc()
        self._metrics.vault_token_ttl.set(token.ttl)
        self._schedule_after_login(token)
        log.info(
            "vault login",
            extra={"method": self._method, "mount": self._mount, "ttl": token.ttl, "renewable": token.renewable},
        )
        return token

    def _login(self, deadline: float) -> VaultToken:
        if self._method == "token":
            return self._use_configured_token(deadline)
        payload = self._login_payload()
        reply = self._http.call("POST", f"auth/{self._mount}/login", "login", payload, deadline)
        if reply.status in (400, 401, 403):
            raise AuthFailed(f"{self._method} login at auth/{self._mount} refused: {self._http.reason(reply)}")
        if reply.status != 200:
            raise BackendUnavailable(
                f"{self._method} login at auth/{self._mount} failed: HTTP {reply.status}: {self._http.reason(reply)}"
            )
        auth = reply.body.get("auth")
        if not isinstance(auth, dict) or not isinstance(auth.get("client_token"), str):
            raise BackendUnavailable(f"{self._method} login at auth/{self._mount} answered without a token")
        value: str = auth["client_token"]
        self._http.redactor.add(value)
        ttl = float(auth.get("lease_duration") or 0)
        return self._token_from(value, ttl, bool(auth.get("renewable")))

    def _use_configured_token(self, deadline: float) -> VaultToken:
        value = self._secret(self._auth.token_file, self._auth.token_env, "vault token")
        where = f"token_file {self._auth.token_file}" if self._auth.token_file else f"${self._auth.token_env}"
        if not value.isprintable() or any(c.isspace() for c in value):
            # It goes into an HTTP header: a line break there would write headers of its own.
            raise AuthFailed(f"the token from {where} holds spaces or control characters; a Vault token has none")
        reply = self._http.call("GET", "auth/token/lookup-self", "lookup", None, deadline, auth=_Fixed(value))
        if reply.status in (401, 403):
            raise AuthFailed(f"the token from {where} is invalid, expired or revoked (lookup-self refused)")
        if reply.status != 200:
            raise BackendUnavailable(f"token lookup failed: HTTP {reply.status}: {self._http.reason(reply)}")
        data = reply.data()
        return self._token_from(value, float(data.get("ttl") or 0), bool(data.get("renewable")))

    def _login_payload(self) -> dict[str, Any]:
        auth = self._auth
        if self._method == "approle":
            return {
                "role_id": self._secret(auth.role_id_file, None, "vault approle role_id"),
                "secret_id": self._secret(auth.secret_id_file, None, "vault approle secret_id"),
            }
        if self._method in ("kubernetes", "jwt"):
            return {"role": auth.role, "jwt": self._secret(auth.jwt_file, None, f"vault {self._method} jwt")}
        if self._method == "cert":
            for path in (auth.client_cert, auth.client_key):
                if path and not Path(path).is_file():
                    raise AuthFailed(f"vault cert login: cannot read {path}")
            self._http.reload_tls()  # the certificate may have been renewed on disk since the last login
            return {"name": auth.role} if auth.role else {}
        raise AssertionError(f"unknown auth method {self._method}")

    def _secret(self, file_path: str | None, env_name: str | None, what: str) -> str:
        """A credential, re-read at every login. A missing file is an auth failure: it may come back rotated."""
        try:
            value = read_secret(file_path, env_name, what)
        except ConfigError as exc:
            raise AuthFailed(str(exc)) from None
        self._http.redactor.add(value)
        return value

    def _token_from(self, value: str, ttl: float, renewable: bool) -> VaultToken:
        now = time.monotonic()
        return VaultToken(
            value=value,
            ttl=ttl,
            renewable=renewable,
            issued_at=now,
            expires_at=now + ttl if ttl > 0 else float("inf"),
            login_ttl=ttl,
        )

    # --- maintenance ---------------------------------------------------------------------------------------

    def _schedule_after_login(self, token: VaultToken) -> None:
        if token.ttl <= 0:
            self._plan = None
        else:
            step = "renew" if token.renewable else "login"
            self._plan = (token.issued_at + max(_MIN_MAINTENANCE_DELAY, token.ttl * _RENEW_AT), step)
        self._wake.set()

    def _maintain(self) -> None:
        while not self._stop.is_set():
            plan = self._plan
            timeout = None if plan is None else max(0.0, plan[0] - time.monotonic())
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                return
            plan = self._plan
            if plan is None or time.monotonic() < plan[0]:
                continue
            try:
                if plan[1] == "renew":
                    self._renew()
                else:
                    with self._lock:  # the current token keeps serving requests until the new one is in
                        self._login_locked(time.monotonic() + self._config.timeout)
            except KleidiError as exc:
                left = self.ttl_left()
                delay = _RETRY_MAINTENANCE if left is None else min(_RETRY_MAINTENANCE, max(left / 4, 0.0))
                self._plan = (time.monotonic() + max(_MIN_MAINTENANCE_DELAY, delay), plan[1])
                log.warning("vault token maintenance failed", extra={"step": plan[1], "reason": str(exc)})
            except Exception:  # the thread must survive anything
                self._plan = (time.monotonic() + _RETRY_MAINTENANCE, plan[1])
                log.error("vault token maintenance crashed", exc_info=True)

    def _renew(self) -> None:
        token = self._token
        if token is None:
            self._plan = None
            return
        deadline = time.monotonic() + self._config.timeout
        try:
            reply = self._http.send("POST", "auth/token/renew-self", "renew", token.value, {}, self._config.timeout)
        except BackendUnavailable:
            self._metrics.vault_renewals.labels("error").inc()
            raise
        if reply.status != 200:
            self._metrics.vault_renewals.labels("error").inc()
            if reply.status in (400, 401, 403):
                # Not renewable any more (revoked, expired, or the policy forbids renew-self): log in again.
                log.info("vault token renewal refused; logging in again", extra={"reason": self._http.reason(reply)})
                with self._lock:
                    self._stale = True
                    self._login_locked(deadline)
                return
            raise BackendUnavailable(f"token renewal failed: {self._http.transient_reason(reply)}")
        auth = reply.body.get("auth") or {}
        ttl = float(auth.get("lease_duration") or 0)
        now = time.monotonic()
        self._metrics.vault_renewals.labels("ok").inc()
        self._metrics.vault_token_ttl.set(ttl)
        with self._lock:
            if self._token is not None and self._token.generation == token.generation:
                self._token = replace(token, ttl=ttl, expires_at=now + ttl if ttl > 0 else float("inf"))
        if ttl <= 0:
            self._plan = None
        elif ttl < token.login_ttl:
            # Vault granted less than asked: the max TTL is near. Log in again well before it ends.
            self._plan = (now + max(_MIN_MAINTENANCE_DELAY, ttl / 2), "login")
            log.info("vault token near its max TTL; will log in again", extra={"ttl": ttl})
        else:
            self._plan = (now + max(_MIN_MAINTENANCE_DELAY, ttl * _RENEW_AT), "renew")
        log.debug("vault token renewed", extra={"ttl": ttl})


class _Fixed:
    """A token source for one known token (the lookup that validates a configured token)."""

    def __init__(self, value: str) -> None:
        self.token = VaultToken(value=value)

    def current(self, deadline: float) -> VaultToken:
        return self.token

    def refused(self, token: Any) -> bool:
        return False


__all__ = ["DEFAULT_MOUNTS", "VaultAuth", "VaultToken"]
