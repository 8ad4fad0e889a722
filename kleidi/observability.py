"""Prometheus metrics, the HTTP probe server (/metrics /healthz /livez /readyz) and log setup."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

# RPCs and backend calls sit between 50 µs (SoftHSM) and seconds (a slow Vault or TPM).
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def key_id_hash(key_id: str) -> str:
    """A short, stable label for a key_id: metrics never carry the key_id itself."""
    return hashlib.sha256(key_id.encode()).hexdigest()[:16]


class Metrics:
    """Every metric kleidi exports, on a registry of its own (one per server instance)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "kleidi_requests_total",
            "gRPC requests by API, method and status code",
            ["api", "method", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "kleidi_request_duration_seconds",
            "gRPC request latency",
            ["api", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.backend_seconds = Histogram(
            "kleidi_backend_duration_seconds",
            "Backend call latency",
            ["provider", "operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.backend_errors = Counter(
            "kleidi_backend_errors_total",
            "Backend call failures by error kind",
            ["provider", "operation", "kind"],
            registry=r,
        )
        self.healthy = Gauge("kleidi_healthy", "1 while the last backend round trip succeeded", registry=r)
        self.health_checks = Counter(
            "kleidi_health_checks_total", "Backend health round trips by result", ["result"], registry=r
        )
        self.key_info = Gauge(
            "kleidi_current_key_info",
            "The current KEK, as a hash of its key_id (value is always 1)",
            ["key_id_hash"],
            registry=r,
        )
        self.vault_requests = Counter(
            "kleidi_vault_requests_total",
            "Vault/OpenBao HTTP requests by operation and status",
            ["operation", "status"],
            registry=r,
        )
        self.vault_request_seconds = Histogram(
            "kleidi_vault_request_duration_seconds",
            "Vault/OpenBao request latency",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.vault_logins = Counter(
            "kleidi_vault_logins_total",
            "Vault/OpenBao logins by auth method and result",
            ["method", "result"],
            registry=r,
        )
        self.vault_renewals = Counter(
            "kleidi_vault_token_renewals_total", "Vault/OpenBao token renewals by result", ["result"], registry=r
        )
        self.vault_token_ttl = Gauge(
            "kleidi_vault_token_ttl_seconds", "Seconds left on the Vault/OpenBao token at the last check", registry=r
        )
        # Proxy mode, on the control-plane side (provider: remote). Endpoints are the configured host:port strings.
        self.remote_calls = Counter(
            "kleidi_remote_calls_total",
            "Calls to key servers by endpoint, method and gRPC status code",
            ["endpoint", "method", "code"],
            registry=r,
        )
        self.remote_failovers = Counter(
            "kleidi_remote_failovers_total",
            "Calls that a key server did not answer and the next endpoint was tried for",
            ["endpoint"],
            registry=r,
        )
        self.remote_endpoint_up = Gauge(
            "kleidi_remote_endpoint_up",
            "1 while a key server answered the last check healthy and with the agreed key_id",
            ["endpoint"],
            registry=r,
        )
        self.remote_key_mismatch = Gauge(
            "kleidi_remote_endpoint_key_mismatch",
            "1 while a key server reports a key_id that differs from the other endpoints' (it is not used)",
            ["endpoint"],
            registry=r,
        )
        # Proxy mode, on the key server side (serve_remote).
        self.remote_connections = Counter(
            "kleidi_remote_connections_total",
            "Connections from proxy-mode clients by result: accepted, or the reason they were refused "
            "(handshake: no or untrusted certificate, not TLS, or no handshake in time; not_allowed: not on "
            "allowed_client_names; over_limit: too many handshakes in progress or connections open)",
            ["result"],
            registry=r,
        )
        self.remote_connections_open = Gauge(
            "kleidi_remote_connections_open", "Proxy-mode client connections open now", registry=r
        )
        self.tls_reloads = Counter(
            "kleidi_tls_reloads_total",
            "Certificate and key files re-read after they changed, by side (client or server) and result",
            ["side", "result"],
            registry=r,
        )
        self._key_label: str | None = None
        self._lock = threading.Lock()

    def set_health(self, ok: bool, key_id: str) -> None:
        self.healthy.set(1 if ok else 0)
        self.health_checks.labels("ok" if ok else "error").inc()
        if not key_id:
            return
        label = key_id_hash(key_id)
        with self._lock:
            if label != self._key_label:
                if self._key_label is not None:
                    self.key_info.remove(self._key_label)
                self.key_info.labels(label).set(1)
                self._key_label = label

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ProbeServer:
    """HTTP endpoints for Prometheus and kubelet probes.

    /livez answers from the process alone, so a backend outage never restarts the plugin;
    /healthz and /readyz follow the last backend round trip."""

    def __init__(self, host: str, port: int, metrics: Metrics, health: Callable[[], tuple[bool, str]]) -> None:
        self._httpd = _ProbeHTTPServer((host, port), _ProbeHandler)
        self._httpd.metrics = metrics
        self._httpd.health = health
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="kleidi-probes", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _ProbeHTTPServer(ThreadingHTTPServer):
    metrics: Metrics
    health: Callable[[], tuple[bool, str]]


class _ProbeHandler(BaseHTTPRequestHandler):
    server: _ProbeHTTPServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.server.metrics.render(), CONTENT_TYPE_LATEST)
        elif path == "/livez":
            self._send(200, b"ok\n")
        elif path in ("/healthz", "/readyz"):
            ok, reason = self.server.health()
            self._send(200 if ok else 503, (reason + "\n").encode())
        else:
            self._send(404, b"not found\n")

    def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Probes are polled every few seconds; logging each would drown the useful lines."""


# Attributes every LogRecord has; anything else was passed with extra= and is a structured field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the extra= fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["error_type"] = record.exc_info[0].__name__
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


class KeyValueFormatter(logging.Formatter):
    """ts level logger msg key=value ... for humans at a terminal.

    Values come from callers too (a request's uid is whatever reached the socket), so anything but a plain
    token is written as a JSON string: a newline, a quote or an `=` inside a value can never start a line or a
    field of its own. Traceback lines are indented, so none of them reads as a log line either."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = " ".join(f"{_token(k)}={_token(v)}" for k, v in vars(record).items() if k not in _STANDARD)
        line = f"{ts} {record.levelname.lower()} {record.name} {_token(record.getMessage(), spaces=True)}"
        if fields:
            line += " " + fields
        if record.exc_info and record.exc_info[0] is not None:
            line += "".join(f"\n\t{text}" for text in self.formatException(record.exc_info).splitlines())
        return line


# What a key=value log writes bare; anything else is quoted and escaped.
_BARE = re.compile(r"[A-Za-z0-9_.:/@+,%-]+")
_BARE_WITH_SPACES = re.compile(r"[A-Za-z0-9_.:/@+,%;()' -]+")


def _token(value: object, spaces: bool = False) -> str:
    text = value if isinstance(value, str) else str(value)
    if (_BARE_WITH_SPACES if spaces else _BARE).fullmatch(text):
        return text
    return json.dumps(text)  # escapes control characters, quotes and backslashes; non-ASCII as \uXXXX


def setup_logging(level: str, fmt: str) -> None:
    """Route every kleidi logger to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("kleidi").setLevel(level.upper())
