"""The dev/test PKI of proxy mode: a CA dedicated to it, key server and client certificates (EC P-256).

Files live in one directory: ``ca.pem``, ``ca-key.pem``, ``server-<name>.pem``, ``server-<name>-key.pem``,
``client-<name>.pem``, ``client-<name>-key.pem``. Keys are written 0600, and no existing file is ever
overwritten: a rotation writes the new certificate elsewhere (``out``) and the operator moves it into place."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kleidi.errors import KleidiError

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
DEFAULT_CA_NAME = "kleidi proxy-mode CA"
CA_DAYS = 3650
LEAF_DAYS = 365
# Clocks of the key servers and their clients may disagree by a little: a certificate is valid from a bit earlier.
_BACKDATE = datetime.timedelta(minutes=5)
# A DNS name (a wildcard is allowed as the first label of an extra SAN only) or an IP literal.
_DNS = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


class PkiError(KleidiError):
    """A certificate cannot be made or written: a bad name, a missing CA, a file that already exists."""

    kind = "pki"


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _general_name(name: str, wildcard: bool = False) -> x509.GeneralName:
    """An IP literal becomes an IP SAN, anything else a DNS SAN (checked, so a typo is not signed)."""
    if _is_ip(name):
        return x509.IPAddress(ipaddress.ip_address(name))
    bare = name[2:] if wildcard and name.startswith("*.") else name
    if not _DNS.match(bare):
        raise PkiError(f"{name!r} is neither a DNS name nor an IP address")
    return x509.DNSName(name)


def new_ca(name: str = DEFAULT_CA_NAME, days: int = CA_DAYS) -> Issued:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    if not name.strip():
        raise PkiError("the CA name must not be empty")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _leaf(ca: Issued, name: str, sans: Sequence[x509.GeneralName], usage: x509.ObjectIdentifier, days: int) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key)


def server_cert(ca: Issued, name: str, extra_sans: Iterable[str] = (), days: int = LEAF_DAYS) -> Issued:
    """A key server certificate: CN ``name``, SANs ``name`` and ``extra_sans`` (IP literals as IP SANs)."""
    names = [name, *(san for san in extra_sans if san != name)]
    return _leaf(ca, name, [_general_name(n, wildcard=i > 0) for i, n in enumerate(names)], _SERVER_AUTH, days)


def client_cert(ca: Issued, name: str, days: int = LEAF_DAYS) -> Issued:
    """A proxy-mode client certificate: CN ``name`` and the SAN serve_remote.allowed_client_names is matched to."""
    return _leaf(ca, name, [_general_name(name)], _CLIENT_AUTH, days)


_SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
_CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH


def parse_server_spec(spec: str) -> tuple[str, list[str]]:
    """``NAME[,EXTRA_SAN...]`` as given to ``--server``."""
    parts = [part.strip() for part in spec.split(",")]
    if not parts[0] or any(not part for part in parts):
        raise PkiError(f"--server {spec!r}: expected NAME[,EXTRA_SAN...] with no empty names")
    return parts[0], parts[1:]


# --- files ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One leaf certificate to make: ``kind`` is "server" or "client"."""

    kind: str
    name: str
    extra_sans: tuple[str, ...] = ()


def leaf_files(directory: Path, kind: str, name: str) -> tuple[Path, Path]:
    """(certificate, key) paths of a leaf in ``directory``."""
    if "/" in name or name in (".", ".."):
        raise PkiError(f"{name!r} cannot be part of a file name")
    return directory / f"{kind}-{name}.pem", directory / f"{kind}-{name}-key.pem"


def init(
    directory: Path,
    requests: Sequence[Request],
    days: int = LEAF_DAYS,
    ca_days: int = CA_DAYS,
    ca_name: str = DEFAULT_CA_NAME,
) -> list[Path]:
    """A new CA in ``directory`` and the requested leaves; the files written, in order."""
    ca_files = (directory / CA_CERT, directory / CA_KEY)
    _refuse_existing([*ca_files, *_targets(directory, requests)])
    ca = new_ca(ca_name, ca_days)
    leaves = _make(ca, requests, days)  # every name is checked before the first file is written
    written = _write(directory, ca_files, ca)
    for request, issued in zip(requests, leaves, strict=True):
        written += _write(directory, leaf_files(directory, request.kind, request.name), issued)
    return written


def issue(directory: Path, requests: Sequence[Request], out: Path | None = None, days: int = LEAF_DAYS) -> list[Path]:
    """The requested leaves, signed by the CA in ``directory``, written to ``out`` (default ``directory``)."""
    ca = load_ca(directory)
    target = out if out is not None else directory
    _refuse_existing(_targets(target, requests))
    leaves = _make(ca, requests, days)
    written: list[Path] = []
    for request, issued in zip(requests, leaves, strict=True):
        written += _write(target, leaf_files(target, request.kind, request.name), issued)
    return written


def load_ca(directory: Path) -> Issued:
    """The CA made by init() in ``directory``; its key must belong to its certificate."""
    cert_file, key_file = directory / CA_CERT, directory / CA_KEY
    missing = [str(path) for path in (cert_file, key_file) if not path.exists()]
    if missing:
        raise PkiError(f"no CA in {directory}: {' and '.join(missing)} missing; make one with kleidi pki init")
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except OSError as exc:
        raise PkiError(f"cannot read {cert_file}: {exc.strerror}") from None
    except ValueError:
        raise PkiError(f"{cert_file} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except OSError as exc:
        raise PkiError(f"cannot read {key_file}: {exc.strerror}") from None
    except (ValueError, TypeError):  # never the content: it is a private key
        raise PkiError(f"{key_file} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise PkiError(f"{key_file} is not the key of {cert_file}")
    return Issued(cert, key)


def _targets(directory: Path, requests: Sequence[Request]) -> list[Path]:
    paths = [path for request in requests for path in leaf_files(directory, request.kind, request.name)]
    if len(set(paths)) != len(paths):
        raise PkiError("the same certificate is requested twice")
    return paths


def _refuse_existing(paths: Sequence[Path]) -> None:
    existing = [str(path) for path in paths if path.exists() or path.is_symlink()]
    if existing:
        verb = "exists" if len(existing) == 1 else "exist"
        raise PkiError(f"{', '.join(existing)} already {verb}; kleidi pki never overwrites a file")


def _make(ca: Issued, requests: Sequence[Request], days: int) -> list[Issued]:
    if days < 1:
        raise PkiError("days must be at least 1")
    made = []
    for request in requests:
        if request.kind == "server":
            made.append(server_cert(ca, request.name, request.extra_sans, days))
        elif request.kind == "client":
            made.append(client_cert(ca, request.name, days))
        else:
            raise PkiError(f"unknown certificate kind {request.kind!r}")
    return made


def _write(directory: Path, files: tuple[Path, Path], issued: Issued) -> list[Path]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_file, key_file = files
    _write_new(key_file, issued.key_pem(), 0o600)
    _write_new(cert_file, issued.cert_pem(), 0o644)
    return [cert_file, key_file]


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """O_EXCL: a file that appeared since the check is still never overwritten, and a key is never readable by
    others, not even for an instant."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise PkiError(f"{path} already exists; kleidi pki never overwrites a file") from None
    except OSError as exc:
        raise PkiError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as file:
        os.fchmod(fd, mode)  # the umask may have taken bits away from a certificate
        file.write(data)
