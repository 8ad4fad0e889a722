"""Proxy mode's TLS files, both sides: the key server's context (serve_remote) and a client's certificate, key and
CA (provider: remote). Each is checked when read, with errors that name the setting and the file but never show
the content, and is read again when the files change."""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from kleidi.config import RemoteConfig, ServeRemoteConfig
from kleidi.errors import ConfigError
from kleidi.observability import Metrics

log = logging.getLogger("kleidi.remote")

# How often, at most, the files are looked at (before a handshake): a rotation shows within a second, and a
# burst of connections costs one stat() per file per second, not one per connection.
LOOK_EVERY = 1.0

# (mtime_ns, size, inode) of each file, None for one that cannot be looked at: a rotation by rename, by copy or by
# rewrite in place changes at least one of them.
Signature = tuple[tuple[int, int, int] | None, ...]


class _EncryptedKey(Exception):
    """Raised by the password callback: a key server cannot prompt for a passphrase."""


def _no_password() -> bytes:
    raise _EncryptedKey


def signature(paths: Sequence[str]) -> Signature:
    """What tells a changed file from the same one."""
    found: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            found.append(None)
        else:
            found.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(found)


def read_file(path: str, setting: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror or type(exc).__name__}") from None


def build_context(cfg: ServeRemoteConfig) -> tuple[ssl.SSLContext, str]:
    """The server context (mutual TLS 1.2+, ALPN h2 as gRPC clients require) and the certificate's serial number,
    in hex. Every problem is a ConfigError naming the setting and the file, never a key's content."""
    from cryptography import x509  # only a key server needs it; a plain plugin does not pay for the import

    ca = read_file(cfg.ca_cert, "serve_remote.ca_cert")
    cert_pem = read_file(cfg.cert, "serve_remote.cert")
    read_file(cfg.key, "serve_remote.key")  # its own error when unreadable; the content is left to OpenSSL
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ConfigError(f"serve_remote.cert: {cfg.cert} is not a PEM certificate") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    # No renegotiation (TLS 1.2): nothing to gain, and each one is a handshake the peer makes the key server pay
    # for. No session resumption by ticket: every connection is a full handshake that checks the client
    # certificate against the current CA and its expiry, not a session some earlier certificate opened.
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    context.num_tickets = 0
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


@dataclass(frozen=True, slots=True)
class Material:
    """What grpc.ssl_channel_credentials takes, and the files' signature when they were read."""

    ca: bytes
    cert: bytes
    key: bytes = field(repr=False)  # a repr() in a log line or a traceback must not carry the private key
    signature: Signature
    subject: str  # the client certificate's CN, for logs


def client_files(config: RemoteConfig) -> tuple[str, str, str]:
    return config.ca_cert, config.client_cert, config.client_key


def load_client(config: RemoteConfig) -> Material:
    """Read and check the three files. Every problem is a ConfigError naming the setting and the file, never
    showing their content; a key that does not belong to the certificate (a rotation half done) is one."""
    # Taken before reading: a file replaced while it is read then looks changed at the next look, and is read again.
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    sig = signature(client_files(config))
    data = {
        setting: read_file(path, f"remote.{setting}")
        for setting, path in zip(("ca_cert", "client_cert", "client_key"), client_files(config), strict=True)
    }
    try:
        x509.load_pem_x509_certificates(data["ca_cert"])
    except ValueError:
        raise ConfigError(f"remote.ca_cert: {config.ca_cert} holds no PEM certificate") from None
    try:
        leaf = x509.load_pem_x509_certificates(data["client_cert"])[0]
    except ValueError:
        raise ConfigError(f"remote.client_cert: {config.client_cert} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(data["client_key"], password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The library's own message is not shown: for some malformed inputs it could quote bytes of the file.
        raise ConfigError(f"remote.client_key: {config.client_key} is not an unencrypted PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ConfigError(
            f"remote.client_key: {config.client_key} is not the key of the certificate in remote.client_cert"
            f" ({config.client_cert})"
        )
    names = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    subject = str(names[0].value) if names else leaf.subject.rfc4514_string()
    return Material(data["ca_cert"], data["client_cert"], data["client_key"], sig, subject)
