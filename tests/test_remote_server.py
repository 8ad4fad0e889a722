"""The key server (serve_remote) as a real `kleidi serve` process on a SoftHSM2 token, talked to over mutual TLS by a
Python gRPC client speaking kleidi.remote.v1 with certificates from kleidi pki: answers, refusals, limits, rotation.
A few run the server in-process, with its connection age or limits shortened.

The key server writes one refusal line per peer address per window: each test that is refused connects from an
address of its own in 127.0.0.0/8 (_source()), so its first refusal is always written in full."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import select
import shutil
import signal
import socket
import ssl
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from kleidi import __version__, pki, remote_guard, remote_server
from kleidi.api import remote_v1_pb2, remote_v1_pb2_grpc
from kleidi.config import validate
from kleidi.server import KleidiServer
from tests.backends.softhsm import SoftHsm
from tests.conftest import pkcs11_config
from tests.plugin import KleidiProcess, free_port, wait_for

pytestmark = pytest.mark.integration

SEED = bytes(range(32))
_sources = (f"127.0.0.{n}" for n in itertools.count(10))


def _source() -> str:
    """A loopback address no other test of this module connects from."""
    return next(_sources)


@dataclass
class Served:
    port: int
    pki: Path  # ca.pem, server-ks-1*, client-cp-1* (allowed), client-cp-2* (not allowed)
    stranger: Path  # another CA, with its own client-cp-1*


@dataclass
class KeyServer(Served):
    proc: KleidiProcess


@dataclass
class InProcess(Served):
    server: KleidiServer


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
    return KeyServer(port, ours, stranger, KleidiProcess(root / "kleidi", config, env=hsm.env))


@pytest.fixture(scope="module")
def keyserver(tmp_path_factory: pytest.TempPathFactory, shared_hsm: SoftHsm) -> Iterator[KeyServer]:
    server = _key_server(tmp_path_factory.mktemp("keyserver"), shared_hsm)
    with server.proc:
        server.proc.start()
        server.proc.wait_healthy()
        yield server


def _channel(server: Served, certs: Path | None = None, client: str | None = "cp-1") -> grpc.Channel:
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
    # A connection of its own, never one another channel of the test process has open already.
    return grpc.secure_channel(f"127.0.0.1:{server.port}", credentials, [("grpc.use_local_subchannel_pool", 1)])


def _stub(channel: grpc.Channel) -> Any:
    return remote_v1_pb2_grpc.KeyServerStub(channel)  # type: ignore[no-untyped-call]


def _metric(proc: KleidiProcess, sample: str) -> float:
    """The value of one sample (name and labels, as /metrics writes them); 0 when absent."""
    return proc.metrics().get(sample, 0.0)


def _refusals(proc: KleidiProcess, source: str | None = None) -> list[dict[str, Any]]:
    """The refusal lines written in full, of connections from ``source`` when given."""
    return [
        r
        for r in proc.log_records()
        if r["msg"] == "remote connection refused" and (source is None or r["peer"].startswith(f"{source}:"))
    ]


def _summaries(proc: KleidiProcess, source: str) -> list[dict[str, Any]]:
    """The lines that count the refusals from ``source`` that were not written one by one."""
    return [
        r
        for r in proc.log_records()
        if r["msg"] == "remote connections refused, not logged one by one" and r["peer_host"] == source
    ]


def _client_context(server: Served, certs: Path | None = None, client: str | None = "cp-1") -> ssl.SSLContext:
    """What a proxy-mode plugin's TLS does: trust the key server's CA, show ``client``'s certificate from
    ``certs`` (default: ours), ask for h2."""
    context = ssl.create_default_context(cafile=server.pki / "ca.pem")
    if client is not None:
        certs = certs or server.pki
        context.load_cert_chain(certs / f"client-{client}.pem", certs / f"client-{client}-key.pem")
    context.set_alpn_protocols(["h2"])
    return context


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def _attempt(port: int, source: str, context: ssl.SSLContext | None, plaintext: bytes = b"") -> bytes:
    """One connection from ``source``: a TLS handshake with ``context`` (or ``plaintext`` sent in clear), then one
    read. Returns what was read: an accepted connection reads the gRPC server's first frame (a zero byte first), a
    refused one nothing (closed, reset, or the handshake failed)."""
    with _connect(port, source) as raw:
        try:
            if context is None:
                raw.sendall(plaintext)
                return raw.recv(1)
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return tls.recv(1)
        except (ssl.SSLError, OSError):
            return b""


def _closed(sock: socket.socket) -> bool:
    """Whether the other end closed ``sock`` (nothing is ever sent on it), without waiting."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1) == b""
    except OSError:
        return True


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
    source = _source()
    context = {
        "no client certificate": lambda: _client_context(keyserver, client=None),
        "a certificate from another CA": lambda: _client_context(keyserver, keyserver.stranger),
        "a client not on allowed_client_names": lambda: _client_context(keyserver, client="cp-2"),
        "plaintext gRPC": lambda: None,
    }[case]()
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert not _attempt(keyserver.port, source, context, plaintext=preface).startswith(b"\x00")  # no gRPC frame
    refusal = wait_for(lambda: _refusals(proc, source), 10, f"the refusal of {case} in the log")[0]
    assert refusal["level"] == "warning"
    assert reason in refusal["reason"]
    if result == "not_allowed":  # past the handshake, the certificate names who it was
        assert refusal["subject_cn"] == "cp-2" and refusal["names"] == ["cp-2"]
    assert _metric(proc, f'kleidi_remote_connections_total{{result="{result}"}}') > counted


def test_a_raw_tcp_client_gets_no_plaintext_answer(keyserver: KeyServer) -> None:
    """The TCP port speaks TLS only: an HTTP/2 preface in clear gets the connection closed, never a frame back."""
    source = _source()
    with _connect(keyserver.port, source) as raw:
        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        answer = b""
        try:
            while chunk := raw.recv(4096):
                answer += chunk
        except ConnectionResetError:  # closed with our bytes unread
            pass
    assert not answer.startswith(b"\x00")  # no HTTP/2 frame; at most a TLS alert record
    refusal = wait_for(lambda: _refusals(keyserver.proc, source), 10, "the refusal in the log")[0]
    assert "not TLS" in refusal["reason"]


def test_a_connection_that_sends_nothing_is_closed_after_the_handshake_timeout(keyserver: KeyServer) -> None:
    proc = keyserver.proc
    counted = _metric(proc, 'kleidi_remote_connections_total{result="handshake"}')
    source = _source()
    with _connect(keyserver.port, source) as raw:
        raw.settimeout(remote_server.HANDSHAKE_TIMEOUT + 10)
        opened = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert raw.recv(1) == b""
        waited = time.monotonic() - opened
    assert remote_server.HANDSHAKE_TIMEOUT - 0.5 <= waited < remote_server.HANDSHAKE_TIMEOUT + 5
    refusal = wait_for(lambda: _refusals(proc, source), 10, "the refusal in the log")[0]
    assert refusal["reason"] == f"no TLS handshake within {remote_server.HANDSHAKE_TIMEOUT:.0f}s"
    assert _metric(proc, 'kleidi_remote_connections_total{result="handshake"}') == counted + 1


def test_handshakes_beyond_the_caps_are_closed_at_once_while_valid_clients_get_through(keyserver: KeyServer) -> None:
    """Connections that send nothing, as a flood would: past the share of one address, then past the share of
    everyone, each new one is closed at once and counted, while the key server keeps serving."""
    proc = keyserver.proc

    def refused() -> tuple[float, float]:
        return (
            _metric(proc, 'kleidi_remote_connections_total{result="over_limit"}'),
            _metric(proc, 'kleidi_remote_connections_total{result="handshake"}'),
        )

    over, lost = refused()
    per_host, everyone = remote_guard.MAX_HANDSHAKES_PER_HOST, remote_guard.MAX_HANDSHAKES
    flood: list[socket.socket] = []
    # All of it must happen within one handshake timeout, before the held connections are closed by it.
    with _channel(keyserver) as before, contextlib.ExitStack() as stack:
        stub = _stub(before)
        assert stub.Status(remote_v1_pb2.StatusRequest(), timeout=5).healthz == "ok"  # open before the flood
        flooder = _source()
        flood += [stack.enter_context(_connect(keyserver.port, flooder)) for _ in range(per_host + 14)]
        wait_for(lambda: refused()[0] == over + 14, 5, "the connections past one address's share to be refused")
        with _channel(keyserver) as during:  # another address still gets a handshake
            assert _stub(during).Status(remote_v1_pb2.StatusRequest(), timeout=5).healthz == "ok"
        hosts = (everyone - per_host) // per_host + 1  # enough to fill every slot, and 16 more
        for host in [_source() for _ in range(hosts)]:
            flood += [stack.enter_context(_connect(keyserver.port, host)) for _ in range(per_host)]
        beyond = len(flood) - everyone
        wait_for(lambda: refused()[0] == over + beyond, 5, "the connections past every slot to be refused")
        wait_for(lambda: sum(map(_closed, flood)) >= beyond, 5, "the refused connections to be closed")
        assert stub.Status(remote_v1_pb2.StatusRequest(), timeout=5).healthz == "ok"  # not one of them
    # The flood gone, each of its connections is counted once, and a new client gets through.
    wait_for(lambda: sum(refused()) == over + lost + len(flood), 10, "every flood connection to be counted")
    assert refused()[0] == over + beyond
    with _channel(keyserver) as after:
        assert _stub(after).Status(remote_v1_pb2.StatusRequest(), timeout=5).healthz == "ok"


def test_a_flood_of_refusals_from_one_address_writes_few_lines_and_counts_every_one(keyserver: KeyServer) -> None:
    proc = keyserver.proc
    counted = _metric(proc, 'kleidi_remote_connections_total{result="handshake"}')
    source, flood = _source(), 50
    for _ in range(flood):
        assert not _attempt(keyserver.port, source, None, plaintext=b"GET / HTTP/1.0\r\n\r\n").startswith(b"\x00")
    wait_for(
        lambda: _metric(proc, 'kleidi_remote_connections_total{result="handshake"}') == counted + flood,
        10,
        "every refusal to be counted",
    )
    # One line in full; the others counted in a line at the end of the window (one per window they span).
    summaries = wait_for(
        lambda: (found := _summaries(proc, source)) and sum(r["refused"] for r in found) == flood - 1 and found,
        remote_guard.REFUSAL_LOG_WINDOW * 3,
        "the count of the refusals not written one by one",
    )
    full = _refusals(proc, source)
    assert len(full) == 1 and "not TLS" in full[0]["reason"]
    assert len(summaries) <= 2 and all(r["level"] == "warning" for r in summaries)
    assert {result for r in summaries for result in r["results"]} == {"handshake"}


def test_every_connection_is_a_full_handshake(keyserver: KeyServer) -> None:
    """A session from an earlier connection is not resumed: each handshake checks the client certificate."""
    context = _client_context(keyserver)
    with (
        _connect(keyserver.port) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.recv(1) == b"\x00"  # accepted: the gRPC server's first frame
        session = tls.session
    with (
        _connect(keyserver.port) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls,
    ):
        assert tls.recv(1) == b"\x00"
        assert not tls.session_reused


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
    """The serial number of the certificate a new connection gets (a full mutual TLS handshake as cp-1). Under TLS 1.3
    the client's handshake ends before the server has checked the client, so the probe waits for the gRPC server's
    first frame: by then the key server has accepted the connection and counted it."""
    context = ssl.create_default_context(cafile=server.pki / "ca.pem")
    context.load_cert_chain(server.pki / "client-cp-1.pem", server.pki / "client-cp-1-key.pem")
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert tls.recv(1) == b"\x00"  # the first byte of gRPC's SETTINGS frame
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


def test_a_changed_ca_file_is_read_again_without_restart(tmp_path: Path, softhsm: SoftHsm) -> None:
    """A second CA added to serve_remote.ca_cert (a CA rotation): its clients are refused before, taken after."""
    server = _key_server(tmp_path, softhsm)
    proc = server.proc
    with proc:
        proc.start()
        proc.wait_healthy()
        source = _source()
        assert _attempt(server.port, source, _client_context(server, server.stranger)) == b""
        refusal = wait_for(lambda: _refusals(proc, source), 10, "the stranger's refusal")[0]
        assert "client certificate not trusted" in refusal["reason"]
        ca = server.pki / "ca.pem"
        (tmp_path / "both.pem").write_bytes(ca.read_bytes() + (server.stranger / "ca.pem").read_bytes())
        shutil.move(tmp_path / "both.pem", ca)
        wait_for(
            lambda: _attempt(server.port, source, _client_context(server, server.stranger)) == b"\x00",
            10,
            "a client of the new CA to be taken",
        )
        with _channel(server, server.stranger) as channel:
            assert _stub(channel).Status(remote_v1_pb2.StatusRequest(), timeout=5).healthz == "ok"
        assert _metric(proc, 'kleidi_tls_reloads_total{result="ok",side="server"}') == 1
        with _channel(server) as ours:  # the first CA's clients too
            assert _stub(ours).Status(remote_v1_pb2.StatusRequest(), timeout=5).healthz == "ok"


def test_a_certificate_for_servers_only_is_no_client_certificate(tmp_path: Path, softhsm: SoftHsm) -> None:
    """With allowed_client_names empty, any client certificate of the CA is taken: a key server's own certificate
    (extended key usage serverAuth only) is not one."""
    server = _key_server(tmp_path, softhsm)
    proc = server.proc
    proc.config["serve_remote"] = _serve_remote(server.pki, server.port, allowed_client_names=[])
    with proc:
        proc.start()
        proc.wait_healthy()
        source = _source()
        context = _client_context(server, client=None)
        context.load_cert_chain(server.pki / "server-ks-1.pem", server.pki / "server-ks-1-key.pem")
        assert _attempt(server.port, source, context) == b""
        refusal = wait_for(lambda: _refusals(proc, source), 10, "the refusal in the log")[0]
        assert refusal["reason"] == "client certificate not trusted: unsuitable certificate purpose"
        assert _metric(proc, 'kleidi_remote_connections_total{result="handshake"}') == 1
        with _channel(server, client="cp-2") as channel:  # on no list, but a client certificate: taken
            assert _stub(channel).Status(remote_v1_pb2.StatusRequest(), timeout=5).healthz == "ok"


def _unix_socket(path: Path, listening: bool) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    if listening:
        sock.listen()
    return sock


def test_private_directories_left_by_a_killed_key_server_are_removed_at_start(tmp_path: Path, softhsm: SoftHsm) -> None:
    server = _key_server(tmp_path, softhsm)
    run = Path(server.proc.socket).parent
    run.mkdir(parents=True)
    long_ago = time.time() - 3600
    made: dict[str, Path] = {}

    def private(name: str, socket_listening: bool | None = False, owner: int | None = None) -> Path:
        directory = run / f"kleidi-remote-{name}"
        directory.mkdir(mode=0o700)
        if socket_listening is not None:
            stack.enter_context(_unix_socket(directory / "s", socket_listening))
        if owner is not None:
            os.chown(directory, owner, -1)
        os.utime(directory, (long_ago, long_ago))
        made[name] = directory
        return directory

    with contextlib.ExitStack() as stack:
        private("stale")  # its socket refuses a connect: its kleidi is gone
        private("empty", socket_listening=None)  # made, never bound (killed right after the mkdtemp)
        private("serving", socket_listening=True)  # another kleidi, running
        starting = private("starting")  # another kleidi, locked but not listening yet
        lock = os.open(starting, os.O_RDONLY | os.O_DIRECTORY)
        stack.callback(os.close, lock)
        fcntl.flock(lock, fcntl.LOCK_EX)
        young = private("young", socket_listening=None)  # another kleidi, just made
        os.utime(young)
        private("foreign", owner=os.geteuid() + 4242)  # another user's
        (private("more") / "notes").write_text("not a private directory as kleidi makes them")
        (run / "kleidi-remote-file").write_text("not a directory")

        with server.proc:
            server.proc.start()
            gone = {name for name, path in made.items() if not path.exists()}
            assert gone == {"stale", "empty"}
            assert (run / "kleidi-remote-file").exists()
            removed = [
                r["directory"]
                for r in server.proc.log_records()
                if r["msg"] == "removed a private socket directory a stopped kleidi left"
            ]
            assert sorted(removed) == [str(made["empty"]), str(made["stale"])]
            own = [path for path in run.glob("kleidi-remote-*/") if path not in made.values()]
            assert len(own) == 1
            with _channel(server) as channel:
                assert _stub(channel).Status(remote_v1_pb2.StatusRequest(), timeout=5).healthz == "ok"
            # Killed, it leaves its own behind; the next start removes it.
            assert server.proc.stop(signal.SIGKILL) == -signal.SIGKILL
            assert own[0].exists()
            server.proc.start()
            assert not own[0].exists()
            assert made["serving"].exists() and made["starting"].exists()


@contextlib.contextmanager
def _in_process(tmp_path: Path, softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch) -> Iterator[InProcess]:
    """A key server in this process (so a test can shorten its module constants first), on a real token."""
    ours, stranger = _pki(tmp_path)
    port = free_port()
    monkeypatch.setenv("SOFTHSM2_CONF", str(softhsm.conf))
    config = {
        **pkcs11_config(softhsm),
        "listen": f"unix://{tmp_path}/run/kleidi.sock",
        "serve_remote": _serve_remote(ours, port),
    }
    server = KleidiServer(validate(config))
    server.start()
    try:
        yield InProcess(port, ours, stranger, server)
    finally:
        server.stop()


def _logged_refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The reasons of the refusals an in-process key server wrote in full."""
    return [getattr(r, "reason", "") for r in caplog.records if r.getMessage() == "remote connection refused"]


def _count(server: KleidiServer, result: str) -> float:
    value = server.metrics.registry.get_sample_value("kleidi_remote_connections_total", {"result": result})
    return value or 0.0


def test_open_connections_are_renewed_and_a_reissued_ca_reaches_them(
    tmp_path: Path, softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(remote_server, "CONNECTION_AGE", 1.0)
    monkeypatch.setattr(remote_server, "CONNECTION_AGE_GRACE", 1.0)
    caplog.set_level(logging.INFO, logger="kleidi")
    with _in_process(tmp_path, softhsm, monkeypatch) as keyserver, _channel(keyserver) as channel:
        server = keyserver.server
        stub = _stub(channel)
        first = _count(server, "accepted")
        calls = 0

        def renewed() -> bool:
            nonlocal calls  # every call must succeed: a renewal is invisible to the client
            blob = stub.Encrypt(remote_v1_pb2.EncryptRequest(plaintext=SEED), timeout=5)
            request = remote_v1_pb2.DecryptRequest(ciphertext=blob.ciphertext, key_id=blob.key_id)
            assert stub.Decrypt(request, timeout=5).plaintext == SEED
            calls += 1
            return _count(server, "accepted") >= first + 3

        wait_for(renewed, 30, "the open connection to be renewed three times")
        assert calls > 3

        # The CA re-issued: the key server now trusts only the new one. The channel, open all along, is refused
        # at its next renewal.
        shutil.copy(keyserver.stranger / "ca.pem", keyserver.pki / "ca.pem")

        def refused() -> bool:
            try:
                stub.Status(remote_v1_pb2.StatusRequest(), timeout=2)
            except grpc.RpcError as error:
                return bool(error.code() == grpc.StatusCode.UNAVAILABLE)
            return False

        wait_for(refused, 15, "the open connection to be refused after the CA changed")
        wait_for(
            lambda: any(reason.startswith("client certificate not trusted") for reason in _logged_refusals(caplog)),
            5,
            "the refusal in the log",
        )


def test_connections_beyond_the_open_limit_are_closed_at_once(
    tmp_path: Path, softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(remote_guard, "MAX_CONNECTIONS", 2)
    with _in_process(tmp_path, softhsm, monkeypatch) as keyserver, contextlib.ExitStack() as stack:
        server = keyserver.server
        context = _client_context(keyserver)
        held = []
        for _ in range(2):
            raw = stack.enter_context(_connect(keyserver.port))
            held.append(stack.enter_context(context.wrap_socket(raw, server_hostname="127.0.0.1")))
            assert held[-1].recv(1) == b"\x00"  # accepted, spliced
        assert _attempt(keyserver.port, "127.0.0.1", context) == b""
        assert wait_for(lambda: _logged_refusals(caplog), 5, "the refusal in the log") == [
            "2 connections open, the most serve_remote holds"
        ]
        assert _count(server, "over_limit") == 1
        held.pop().close()
        registry = server.metrics.registry
        wait_for(
            lambda: registry.get_sample_value("kleidi_remote_connections_open") == 1,
            10,
            "the closed connection to be let go",
        )
        assert _attempt(keyserver.port, "127.0.0.1", context) == b"\x00"  # room for one more
        assert _count(server, "over_limit") == 1
