"""One pooled HTTP connection set to Vault/OpenBao: attempts with metrics, retries in the deadline, redaction."""

from __future__ import annotations

import http.client
import json
import random
import re
import select
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kleidi.config import VaultConfig
from kleidi.errors import BackendUnavailable
from kleidi.observability import Metrics
from kleidi.providers.base import DEADLINE_MARGIN

# The largest answer read from Vault (key information with thousands of versions is far below it).
_MAX_RESPONSE = 1024 * 1024
# Idle connections kept open to Vault (busy ones are not limited: a burst opens more, then closes the extra).
_POOL_SIZE = 32
# Credentials the redactor remembers: the current ones and a few before them (older tokens have expired).
_REMEMBERED_SECRETS = 32

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

    @classmethod
    def parse(cls, status: int, raw: bytes) -> Reply:
        try:
            decoded = json.loads(raw) if raw else {}
        except ValueError:
            decoded = {}
        return cls(status, decoded if isinstance(decoded, dict) else {})


class TlsFailure(BackendUnavailable):
    """The TLS handshake failed (untrusted or mismatched certificate): retrying within a call will not help."""


class Redactor:
    """Removes secrets kleidi knows (tokens, secret-ids, JWTs) and anything shaped like one from a message."""

    def __init__(self) -> None:
        self._secrets: dict[str, None] = {}  # insertion-ordered set
        self._lock = threading.Lock()

    def add(self, secret: str) -> None:
        if len(secret) >= 4:
            with self._lock:
                self._secrets.pop(secret, None)
                self._secrets[secret] = None
                while len(self._secrets) > _REMEMBERED_SECRETS:
                    del self._secrets[next(iter(self._secrets))]

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


class _Connections:
    """A LIFO of idle keep-alive connections to one Vault address, opened on demand."""

    def __init__(self, scheme: str, host: str, port: int | None, make_context: Callable[[], ssl.SSLContext]) -> None:
        self._scheme = scheme
        self._host = host
        self._port = port
        self._make_context = make_context
        self._context: ssl.SSLContext | None = None
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def get(self, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection still open (True) or a new, not yet connected one (False)."""
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if conn.sock is not None and not _dropped(conn.sock):
                    conn.sock.settimeout(timeout)
                    return conn, True
                conn.close()
        if self._scheme == "https":
            context = self._context
            if context is None:  # built on first use, so unreadable certificate files fail calls, not startup
                context = self._context = self._make_context()
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=context), False
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout), False

    @property
    def context(self) -> ssl.SSLContext | None:
        """The TLS context, once a connection has needed it."""
        return self._context

    def put(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < _POOL_SIZE:
                self._idle.append(conn)
                return
        conn.close()

    def clear(self, reload_tls: bool = False) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            if reload_tls:
                self._context = None
        for conn in idle:
            conn.close()


def _dropped(sock: socket.socket) -> bool:
    """An idle keep-alive socket with something to read has been closed (or broken) by the server."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class VaultHttp:
    """The HTTP side of the Vault provider: keep-alive connections from a small pool, one request per attempt.

    Python's http.client directly, not hvac/requests or urllib3: the same HTTP/1.1 keep-alive underneath, without
    the per-call layers on top, whose client CPU per transit call is the plugin's latency and throughput behind
    the gRPC server (docs/performance.md, "Vault / OpenBao", has the figures).
    ``send`` makes exactly one attempt; retries, auth and meaning belong to ``call`` and its callers."""

    def __init__(self, config: VaultConfig, metrics: Metrics) -> None:
        self.config = config
        self.address = config.address.rstrip("/")
        self.redactor = Redactor()
        url = urllib.parse.urlsplit(self.address)
        self._base = url.path.rstrip("/")
        self.scheme, self.host = url.scheme, url.hostname or ""
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.tls_generation = 0
        # No proxy or CA bundle from the environment: the config alone says where Vault is and whom to trust.
        self._connections = _Connections(url.scheme, self.host, url.port, self.tls_context)
        self._headers = {"X-Vault-Request": "true", "Content-Type": "application/json"}
        if config.namespace:
            self._headers["X-Vault-Namespace"] = config.namespace.strip("/")
        self._metrics = metrics
        self._seconds: dict[str, Any] = {}
        self._counts: dict[tuple[str, str], Any] = {}

    def tls_context(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=self.config.ca_cert)  # verification on, TLS 1.2 at least
        except (OSError, ssl.SSLError) as exc:
            raise TlsFailure(f"cannot load ca_cert {self.config.ca_cert}: {_os_reason(exc)}") from None
        auth = self.config.auth
        if auth.client_cert and auth.client_key:
            try:
                context.load_cert_chain(auth.client_cert, auth.client_key)
            except (OSError, ssl.SSLError) as exc:
                raise TlsFailure(f"cannot load client_cert {auth.client_cert}: {_os_reason(exc)}") from None
        return context

    def built_tls_context(self) -> ssl.SSLContext | None:
        """The TLS context the regular connections use, if it has been built (on a worker thread) yet."""
        return self._connections.context

    def reload_tls(self) -> None:
        """Re-read the CA and client certificate files (they may have been rotated) for new connections."""
        self.tls_generation += 1
        self._connections.clear(reload_tls=True)

    def send(
        self, method: str, path: str, operation: str, token: str | None, payload: dict[str, Any] | None, timeout: float
    ) -> Reply:
        """One request to ``/v1/<path>``. Raises BackendUnavailable when no HTTP answer came back."""
        headers = self.headers(token)
        body = json.dumps(payload).encode() if payload is not None else None
        target = self.target(path)
        started = time.perf_counter()
        status = "error"
        try:
            while True:
                conn, reused = self._connections.get(timeout)
                try:
                    conn.request(method, target, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read(_MAX_RESPONSE + 1)
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                    conn.close()
                    if reused:
                        continue  # the server closed an idle connection just now: once more on a fresh one
                    raise
                except BaseException:
                    conn.close()
                    raise
                if len(data) > _MAX_RESPONSE:
                    conn.close()  # the rest is never read: the connection cannot serve another request
                    raise BackendUnavailable(
                        f"Vault at {self.address} answered {operation} with over {_MAX_RESPONSE} bytes; refused unread"
                    )
                if response.will_close:
                    conn.close()
                else:
                    self._connections.put(conn)
                break
            status = str(response.status)
            return Reply.parse(response.status, data)
        except TimeoutError:
            status = "timeout"
            raise BackendUnavailable(f"Vault at {self.address} did not answer {operation} in {timeout:.3g}s") from None
        except ssl.SSLError as exc:
            raise TlsFailure(f"TLS to Vault at {self.address} failed: {_ssl_reason(str(exc))}") from None
        except (ConnectionRefusedError, socket.gaierror):
            raise BackendUnavailable(f"cannot connect to Vault at {self.address}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise BackendUnavailable(f"connection to Vault at {self.address} failed ({type(exc).__name__})") from None
        finally:
            self.record(operation, status, time.perf_counter() - started)

    def headers(self, token: str | None) -> dict[str, str]:
        return {**self._headers, "X-Vault-Token": token} if token else self._headers

    def target(self, path: str) -> str:
        return f"{self._base}/v1/{path}"

    def record(self, operation: str, status: str, elapsed: float) -> None:
        """Count one attempt in the Vault request metrics."""
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
            remaining = deadline - time.monotonic() - DEADLINE_MARGIN
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
            if time.monotonic() + delay >= deadline - DEADLINE_MARGIN:
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
        self._connections.clear()


def _os_reason(exc: BaseException) -> str:
    return str(getattr(exc, "strerror", None) or getattr(exc, "reason", None) or type(exc).__name__)


def _ssl_reason(text: str) -> str:
    for marker in ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "WRONG_VERSION_NUMBER", "hostname"):
        if marker in text:
            tail = text[text.index(marker) :].split("(", 1)[0].split("'", 1)[0].strip(" :)")
            return tail[:120]
    return "handshake failed"
