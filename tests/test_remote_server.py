"""The key server (serve_remote) as a real `kleidi serve` process on a SoftHSM2 token, talked to over mutual TLS by a
Python gRPC client speaking kleidi.remote.v1 with certificates from kleidi pki: answers, refusals, rotation."""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from kleidi import __version__, pki
from kleidi.api import remote_v1_pb2, remote_v1_pb2_grpc
from tests.backends.softhsm import SoftHsm
from tests.conftest import pkcs11_config
from tests.plugin import KleidiProcess, free_port, wait_for

pytestmark = pytest.mark.integration

SEED = bytes(range(32))


@dataclass
class KeyServer:
    proc: KleidiProcess
    port: int
    pki: Path  # ca.pem, server-ks-1*, client-cp-1* (allowed), client-cp-2* (not allowed)
    stranger: Path  # another CA, with its own client-cp-1*


def _pki(root: Path) -> tuple[Path, Path]:
    ours, stranger = root / "pki", root / "stranger"
    pki.init(
        ours,
        [pki.Request("server", "ks-1", ("127.0.0.1",)), pki.Request("client", "cp-1"), pki.Request("client", "cp-2")],
    )
    pki.init(stranger, [pki.Request("client", "cp-1")], ca_name="stranger CA")
    return ours, stranger


def _serve_remote(certs: Path, port: int, **changes: Any) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{port}",
        "ca_cert": str(certs / "ca.pem"),
        "cert": str(certs / "server-ks-1.pem"),
        "key": str(certs / "server-ks-1-key.pem"),
        "allowed_client_names": ["cp-1"],
        **changes,
    }


def _key_server(root: Path, hsm: SoftHsm) -> KeyServer:
    ours, stranger = _pki(root)
    port = free_port()
    config = {**pkcs11_config(hsm), "serve_remote": _serve_remote(ours, port)}
    return KeyServer(KleidiProcess(root / "kleidi", config, env=hsm.env), port, ours, stranger)


@pytest.fixture(scope="module")
def keyserver(tmp_path_factory: pytest.TempPathFactory, shared_hsm: SoftHsm) -> Iterator[KeyServer]:
    server = _key_server(tmp_path_factory.mktemp("keyserver"), shared_hsm)
    with server.proc:
        server.proc.start()
        server.proc.wait_healthy()
        yield server


def _channel(server: KeyServer, certs: Path | None = None, client: str | None = "cp-1") -> grpc.Channel:
    """A channel that trusts the key server's CA, with ``client``'s certificate from ``certs`` (default: ours)."""
    certs = certs or server.pki
    if client is None:
        credentials = grpc.ssl_channel_credentials((server.pki / "ca.pem").read_bytes())
    else:
        credentials = grpc.ssl_channel_credentials(
            (server.pki / "ca.pem").read_bytes(),
            (certs / f"client-{client}-key.pem").read_bytes(),
            (certs / f"client-{client}.pem").read_bytes(),
        )
    return grpc.secure_channel(f"127.0.0.1:{server.port}", credentials)


def _stub(channel: grpc.Channel) -> Any:
    return remote_v1_pb2_grpc.KeyServerStub(channel)  # type: ignore[no-untyped-call]


def _metric(proc: KleidiProcess, sample: str) -> float:
    """The value of one sample (name and labels, as /metrics writes them); 0 when absent."""
    status, text = proc.http("/metrics")
    assert status == 200
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _refusals(proc: KleidiProcess) -> list[dict[str, Any]]:
    return [r for r in proc.log_records() if r["msg"] == "remote connection refused"]


def test_round_trip_passes_the_providers_answers_through_unchanged(keyserver: KeyServer) -> None:
    with _channel(keyserver) as channel, keyserver.proc.client() as kms:
        stub = _stub(channel)
        local_status = kms.status()
        status = stub.Status(remote_v1_pb2.StatusRequest(), timeout=5)
        assert (status.healthz, status.server_version) == ("ok", __version__)
        assert status.key_id == local_status.key_id and status.key_id.startswith("pkcs11:aes-gcm:kek-1:")

        remote = stub.Encrypt(remote_v1_pb2.EncryptRequest(plaintext=SEED, uid="remote-1"), timeout=5)
        local = kms.encrypt(SEED, uid="local-1")
        assert remote.key_id == local.key_id == local_status.key_id
        assert dict(remote.annotations) == dict(local.annotations)
        # The key server's own socket reads what the remote API made, and the other way round.
        assert kms.decrypt(remote.ciphertext, remote.key_id, dict(remote.annotations)) == SEED
        request = remote_v1_pb2.DecryptRequest(
            ciphertext=local.ciphertext, key_id=local.key_id, annotations=dict(local.annotations), uid="remote-2"
        )
        assert stub.Decrypt(request, timeout=5).plaintext == SEED
        # KMS v1 calls (no key_id) go through too.
        assert stub.Decrypt(remote_v1_pb2.DecryptRequest(ciphertext=kms.v1_encrypt(SEED)), timeout=5).plaintext == SEED
    proc = keyserver.proc
    assert _metric(proc, 'kleidi_requests_total{api="remote",code="OK",method="Encrypt"}') >= 1
    assert _metric(proc, 'kleidi_requests_total{api="remote",code="OK",method="Decrypt"}') >= 2
    accepted = [r for r in proc.log_records() if r["msg"] == "remote connection accepted"]
    assert accepted and accepted[-1]["subject_cn"] == "cp-1" and accepted[-1]["names"] == ["cp-1"]
    assert accepted[-1]["peer"].startswith("127.0.0.1:")
    assert _metric(proc, 'kleidi_remote_connections_total{result="accepted"}') >= 1
    serving = next(r for r in proc.log_records() if r["msg"] == "serving")
    assert serving["remote"] == f"127.0.0.1:{keyserver.port}"


def test_errors_carry_the_status_and_the_error_kind(keyserver: KeyServer) -> None:
    with _channel(keyserver) as channel:
        stub = _stub(channel)
        good = stub.Encrypt(remote_v1_pb2.EncryptRequest(plaintext=SEED), timeout=5)
        tampered = bytearray(good.ciphertext)
        tampered[-1] ^= 1
        cases = {b"not a kleidi blob": "invalid_input", bytes(tampered): "integrity"}
        for ciphertext, kind in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                stub.Decrypt(remote_v1_pb2.DecryptRequest(ciphertext=ciphertext, key_id=good.key_id), timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert dict(info.value.trailing_metadata())["kleidi-error-kind"] == kind
        with pytest.raises(grpc.RpcError) as info:
            stub.Encrypt(remote_v1_pb2.EncryptRequest(plaintext=b""), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(info.value.trailing_metadata())["kleidi-error-kind"] == "invalid_input"
    assert _metric(keyserver.proc, 'kleidi_requests_total{api="remote",code="INVALID_ARGUMENT",method="Decrypt"}') >= 2


@pytest.mark.parametrize(
    ("case", "result", "reason"),
    [
        ("no client certificate", "handshake", "no client certificate"),
        ("a certificate from another CA", "handshake", "client certificate not trusted"),
        ("a client not on allowed_client_names", "not_allowed", "not on serve_remote.allowed_client_names"),
        ("plaintext gRPC", "handshake", "not TLS"),
    ],
)
def test_refused_connections_are_logged_with_the_peer_and_counted(
    keyserver: KeyServer, case: str, result: str, reason: str
) -> None:
    proc = keyserver.proc
    counted = _metric(proc, f'kleidi_remote_connections_total{{result="{result}"}}')
    logged = len(_refusals(proc))
    channel = {
        "no client certificate": lambda: _channel(keyserver, client=None),
        "a certificate from another CA": lambda: _channel(keyserver, keyserver.stranger),
        "a client not on allowed_client_names": lambda: _channel(keyserver, client="cp-2"),
        "plaintext gRPC": lambda: grpc.insecure_channel(f"127.0.0.1:{keyserver.port}"),
    }[case]()
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            _stub(channel).Status(remote_v1_pb2.StatusRequest(), timeout=3)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    refusal = wait_for(lambda: _refusals(proc)[logged:], 10, f"the refusal of {case} in the log")[0]
    assert refusal["level"] == "warning"
    assert refusal["peer"].startswith("127.0.0.1:")
    assert reason in refusal["reason"]
    if result == "not_allowed":  # past the handshake, the certificate names who it was
        assert refusal["subject_cn"] == "cp-2" and refusal["names"] == ["cp-2"]
    assert _metric(proc, f'kleidi_remote_connections_total{{result="{result}"}}') > counted


def test_a_raw_tcp_client_gets_no_plaintext_answer(keyserver: KeyServer) -> None:
    """The TCP port speaks TLS only: an HTTP/2 preface in clear gets the connection closed, never a frame back."""
    logged = len(_refusals(keyserver.proc))
    with socket.create_connection(("127.0.0.1", keyserver.port), timeout=5) as raw:
        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        answer = b""
        try:
            while chunk := raw.recv(4096):
                answer += chunk
        except ConnectionResetError:  # closed with our bytes unread
            pass
    assert not answer.startswith(b"\x00")  # no HTTP/2 frame; at most a TLS alert record
    refusal = wait_for(lambda: _refusals(keyserver.proc)[logged:], 10, "the refusal in the log")[0]
    assert "not TLS" in refusal["reason"]


def test_the_internal_socket_is_private_and_stop_closes_everything(tmp_path: Path, softhsm: SoftHsm) -> None:
    server = _key_server(tmp_path, softhsm)
    run = Path(server.proc.socket).parent
    with server.proc, _channel(server) as channel:
        server.proc.start()
        private = [path for path in run.iterdir() if path.name.startswith("kleidi-remote-")]
        assert len(private) == 1
        info = private[0].stat()
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.geteuid()
        stub = _stub(channel)
        assert stub.Status(remote_v1_pb2.StatusRequest(), timeout=5).server_version == __version__
        assert _metric(server.proc, "kleidi_remote_connections_open") == 1
        # An open client connection neither holds the stop up nor survives it.
        assert server.proc.stop(timeout=10) == 0
        assert not private[0].exists()
        with pytest.raises(grpc.RpcError) as closed:
            stub.Status(remote_v1_pb2.StatusRequest(), timeout=2)
        assert closed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "stopped" in [r["msg"] for r in server.proc.log_records()]


def _served_serial(server: KeyServer) -> int:
    """The serial number of the certificate a new connection gets (a full mutual TLS handshake as cp-1)."""
    context = ssl.create_default_context(cafile=server.pki / "ca.pem")
    context.load_cert_chain(server.pki / "client-cp-1.pem", server.pki / "client-cp-1-key.pem")
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_certificate_rotation_on_disk(tmp_path: Path, softhsm: SoftHsm) -> None:
    server = _key_server(tmp_path, softhsm)
    proc = server.proc
    cert, key = server.pki / "server-ks-1.pem", server.pki / "server-ks-1-key.pem"
    with proc, _channel(server) as old:
        proc.start()
        proc.wait_healthy()
        first = _serial(cert)
        assert _served_serial(server) == first
        stub = _stub(old)
        blob = stub.Encrypt(remote_v1_pb2.EncryptRequest(plaintext=SEED), timeout=5)

        # A bad rewrite (garbage where the certificate was) is logged and the old certificate kept.
        good = cert.read_bytes()
        cert.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
        # The files are looked at before a handshake (at most once a second): each probe is one.
        wait_for(
            lambda: (
                _served_serial(server) == first
                and _metric(proc, 'kleidi_tls_reloads_total{result="error",side="server"}') == 1
            ),
            10,
            "the bad rewrite to be looked at",
        )
        bad = [r for r in proc.log_records() if r["msg"].startswith("certificate files changed but cannot be loaded")]
        assert len(bad) == 1 and bad[0]["level"] == "warning"
        assert f"serve_remote.cert: {cert} is not a PEM certificate" in bad[0]["reason"]
        assert _served_serial(server) == first
        cert.write_bytes(good)  # back as it was: a reload of the same certificate

        # The rotation: a new certificate and key from the same CA, moved into place.
        pki.issue(server.pki, [pki.Request("server", "ks-1", ("127.0.0.1",))], out=tmp_path / "next")
        second = _serial(tmp_path / "next" / "server-ks-1.pem")
        assert second != first
        shutil.move(tmp_path / "next" / "server-ks-1-key.pem", key)
        shutil.move(tmp_path / "next" / "server-ks-1.pem", cert)
        wait_for(lambda: _served_serial(server) == second, 10, "new connections to get the new certificate")
        assert _metric(proc, 'kleidi_tls_reloads_total{result="ok",side="server"}') >= 1
        assert any(r["msg"].startswith("certificate files re-read") for r in proc.log_records())

        # The connection made before the rotation is still the same one, and still answers.
        opened_before = _metric(proc, 'kleidi_remote_connections_total{result="accepted"}')
        request = remote_v1_pb2.DecryptRequest(ciphertext=blob.ciphertext, key_id=blob.key_id)
        assert stub.Decrypt(request, timeout=5).plaintext == SEED
        assert _metric(proc, 'kleidi_remote_connections_total{result="accepted"}') == opened_before
        with _channel(server) as new:
            assert _stub(new).Decrypt(request, timeout=5).plaintext == SEED


@pytest.mark.parametrize("setting", ["ca_cert", "cert", "key"])
def test_a_missing_certificate_file_stops_the_start_naming_the_setting(
    tmp_path: Path, softhsm: SoftHsm, setting: str
) -> None:
    server = _key_server(tmp_path, softhsm)
    missing = tmp_path / "absent.pem"
    server.proc.config["serve_remote"] = _serve_remote(server.pki, server.port, **{setting: str(missing)})
    server.proc.start(wait=False)
    assert server.proc.wait_exit() == 1
    assert f"serve_remote.{setting}: cannot read {missing}: No such file or directory" in server.proc.log()
    assert not Path(server.proc.socket).parent.exists()  # checked before anything was made


def test_a_port_in_use_stops_the_start_naming_the_setting(tmp_path: Path, softhsm: SoftHsm) -> None:
    server = _key_server(tmp_path, softhsm)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", server.port))
        taken.listen()
        server.proc.start(wait=False)
        assert server.proc.wait_exit() == 1
    assert not [path for path in Path(server.proc.socket).parent.iterdir() if path.name.startswith("kleidi-remote-")]
    assert f"serve_remote.listen: cannot listen on 127.0.0.1:{server.port}: Address already in use" in server.proc.log()
