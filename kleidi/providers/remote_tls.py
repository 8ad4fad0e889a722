"""Proxy mode, client side: the CA, certificate and key files, checked when read and re-read when they change."""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from kleidi.config import RemoteConfig
from kleidi.errors import ConfigError

# (mtime_ns, size, inode) of each file, None for one that cannot be looked at: a rotation by rename, by copy or by
# rewrite in place changes at least one of them.
Signature = tuple[tuple[int, int, int] | None, ...]


@dataclass(frozen=True, slots=True)
class Material:
    """What grpc.ssl_channel_credentials takes, and the files' signature when they were read."""

    ca: bytes
    cert: bytes
    key: bytes
    signature: Signature
    subject: str  # the client certificate's CN, for logs


def _paths(config: RemoteConfig) -> tuple[tuple[str, str], ...]:
    return (("ca_cert", config.ca_cert), ("client_cert", config.client_cert), ("client_key", config.client_key))


def signature(config: RemoteConfig) -> Signature:
    looks: list[tuple[int, int, int] | None] = []
    for _, path in _paths(config):
        try:
            st = os.stat(path)
        except OSError:
            looks.append(None)
        else:
            looks.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(looks)


def load(config: RemoteConfig) -> Material:
    """Read and check the three files. Every problem is a ConfigError naming the setting and the file, never
    showing their content; a key that does not belong to the certificate (a rotation half done) is one."""
    # Taken before reading: a file replaced while it is read then looks changed at the next look, and is read again.
    sig = signature(config)
    data = {}
    for setting, path in _paths(config):
        try:
            with open(path, "rb") as handle:
                data[setting] = handle.read()
        except OSError as exc:
            raise ConfigError(f"remote.{setting}: cannot read {path}: {exc.strerror or type(exc).__name__}") from None
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
