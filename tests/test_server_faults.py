"""The server in-process with fault-injecting providers: what the apiserver sees when a backend misbehaves."""

from __future__ import annotations

import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import pytest

from kleidi.client import KmsClient
from kleidi.config import Config, validate
from kleidi.errors import BackendUnavailable
from kleidi.providers.base import Wrapped
from kleidi.server import KleidiServer
from tests.plugin import wait_for

pytestmark = pytest.mark.unit


class FaultyProvider:
    """Wraps by XOR with a fixed pad; each fault is switched on by the test."""

    name = "faulty"
    inline_safe = False

    def __init__(self) -> None:
        self.check_blocks = threading.Event()
        self.release = threading.Event()
        self.stuck = threading.Event()
        self.encrypt_blocks = False
        self.crash = False
        self.oversize = False
        self.annotations: dict[str, bytes] = {}
        self.unavailable = False
        self.deadlines: list[float | None] = []
        self.decrypts = 0

    def key_id(self) -> str:
        return "faulty-key-1"

    def encrypt(self, plaintext: bytes, uid: str, deadline: float | None = None) -> Wrapped:
        self.deadlines.append(deadline)
        if self.encrypt_blocks:
            self.stuck.set()
            self.release.wait(30)
        if self.crash:
            raise RuntimeError("secret-detail-that-must-not-leak")
        if self.unavailable:
            raise BackendUnavailable("backend down for the test")
        body = bytes(b ^ 0x5A for b in plaintext)
        return Wrapped(body * (40 if self.oversize else 1), self.key_id(), self.annotations)

    def decrypt(
        self, ciphertext: bytes, key_id: str, annotations: Mapping[str, bytes], uid: str, deadline: float | None = None
    ) -> bytes:
        self.decrypts += 1
        return bytes(b ^ 0x5A for b in ciphertext)

    def check(self) -> None:
        if self.check_blocks.is_set():
            self.stuck.set()
            self.release.wait(30)

    def close(self) -> None:
        self.release.set()


def _config(tmp_path: Path, **settings: object) -> Config:
    return validate(
        {
            "provider": "pkcs11",
            "listen": f"unix://{tmp_path}/run/k.sock",
            "metrics_listen": "127.0.0.1:0",
            "health_interval": "100ms",
            "health_timeout": "1500ms",
            "pkcs11": {"token_label": "t", "pin_env": "UNUSED", "key_label": "k", "session_timeout": "500ms"},
            **settings,
        }
    )


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[KleidiServer, FaultyProvider, KmsClient]]:
    provider = FaultyProvider()
    config = _config(tmp_path)
    server = KleidiServer(config, provider)
    server.start()
    server.health.wait_first(5)
    client = KmsClient(config.listen, timeout=2)
    yield server, provider, client
    client.close()
    server.stop()


def test_status_never_waits_for_a_hung_backend(running: tuple[KleidiServer, FaultyProvider, KmsClient]) -> None:
    _, provider, client = running
    provider.check_blocks.set()
    assert provider.stuck.wait(5)  # the health loop is now stuck inside check()
    started = time.monotonic()
    for _ in range(50):
        assert client.status().healthz == "ok"  # the last finished check was fine
    assert time.monotonic() - started < 1.0
    provider.release.set()


def test_a_crashing_provider_gives_internal_without_details(
    running: tuple[KleidiServer, FaultyProvider, KmsClient],
) -> None:
    _, provider, client = running
    provider.crash = True
    with pytest.raises(grpc.RpcError) as info:
        client.encrypt(os.urandom(32))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "secret-detail" not in info.value.details()
    provider.crash = False
    seed = os.urandom(32)
    assert client.decrypt(client.encrypt(seed).ciphertext) == seed


def test_answers_that_break_the_contract_are_not_passed_on(
    running: tuple[KleidiServer, FaultyProvider, KmsClient],
) -> None:
    _, provider, client = running
    provider.oversize = True
    with pytest.raises(grpc.RpcError) as info:
        client.encrypt(os.urandom(32))
    assert "over the 1024-byte limit" in info.value.details()


def test_a_providers_annotations_reach_the_caller_and_none_is_added(
    running: tuple[KleidiServer, FaultyProvider, KmsClient],
) -> None:
    _, provider, client = running
    assert dict(client.encrypt(os.urandom(32)).annotations) == {}
    provider.annotations = {"version.faulty.kleidi.io": b"1", "key.faulty.kleidi.io": b"\x00\x01"}
    assert dict(client.encrypt(os.urandom(32)).annotations) == provider.annotations


def test_unavailable_backend_maps_to_unavailable_and_the_deadline_reaches_the_provider(
    running: tuple[KleidiServer, FaultyProvider, KmsClient],
) -> None:
    _, provider, client = running
    provider.unavailable = True
    with pytest.raises(grpc.RpcError) as info:
        client.encrypt(os.urandom(32))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "backend down for the test" in info.value.details()
    deadline = provider.deadlines[-1]
    # the provider got the caller's 2 s deadline (give or take scheduling), not none and not its own
    assert deadline is not None and 0 < deadline - time.monotonic() <= 2.1


def test_stop_releases_everything(tmp_path: Path, running: tuple[KleidiServer, FaultyProvider, KmsClient]) -> None:
    server, provider, _ = running
    server.stop()
    assert not os.path.exists(server.config.socket_path)
    assert provider.release.is_set()


def test_a_hung_backend_call_does_not_stall_status(running: tuple[KleidiServer, FaultyProvider, KmsClient]) -> None:
    _, provider, client = running
    provider.encrypt_blocks = True
    answers: list[object] = []
    hung = threading.Thread(target=lambda: answers.append(client.encrypt(b"s" * 32).ciphertext))
    hung.start()
    assert provider.stuck.wait(5)  # a worker thread is now inside encrypt() and will not come back soon
    started = time.monotonic()
    assert client.status().healthz == "ok"
    assert client.decrypt(bytes(b ^ 0x5A for b in b"k" * 32)) == b"k" * 32
    assert time.monotonic() - started < 1.0
    provider.release.set()
    hung.join(10)
    assert answers == [bytes(b ^ 0x5A for b in b"s" * 32)]  # the hung call still completes once released


def test_a_hung_health_check_turns_status_unhealthy(running: tuple[KleidiServer, FaultyProvider, KmsClient]) -> None:
    _, provider, client = running
    provider.check_blocks.set()
    assert provider.stuck.wait(5)
    assert client.status().healthz == "ok"  # within health_timeout (1.5 s) the last answer stands
    status = wait_for(lambda: (s := client.status()).healthz != "ok" and s, 5, "Status to report the hang")
    assert status.healthz.startswith("backend check has not returned for") and status.key_id == "faulty-key-1"
    provider.check_blocks.clear()
    provider.release.set()
    wait_for(lambda: client.status().healthz == "ok", 5, "recovery once the check returns")


def test_requests_whose_deadline_passed_in_the_queue_never_reach_the_backend(tmp_path: Path) -> None:
    provider = FaultyProvider()
    server = KleidiServer(_config(tmp_path, workers=1), provider)
    server.start()
    try:
        with KmsClient(server.config.listen, timeout=5) as slow, KmsClient(server.config.listen, timeout=0.3) as hasty:
            provider.encrypt_blocks = True
            hung = threading.Thread(target=lambda: slow.encrypt(b"s" * 32))
            hung.start()
            assert provider.stuck.wait(5)  # the only worker is busy
            calls_before = len(provider.deadlines)
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as info:
                    hasty.encrypt(b"t" * 32)
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            provider.encrypt_blocks = False
            provider.release.set()
            hung.join(10)
            assert slow.decrypt(slow.encrypt(b"u" * 32).ciphertext) == b"u" * 32
            assert len(provider.deadlines) == calls_before + 1  # only the last, fresh call reached the provider

            def given_up() -> float:  # cancelled by gRPC at the deadline, or refused by the worker after it
                sample = server.metrics.registry.get_sample_value
                labels = {"api": "v2", "method": "Encrypt"}
                return sum(
                    sample("kleidi_requests_total", {**labels, "code": c}) or 0 for c in ("CANCELLED", "UNAVAILABLE")
                )

            wait_for(lambda: given_up() == 3, 5, "the given-up calls counted as not OK")
    finally:
        server.stop()


def test_oversized_plaintext_is_the_callers_error(running: tuple[KleidiServer, FaultyProvider, KmsClient]) -> None:
    _, _, client = running
    with pytest.raises(grpc.RpcError) as info:
        client.encrypt(os.urandom(600))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 512" in info.value.details()


@pytest.mark.parametrize("size", [1025, 60_000])
def test_a_ciphertext_larger_than_any_of_kleidis_never_reaches_the_backend(
    running: tuple[KleidiServer, FaultyProvider, KmsClient], size: int
) -> None:
    _, provider, client = running
    for decrypt in (lambda blob: client.decrypt(blob, "faulty-key-1"), client.v1_decrypt):
        with pytest.raises(grpc.RpcError) as info:
            decrypt(os.urandom(size))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"ciphertext is {size} bytes; kleidi's are at most 1024" in info.value.details()
    assert provider.decrypts == 0
    assert (
        client.decrypt(bytes(b ^ 0x5A for b in b"k" * 1024), "faulty-key-1") == b"k" * 1024
    )  # the limit itself is fine


def _probe(server: KleidiServer, path: str) -> tuple[int, str]:
    assert server._probes is not None
    host, port = server._probes.address[:2]
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=2) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


def test_a_removed_socket_directory_turns_readiness_false_until_the_socket_is_back(
    running: tuple[KleidiServer, FaultyProvider, KmsClient], caplog: pytest.LogCaptureFixture
) -> None:
    server, _, connected = running
    assert connected.status().healthz == "ok"  # a connection made before, as an apiserver's
    socket_dir = Path(server.config.socket_path).parent
    assert _probe(server, "/readyz")[0] == 200
    shutil.rmtree(socket_dir)
    socket_dir.write_text("in the way")  # so the socket cannot be made again yet
    _, reason = wait_for(lambda: (p := _probe(server, "/readyz"))[0] == 503 and p, 5, "readiness to drop")
    assert "is gone and cannot be re-created" in reason and server.config.socket_path in reason
    assert _probe(server, "/healthz")[0] == 503
    socket_dir.unlink()
    wait_for(lambda: _probe(server, "/readyz")[0] == 200, 5, "readiness once the socket is back")
    with KmsClient(server.config.listen, timeout=2) as fresh:  # a new connection reaches the new socket
        assert fresh.status().healthz == "ok"
        assert fresh.decrypt(fresh.encrypt(b"k" * 32).ciphertext) == b"k" * 32
    assert os.stat(server.config.socket_path).st_mode & 0o777 == server.config.socket_mode
    assert connected.decrypt(connected.encrypt(b"o" * 32).ciphertext) == b"o" * 32  # still served all along
    messages = [r.getMessage() for r in caplog.records if r.name == "kleidi.server"]
    assert any(m.startswith("socket gone") for m in messages)
    assert any(m.startswith("socket re-created") for m in messages)
