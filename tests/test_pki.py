"""kleidi pki: the CA and certificates of proxy mode, as files and as a TLS handshake sees them."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kleidi import pki
from tests.plugin import REPO

pytestmark = pytest.mark.unit


def _kleidi(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kleidi", "pki", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in ext]


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_init_makes_the_ca_and_the_certificates(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    done = _kleidi("init", "--dir", str(out), "--server", "ks-1,127.0.0.1,ks-1.example", "--client", "cp-1")
    assert done.returncode == 0, done.stderr
    names = ["ca.pem", "ca-key.pem", "server-ks-1.pem", "server-ks-1-key.pem", "client-cp-1.pem", "client-cp-1-key.pem"]
    assert done.stdout.split() == [str(out / name) for name in names]
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name in names:
        mode = stat.S_IMODE((out / name).stat().st_mode)
        assert mode == (0o600 if name.endswith("key.pem") else 0o644), name

    ca = _cert(out / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _cn(ca) == "kleidi proxy-mode CA"

    server = _cert(out / "server-ks-1.pem")
    server.verify_directly_issued_by(ca)
    assert _cn(server) == "ks-1"
    assert _sans(server) == ["ks-1", "127.0.0.1", "ks-1.example"]
    ip = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ip.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert _eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    client = _cert(out / "client-cp-1.pem")
    client.verify_directly_issued_by(ca)
    assert _cn(client) == "cp-1"
    assert client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == ["cp-1"]
    assert _eku(client) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_the_certificates_pass_a_mutual_tls_handshake(tmp_path: Path) -> None:
    """What Python's ssl (the key server) and a strict verifier make of them: the chain, the server's name and IP."""
    pki.init(tmp_path, [pki.Request("server", "ks-1", ("127.0.0.1",)), pki.Request("client", "cp-1")])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    server_ctx.load_verify_locations(tmp_path / "ca.pem")
    server_ctx.load_cert_chain(tmp_path / "server-ks-1.pem", tmp_path / "server-ks-1-key.pem")
    for hostname in ("ks-1", "127.0.0.1"):
        client_ctx = ssl.create_default_context(cafile=tmp_path / "ca.pem")
        client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        client_ctx.load_cert_chain(tmp_path / "client-cp-1.pem", tmp_path / "client-cp-1-key.pem")
        peer = _handshake(server_ctx, client_ctx, hostname)
        assert ("DNS", "cp-1") in peer["subjectAltName"]
    # The client's certificate is not a server's: a client that checks the purpose refuses it.
    wrong = ssl.create_default_context(cafile=tmp_path / "ca.pem")
    wrong_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    wrong_server.load_cert_chain(tmp_path / "client-cp-1.pem", tmp_path / "client-cp-1-key.pem")
    with pytest.raises(ssl.SSLError, match="unsuitable certificate purpose"):
        _handshake(wrong_server, wrong, "cp-1")


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str) -> dict[str, object]:
    left, right = socket.socketpair()
    peer: dict[str, object] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(left, server_side=True) as tls:
                peer.update(tls.getpeercert() or {})
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(right, server_hostname=hostname):
            pass
    finally:
        right.close()
        thread.join(10)
    return peer


def test_init_never_overwrites(tmp_path: Path) -> None:
    assert _kleidi("init", "--dir", str(tmp_path), "--client", "cp-1").returncode == 0
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    done = _kleidi("init", "--dir", str(tmp_path), "--client", "cp-2")
    assert done.returncode == 1
    assert "already exist" in done.stderr and "never overwrites" in done.stderr
    # Nothing was written, not even the certificates that did not exist yet.
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_issue_adds_certificates_with_the_existing_ca(tmp_path: Path) -> None:
    pki.init(tmp_path, [])
    done = _kleidi("issue", "--dir", str(tmp_path), "--server", "ks-2,10.0.0.2", "--client", "cp-2")
    assert done.returncode == 0, done.stderr
    ca = _cert(tmp_path / "ca.pem")
    for name in ("server-ks-2.pem", "client-cp-2.pem"):
        _cert(tmp_path / name).verify_directly_issued_by(ca)
    assert stat.S_IMODE((tmp_path / "server-ks-2-key.pem").stat().st_mode) == 0o600
    assert _sans(_cert(tmp_path / "server-ks-2.pem")) == ["ks-2", "10.0.0.2"]


def test_issue_never_overwrites_and_writes_a_rotation_elsewhere(tmp_path: Path) -> None:
    pki.init(tmp_path, [pki.Request("server", "ks-1")])
    old = (tmp_path / "server-ks-1.pem").read_bytes()
    old_key = (tmp_path / "server-ks-1-key.pem").read_bytes()
    done = _kleidi("issue", "--dir", str(tmp_path), "--server", "ks-1")
    assert done.returncode == 1 and "server-ks-1" in done.stderr and "never overwrites" in done.stderr
    assert (tmp_path / "server-ks-1.pem").read_bytes() == old
    assert (tmp_path / "server-ks-1-key.pem").read_bytes() == old_key

    done = _kleidi("issue", "--dir", str(tmp_path), "--server", "ks-1", "--out", str(tmp_path / "next"))
    assert done.returncode == 0, done.stderr
    new = _cert(tmp_path / "next" / "server-ks-1.pem")
    new.verify_directly_issued_by(_cert(tmp_path / "ca.pem"))
    assert new.serial_number != _cert(tmp_path / "server-ks-1.pem").serial_number


def test_issue_without_a_ca_says_so(tmp_path: Path) -> None:
    done = _kleidi("issue", "--dir", str(tmp_path / "none"), "--client", "cp-1")
    assert done.returncode == 1
    assert f"no CA in {tmp_path / 'none'}" in done.stderr and "kleidi pki init" in done.stderr
    assert not (tmp_path / "none").exists()
    # Half a CA is no CA either, and the message names the missing half.
    pki.init(tmp_path / "half", [])
    (tmp_path / "half" / "ca-key.pem").unlink()
    done = _kleidi("issue", "--dir", str(tmp_path / "half"), "--client", "cp-1")
    assert done.returncode == 1 and "ca-key.pem missing" in done.stderr


def test_issue_refuses_a_key_that_is_not_the_cas(tmp_path: Path) -> None:
    pki.init(tmp_path / "a", [])
    pki.init(tmp_path / "b", [])
    (tmp_path / "a" / "ca-key.pem").unlink()
    (tmp_path / "a" / "ca-key.pem").write_bytes((tmp_path / "b" / "ca-key.pem").read_bytes())
    with pytest.raises(pki.PkiError, match="is not the key of"):
        pki.load_ca(tmp_path / "a")


@pytest.mark.parametrize("name", ["a b", "-x", "x/y", "", "ks_1"])
def test_bad_names_are_refused_before_anything_is_written(tmp_path: Path, name: str) -> None:
    done = _kleidi("init", "--dir", str(tmp_path / "pki"), "--client", "cp-1", f"--client={name}")
    assert done.returncode == 1, done.stdout
    assert not (tmp_path / "pki").exists()


def test_issue_needs_something_to_issue(tmp_path: Path) -> None:
    pki.init(tmp_path, [])
    done = _kleidi("issue", "--dir", str(tmp_path))
    assert done.returncode == 2 and "--server or --client" in done.stderr
