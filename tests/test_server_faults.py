"""The server in-process with fault-injecting providers: what the apiserver sees when a backend misbehaves."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import pytest

from kleidi.client import KmsClient
from kleidi.config import validate
from kleidi.errors import BackendUnavailable
from kleidi.providers.base import Wrapped
from kleidi.server import KleidiServer


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
        self.unavailable = False
        self.deadlines: list[float | None] = []

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
        return Wrapped(body * (40 if self.oversize else 1), self.key_id())

    def decrypt(
        self, ciphertext: bytes, key_id: str, annotations: Mapping[str, bytes], uid: str, deadline: float | None = None
    ) -> bytes:
        return bytes(b ^ 0x5A for b in ciphertext)

    def check(self) -> None:
        if self.check_blocks.is_set():
            self.stuck.set()
            self.release.wait(30)

    def close(self) -> None:
        self.release.set()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[KleidiServer, FaultyProvider, KmsClient]]:
    provider = FaultyProvider()
    config = validate(
        {
            "provider": "pkcs11",
            "listen": f"unix://{tmp_path}/run/k.sock",
            "metrics_listen": "127.0.0.1:0",
            "health_interval": "100ms",
            "pkcs11": {"token_label": "t", "pin_env": "UNUSED", "key_label": "k"},
        }
    )
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
