"""One pooled HTTP session to Vault/OpenBao: single attempts with metrics, status classification, redaction."""

from __future__ import annotations

import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import hvac.adapters
import requests
import requests.adapters

from kleidi.config import VaultConfig
from kleidi.errors import BackendUnavailable
from kleidi.observability import Metrics

# Connections kept open to Vault. More than the gRPC worker pool would ever use at once.
_POOL_SIZE = 32

# Statuses worth another attempt: rate limited, Vault internal error, bad gateway, sealed/standby, gateway timeout.
TRANSIENT_STATUSES = frozenset({412, 429, 500, 502, 503, 504})

# Vault token shapes (hvs./hvb./hvr. and the legacy s./b./r.) and JWTs, for redaction of anything echoed back.
_TOKEN_SHAPES = re.compile(
    r"\b(?:hv[sbr]|[sbr])\.[A-Za-z0-9_-]{8,}[A-Za-z0-9._-]*|eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
)
_MAX_REASON = 200
# Backoff between attempts: 50 ms doubling to 1 s, with jitter, always inside the caller's deadline.
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 1.0
# Give up this long before the caller's deadline, so it gets kleidi's reason rather than DEADLINE_EXCEEDED.
_DEADLINE_MARGIN = 0.025


@dataclass(frozen=True, slots=True)
class Reply:
    """A Vault answer: the HTTP status, the decoded JSON body (empty when there is none) and Vault's errors."""

    status: int
    body: dict[str, Any]

    @property
    def errors(self) -> list[str]:
        errors = self.body.get("errors")
        return [str(e) for e in errors] if isinstance(errors, list) else []

    def data(self) -> dict[str, Any]:
        data = self.body.get("data")
        return data if isinstance(data, dict) else {}


class TlsFailure(BackendUnavailable):
    """The TLS handshake failed (untrusted or mismatched certificate): retrying within a call will not help."""


class Redactor:
    """Removes secrets kleidi knows (tokens, secret-ids, JWTs) and anything shaped like one from a message."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, secret: str) -> None:
        if len(secret) >= 4:
            with self._lock:
                self._secrets.add(secret)

    def clean(self, text: str) -> str:
        with self._lock:
            secrets = sorted(self._secrets, key=len, reverse=True)
        for secret in secrets:
            text = text.replace(secret, "[redacted]")
        text = _TOKEN_SHAPES.sub("[redacted]", text)
        return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


class Token(Protocol):
    """What a request needs from the current login: the token and which login produced it."""

    @property
    def value(self) -> str: ...


class TokenSource(Protocol):
    """Hands out a valid token, logging in when needed, and hears about refused ones."""

    def current(self, deadline: float) -> Token: ...

    def refused(self, token: Token) -> bool: ...


class VaultHttp:
    """The HTTP side of the Vault provider: one pooled session through hvac's raw adapter.

    ``send`` makes exactly one attempt; retries, auth and meaning belong to the callers."""

    def __init__(self, config: VaultConfig, metrics: Metrics) -> None:
        self.config = config
        self.address = config.address.rstrip("/")
        self.redactor = Redactor()
        session = requests.Session()
        pool = requests.adapters.HTTPAdapter(pool_connections=2, pool_maxsize=_POOL_SIZE, max_retries=0)
        session.mount("https://", pool)
        session.mount("http://", pool)
        # Never take proxies or CA bundles from the environment: the config says where Vault is and whom to trust.
        session.trust_env = False
        verify: bool | str = config.ca_cert or True
        cert: tuple[str, str] | None = None
        if config.auth.client_cert and config.auth.client_key:
            cert = (config.auth.client_cert, config.auth.client_key)
        session.verify = verify
        session.cert = cert
        self._adapter = hvac.adapters.RawAdapter(
            base_uri=self.address,
            session=session,
            namespace=config.namespace or None,
            timeout=config.timeout,
            verify=verify,
            cert=cert,
        )
        self._metrics = metrics
        self._seconds: dict[str, Any] = {}
        self._counts: dict[tuple[str, str], Any] = {}

    def send(
        self, method: str, path: str, operation: str, token: str | None, payload: dict[str, Any] | None, timeout: float
    ) -> Reply:
        """One request to ``/v1/<path>``. Raises BackendUnavailable when no HTTP answer came back."""
        headers = {"X-Vault-Token": token} if token else None
        started = time.perf_counter()
        status = "error"
        try:
            response = self._adapter.request(
                method, "v1/" + path, headers=headers, raise_exception=False, json=payload, timeout=timeout
            )
            status = str(response.status_code)
            try:
                body = response.json() if response.content else {}
            except ValueError:
                body = {}
            return Reply(response.status_code, body if isinstance(body, dict) else {})
        except requests.exceptions.Timeout:
            status = "timeout"
            raise BackendUnavailable(f"Vault at {self.address} did not answer {operation} in {timeout:.3g}s") from None
        except requests.exceptions.SSLError as exc:
            raise TlsFailure(f"TLS to Vault at {self.address} failed: {_ssl_reason(exc)}") from None
        except requests.exceptions.ConnectionError:
            raise BackendUnavailable(f"cannot connect to Vault at {self.address}") from None
        except requests.exceptions.RequestException as exc:
            raise BackendUnavailable(f"request to Vault at {self.address} failed ({type(exc).__name__})") from None
        finally:
            elapsed = time.perf_counter() - started
            seconds = self._seconds.get(operation)
            if seconds is None:
                seconds = self._seconds[operation] = self._metrics.vault_request_seconds.labels(operation)
            seconds.observe(elapsed)
            count = self._counts.get((operation, status))
            if count is None:
                count = self._counts[(operation, status)] = self._metrics.vault_requests.labels(operation, status)
            count.inc()

    def call(
        self,
        method: str,
        path: str,
        operation: str,
        payload: dict[str, Any] | None,
        deadline: float,
        auth: TokenSource | None = None,
    ) -> Reply:
        """A request with retries inside ``deadline`` (a ``time.monotonic()`` instant).

        Transient failures (no answer, 429, 5xx, sealed) are retried with jittered exponential backoff; a 401/403
        is retried once after ``auth`` had the chance to log in again. Any other answer is returned as is."""
        attempt = 0
        auth_retried = False
        while True:
            token = auth.current(deadline) if auth is not None else None
            remaining = deadline - time.monotonic() - _DEADLINE_MARGIN
            if remaining <= 0:
                raise BackendUnavailable(f"no answer from Vault at {self.address} for {operation} before the deadline")
            try:
                value = token.value if token is not None else None
                reply = self.send(method, path, operation, value, payload, min(self.config.timeout, remaining))
            except TlsFailure:
                raise
            except BackendUnavailable as exc:
                failure = exc
            else:
                if reply.status in (401, 403) and auth is not None and token is not None and not auth_retried:
                    auth_retried = True
                    if auth.refused(token):
                        continue
                    return reply
                if reply.status not in TRANSIENT_STATUSES:
                    return reply
                failure = BackendUnavailable(self.transient_reason(reply))
            delay = min(_BACKOFF_FIRST * 2**attempt, _BACKOFF_MAX) * (0.5 + random.random() / 2)  # noqa: S311
            attempt += 1
            if time.monotonic() + delay >= deadline - _DEADLINE_MARGIN:
                raise failure
            time.sleep(delay)

    def transient_reason(self, reply: Reply) -> str:
        text = " ".join(reply.errors).lower()
        if reply.status == 503 and "sealed" in text:
            return f"Vault at {self.address} is sealed"
        if reply.status == 429:
            return f"Vault at {self.address} is rate limiting kleidi (HTTP 429)"
        return f"Vault at {self.address} answered HTTP {reply.status}: {self.reason(reply)}"

    def reason(self, reply: Reply) -> str:
        """Vault's own error text for a reply, safe to log and return."""
        text = "; ".join(reply.errors) or f"HTTP {reply.status}"
        return self.redactor.clean(text)

    def close(self) -> None:
        self._adapter.close()


def _ssl_reason(exc: requests.exceptions.SSLError) -> str:
    text = str(exc)
    for marker in ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "WRONG_VERSION_NUMBER", "hostname"):
        if marker in text:
            tail = text[text.index(marker) :].split("(", 1)[0].split("'", 1)[0].strip(" :)")
            return tail[:120]
    return "handshake failed"
