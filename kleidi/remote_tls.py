"""The key server's TLS context (serve_remote): built from the configured files, rebuilt when they change."""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import time

from kleidi.config import ServeRemoteConfig
from kleidi.errors import ConfigError
from kleidi.observability import Metrics

log = logging.getLogger("kleidi.remote")

# How often, at most, the files are looked at (before a handshake): a rotation shows within a second, and a
# burst of connections costs one stat() per file per second, not one per connection.
LOOK_EVERY = 1.0

Signature = tuple[tuple[int, int, int] | None, ...]


class _EncryptedKey(Exception):
    """Raised by the password callback: a key server cannot prompt for a passphrase."""


def _no_password() -> bytes:
    raise _EncryptedKey


def signature(paths: tuple[str, ...]) -> Signature:
    """What tells a changed file from the same one: mtime, size and inode (a rename puts a new inode in place)."""
    found: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            found.append(None)
        else:
            found.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(found)


def _read(path: str, setting: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from None


def build_context(cfg: ServeRemoteConfig) -> tuple[ssl.SSLContext, str]:
    """The server context (mutual TLS 1.2+, ALPN h2 as gRPC clients require) and the certificate's serial number,
    in hex. Every problem is a ConfigError naming the setting and the file, never a key's content."""
    from cryptography import x509  # only a key server needs it; a plain plugin does not pay for the import

    ca = _read(cfg.ca_cert, "serve_remote.ca_cert")
    cert_pem = _read(cfg.cert, "serve_remote.cert")
    _read(cfg.key, "serve_remote.key")  # its own error when unreadable; the content is left to OpenSSL
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ConfigError(f"serve_remote.cert: {cfg.cert} is not a PEM certificate") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    try:
        context.load_verify_locations(cadata=ca.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError):
        raise ConfigError(f"serve_remote.ca_cert: {cfg.ca_cert} holds no PEM certificate") from None
    try:
        context.load_cert_chain(cfg.cert, cfg.key, password=_no_password)
    except _EncryptedKey:
        raise ConfigError(
            f"serve_remote.key: {cfg.key} is encrypted; kleidi needs it unencrypted (protect it with file permissions)"
        ) from None
    except OSError as exc:  # ssl.SSLError is an OSError; so is a file that went away since it was read
        what = exc.strerror if not isinstance(exc, ssl.SSLError) else None
        raise ConfigError(
            f"serve_remote.key: cannot read {cfg.key}: {what}"
            if what
            else f"serve_remote.key: {cfg.key} is not a PEM private key, or not the key of {cfg.cert}"
        ) from None
    if cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC):
        log.warning(
            "serve_remote.cert has expired: clients will refuse the key server",
            extra={"cert": cfg.cert, "not_after": cert.not_valid_after_utc.isoformat()},
        )
    return context, format(cert.serial_number, "x")


class ServerTls:
    """The current server context. ``context()`` is called before each handshake; it looks at the files at most
    once a second and rebuilds the context when they changed. A rebuild that fails (a file half-written during a
    rotation, a key that does not match) is logged and the previous context kept, so a bad rewrite never takes
    the key server down; the next change is tried again."""

    def __init__(self, cfg: ServeRemoteConfig, metrics: Metrics) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._paths = (cfg.ca_cert, cfg.cert, cfg.key)
        self._signature = signature(self._paths)
        self._context, self.serial = build_context(cfg)  # at start, a bad file is a ConfigError
        self._looked = time.monotonic()

    def context(self) -> ssl.SSLContext:
        now = time.monotonic()
        if now - self._looked >= LOOK_EVERY:
            self._looked = now
            seen = signature(self._paths)
            if seen != self._signature:
                self._signature = seen
                self._reload()
        return self._context

    def _reload(self) -> None:
        try:
            context, serial = build_context(self._cfg)
        except ConfigError as exc:
            self._metrics.tls_reloads.labels("server", "error").inc()
            log.warning(
                "certificate files changed but cannot be loaded; still serving the previous certificate",
                extra={"reason": str(exc)},
            )
            return
        self._context, self.serial = context, serial
        self._metrics.tls_reloads.labels("server", "ok").inc()
        log.info(
            "certificate files re-read; new connections get them", extra={"cert": self._cfg.cert, "serial": serial}
        )
