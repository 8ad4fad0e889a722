"""The proxy-mode client (provider: remote) against in-process key servers that can be told to fail, hang or
report another key_id: failover order and deadlines, error mapping, the key_id agreement rule, health,
certificate rotation on disk and metrics. Real mutual TLS throughout, with certificates from kleidi.pki."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from kleidi import pki
from kleidi.api import remote_v1_pb2, remote_v1_pb2_grpc
from kleidi.config import RemoteConfig
from kleidi.errors import (
    BackendUnavailable,
    ConfigError,
    DeadlinePassed,
    IntegrityError,
    InvalidInput,
    KeyNotFound,
    KleidiError,
)
from kleidi.health import HealthMonitor
from kleidi.observability import Metrics, key_id_hash
from kleidi.providers.remote import ERROR_KIND, RemoteProvider
from tests.plugin import free_port, wait_for

pytestmark = pytest.mark.unit

KEK_1 = "kek-one:v1"
KEK_2 = "kek-two:v1"


class FakeKeyServer(remote_v1_pb2_grpc.KeyServerServicer):
    """A key server's answers, without a backend: blobs are the plaintext behind a marker naming the KEK."""

    def __init__(self, key_id: str = KEK_1) -> None:
        self.key_id = key_id
        self.healthz = "ok"
        self.fail: dict[str, tuple[grpc.StatusCode, str]] = {}  # method -> (code, error kind)
        self.hang: set[str] = set()
        self.encrypt_key_id = ""  # when set, Encrypt answers this key_id instead of the one Status reports
        self.calls: list[tuple[str, str]] = []  # (method, the client certificate's CN)
        self.release = threading.Event()

    def _enter(self, method: str, context: Any) -> None:
        names = context.auth_context().get("x509_common_name") or [b""]
        self.calls.append((method, names[0].decode()))
        if method in self.hang:
            while context.is_active() and not self.release.wait(0.02):
                pass
        if method in self.fail:
            code, kind = self.fail[method]
            context.set_trailing_metadata(((ERROR_KIND, kind),))
            context.abort(code, f"fake {kind} in {method}")

    def called(self, method: str) -> int:
        return sum(m == method for m, _ in self.calls)

    def Status(self, request: Any, context: Any) -> Any:
        self._enter("Status", context)
        return remote_v1_pb2.StatusResponse(healthz=self.healthz, key_id=self.key_id, server_version="fake")

    def Encrypt(self, request: Any, context: Any) -> Any:
        self._enter("Encrypt", context)
        key_id = self.encrypt_key_id or self.key_id
        return remote_v1_pb2.EncryptResponse(
            ciphertext=f"wrapped:{key_id}:".encode() + request.plaintext,
            key_id=key_id,
            annotations={"fake.kleidi.io/uid": request.uid.encode()},
        )

    def Decrypt(self, request: Any, context: Any) -> Any:
        self._enter("Decrypt", context)
        marker = f"wrapped:{self.key_id}:".encode()
        if not request.ciphertext.startswith(marker) or request.annotations.get("fake.kleidi.io/uid") is None:
            context.set_trailing_metadata(((ERROR_KIND, "integrity"),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ciphertext failed authentication")
        return remote_v1_pb2.DecryptResponse(plaintext=request.ciphertext[len(marker) :])


class KeyServer:
    """A gRPC server with mutual TLS (client certificate required) serving a FakeKeyServer on a fixed port, so
    that it can be stopped and come back where the client expects it."""

    def __init__(self, certs: Path, key_id: str = KEK_1) -> None:
        self.certs = certs
        self.fake = FakeKeyServer(key_id)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._server: Any = None

    def start(self, server_certs: Path | None = None) -> KeyServer:
        """``server_certs``: where the server certificate comes from (another CA's directory), when not the
        directory whose CA the client certificates chain to."""
        cert, key = pki.leaf_files(server_certs or self.certs, "server", "keyserver")
        credentials = grpc.ssl_server_credentials(
            [(key.read_bytes(), cert.read_bytes())],
            root_certificates=(self.certs / pki.CA_CERT).read_bytes(),
            require_client_auth=True,
        )
        # No SO_REUSEPORT (gRPC's default): a port another process listens on must fail here, not be shared with it
        # so that the kernel hands some of the client's connections to a server with other certificates.
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=[("grpc.so_reuseport", 0)])
        remote_v1_pb2_grpc.add_KeyServerServicer_to_server(self.fake, self._server)
        self._server.add_secure_port(self.address, credentials)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self.fake.release.set()
            self._server.stop(0).wait()
            self._server = None
            self.fake.release.clear()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A proxy-mode CA with a key server certificate for 127.0.0.1 and client certificates cp-1 and cp-2."""
    root = tmp_path_factory.mktemp("pki")
    requests = [pki.Request("server", "keyserver", ("127.0.0.1",)), pki.Request("client", "cp-1")]
    pki.init(root, [*requests, pki.Request("client", "cp-2")], days=1, ca_days=1)
    return root


@pytest.fixture
def servers(certs: Path) -> Iterator[list[KeyServer]]:
    """Three key servers, started, all serving KEK_1."""
    started = [KeyServer(certs).start() for _ in range(3)]
    yield started
    for server in started:
        server.stop()


def checked(client: Client, servers: list[KeyServer]) -> None:
    """A health check, then the key servers forget its calls, so a test counts only its own."""
    client.provider.check()
    for server in servers:
        server.fake.calls.clear()


class Client:
    """A RemoteProvider with its own copy of the client certificate (so a test can rotate it) and its metrics."""

    def __init__(self, certs: Path, workdir: Path, endpoints: list[str], timeout: str = "1s") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.certs = certs
        self.cert, self.key = workdir / "client.pem", workdir / "client-key.pem"
        self.use("cp-1")
        self.ca = workdir / "ca.pem"
        self.set_ca((certs / pki.CA_CERT).read_bytes())
        self.metrics = Metrics()
        self.config = RemoteConfig.model_validate(
            {
                "endpoints": endpoints,
                "ca_cert": str(self.ca),
                "client_cert": str(self.cert),
                "client_key": str(self.key),
                "timeout": timeout,
            }
        )
        self.provider = RemoteProvider(self.config, self.metrics)

    def use(self, name: str, cert: bool = True, key: bool = True) -> None:
        """Put client ``name``'s certificate and key in place the way a rotation does: written aside, renamed."""
        source_cert, source_key = pki.leaf_files(self.certs, "client", name)
        for wanted, source, target in ((cert, source_cert, self.cert), (key, source_key, self.key)):
            if wanted:
                aside = target.with_suffix(".new")
                aside.write_bytes(source.read_bytes())
                os.replace(aside, target)

    def set_ca(self, pem: bytes) -> None:
        aside = self.ca.with_suffix(".new")
        aside.write_bytes(pem)
        os.replace(aside, self.ca)

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def round_trip(self, seed: bytes = b"k" * 32, deadline: float | None = None) -> bytes:
        wrapped = self.provider.encrypt(seed, "uid-1", deadline)
        return self.provider.decrypt(wrapped.ciphertext, wrapped.key_id, wrapped.annotations, "uid-1", deadline)


@pytest.fixture
def make_client(certs: Path, tmp_path: Path) -> Iterator[Any]:
    made: list[Client] = []

    def make(endpoints: list[str], timeout: str = "1s") -> Client:
        client = Client(certs, tmp_path / f"client-{len(made)}", endpoints, timeout)
        made.append(client)
        return client

    yield make
    for client in made:
        client.provider.close()


def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"


# --- calls -------------------------------------------------------------------------------------------------------


def test_blobs_key_id_and_annotations_pass_through_unchanged(servers: list[KeyServer], make_client: Any) -> None:
    client = make_client([servers[0].address])
    client.provider.check()
    assert client.provider.key_id() == KEK_1
    wrapped = client.provider.encrypt(b"s" * 32, "uid-7")
    assert wrapped.ciphertext == f"wrapped:{KEK_1}:".encode() + b"s" * 32
    assert wrapped.key_id == KEK_1
    assert dict(wrapped.annotations) == {"fake.kleidi.io/uid": b"uid-7"}
    assert client.provider.decrypt(wrapped.ciphertext, wrapped.key_id, wrapped.annotations, "uid-7") == b"s" * 32
    # every call carried this node's client certificate
    assert {name for _, name in servers[0].fake.calls} == {"cp-1"}


def test_calls_go_to_healthy_endpoints_first_then_the_others(servers: list[KeyServer], make_client: Any) -> None:
    first, second, _ = servers
    client = make_client([first.address, second.address])
    client.provider.check()  # both agree first: a key_id is agreed only by a majority of the configured ones
    first.fake.healthz = "token gone"
    checked(client, servers)
    assert client.round_trip() == b"k" * 32
    assert first.fake.called("Encrypt") == 0
    assert second.fake.called("Encrypt") == 1
    # the unhealthy one is still tried when the healthy one stops answering
    second.stop()
    assert client.round_trip() == b"k" * 32
    assert first.fake.called("Encrypt") == 1
    # and once both are healthy again, the configured order holds again
    second.start()
    first.fake.healthz = "ok"
    wait_for(lambda: _checks(client), 5, "both endpoints healthy")
    checked(client, servers)
    client.round_trip()
    assert (first.fake.called("Encrypt"), second.fake.called("Encrypt")) == (1, 0)


def _checks(client: Client) -> bool:
    try:
        client.provider.check()
    except KleidiError:
        return False
    return all(client.sample("kleidi_remote_endpoint_up", endpoint=e) == 1 for e in client.config.endpoints)


def test_failover_when_the_first_endpoint_is_gone(servers: list[KeyServer], make_client: Any) -> None:
    client = make_client([dead_address(), servers[0].address])
    blob = f"wrapped:{KEK_1}:s".encode()
    # before any check (only Decrypt may go, it names its key): configured order
    assert client.provider.decrypt(blob, KEK_1, {"fake.kleidi.io/uid": b"u"}, "u") == b"s"
    dead = client.config.endpoints[0]
    assert client.sample("kleidi_remote_failovers_total", endpoint=dead) == 1
    assert client.sample("kleidi_remote_calls_total", endpoint=dead, method="Decrypt", code="UNAVAILABLE") == 1
    ok = client.sample("kleidi_remote_calls_total", endpoint=servers[0].address, method="Decrypt", code="OK")
    assert ok == 1


def test_a_hanging_endpoint_leaves_the_next_its_share_of_the_deadline(
    servers: list[KeyServer], make_client: Any
) -> None:
    first, second, _ = servers
    client = make_client([first.address, second.address], timeout="2s")
    checked(client, servers)
    first.fake.hang.add("Encrypt")
    started = time.monotonic()
    wrapped = client.provider.encrypt(b"k" * 32, "u", started + 3.0)
    took = time.monotonic() - started
    assert wrapped.key_id == KEK_1
    assert second.fake.called("Encrypt") == 1
    # the first got half of the 3 s (less than its 2 s timeout), the second answered at once
    assert 1.4 < took < 2.0, took


def test_no_call_outlives_its_deadline_when_every_endpoint_hangs(servers: list[KeyServer], make_client: Any) -> None:
    client = make_client([s.address for s in servers], timeout="1s")
    checked(client, servers)
    for server in servers:
        server.fake.hang.add("Decrypt")
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as raised:
        client.provider.decrypt(f"wrapped:{KEK_1}:x".encode(), KEK_1, {}, "u", started + 1.2)
    took = time.monotonic() - started
    assert took <= 1.2, took
    assert all(s.fake.called("Decrypt") == 1 for s in servers)  # each got a share, none was skipped
    for server in servers:
        assert server.address in str(raised.value)
    assert "DEADLINE_EXCEEDED" in str(raised.value)


def test_a_call_whose_deadline_has_passed_is_not_sent(servers: list[KeyServer], make_client: Any) -> None:
    client = make_client([servers[0].address])
    checked(client, servers)
    with pytest.raises(DeadlinePassed):
        client.provider.encrypt(b"k" * 32, "u", time.monotonic() - 0.1)
    assert servers[0].fake.called("Encrypt") == 0


@pytest.mark.parametrize(
    ("code", "kind", "error"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "invalid_input", InvalidInput),
        (grpc.StatusCode.INVALID_ARGUMENT, "integrity", IntegrityError),
        (grpc.StatusCode.FAILED_PRECONDITION, "config", ConfigError),
    ],
)
def test_answers_every_key_server_would_give_are_not_failed_over(
    servers: list[KeyServer], make_client: Any, code: grpc.StatusCode, kind: str, error: type[KleidiError]
) -> None:
    first, second, _ = servers
    client = make_client([first.address, second.address])
    first.fake.fail["Decrypt"] = (code, kind)
    with pytest.raises(error) as raised:
        client.provider.decrypt(f"wrapped:{KEK_1}:x".encode(), KEK_1, {}, "u")
    assert type(raised.value) is error
    assert raised.value.code == code
    assert first.address in str(raised.value) and f"fake {kind} in Decrypt" in str(raised.value)
    assert second.fake.called("Decrypt") == 0
    assert client.sample("kleidi_backend_errors_total", provider="remote", operation="decrypt", kind=kind) == 1


def test_a_key_server_that_does_not_know_the_key_is_passed_over_for_decrypt(
    servers: list[KeyServer], make_client: Any
) -> None:
    """NOT_FOUND from one key server: another may still hold the key (this one's KEK changed since the check), so
    the Decrypt moves on, and the odd one goes to the back of the line until the next check."""
    first, second, _ = servers
    client = make_client([first.address, second.address])
    checked(client, servers)
    wrapped = client.provider.encrypt(b"k" * 32, "u")
    first.fake.fail["Decrypt"] = (grpc.StatusCode.NOT_FOUND, "key_not_found")
    for _ in range(2):
        assert client.provider.decrypt(wrapped.ciphertext, wrapped.key_id, wrapped.annotations, "u") == b"k" * 32
    assert (first.fake.called("Decrypt"), second.fake.called("Decrypt")) == (1, 2)
    assert client.sample("kleidi_remote_failovers_total", endpoint=first.address) == 1
    assert client.sample("kleidi_remote_calls_total", endpoint=first.address, method="Decrypt", code="NOT_FOUND") == 1
    del first.fake.fail["Decrypt"]
    checked(client, servers)
    client.provider.decrypt(wrapped.ciphertext, wrapped.key_id, wrapped.annotations, "u")
    assert (first.fake.called("Decrypt"), second.fake.called("Decrypt")) == (1, 0)


def test_a_key_server_that_lost_the_kek_is_passed_over_for_encrypt(servers: list[KeyServer], make_client: Any) -> None:
    """NOT_FOUND on Encrypt: that key server's backend lost the agreed KEK, the others may still hold it. The Encrypt
    goes to the next one, and the odd one goes to the back of the line; when none holds it, the answer is NOT_FOUND."""
    first, second, _ = servers
    client = make_client([first.address, second.address])
    checked(client, servers)
    first.fake.fail["Encrypt"] = (grpc.StatusCode.NOT_FOUND, "key_not_found")
    for _ in range(2):
        assert client.provider.encrypt(b"k" * 32, "u").key_id == KEK_1
    assert (first.fake.called("Encrypt"), second.fake.called("Encrypt")) == (1, 2)
    assert client.sample("kleidi_remote_failovers_total", endpoint=first.address) == 1
    assert client.sample("kleidi_remote_calls_total", endpoint=first.address, method="Encrypt", code="NOT_FOUND") == 1
    second.fake.fail["Encrypt"] = (grpc.StatusCode.NOT_FOUND, "key_not_found")
    with pytest.raises(KeyNotFound) as raised:
        client.provider.encrypt(b"k" * 32, "u")
    assert first.address in str(raised.value) and second.address in str(raised.value)


def test_a_key_no_key_server_knows_is_not_found(servers: list[KeyServer], make_client: Any) -> None:
    first, second, _ = servers
    client = make_client([first.address, second.address])
    checked(client, servers)
    for server in (first, second):
        server.fake.fail["Decrypt"] = (grpc.StatusCode.NOT_FOUND, "key_not_found")
    with pytest.raises(KeyNotFound) as raised:
        client.provider.decrypt(f"wrapped:{KEK_1}:x".encode(), "kek-gone:v1", {}, "u")
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert first.address in str(raised.value) and second.address in str(raised.value)
    # one that did not answer might hold it: not a final answer then
    second.stop()
    with pytest.raises(BackendUnavailable) as unavailable:
        client.provider.decrypt(f"wrapped:{KEK_1}:x".encode(), "kek-gone:v1", {}, "u")
    assert "NOT_FOUND" in str(unavailable.value) and "UNAVAILABLE" in str(unavailable.value)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (grpc.StatusCode.UNAVAILABLE, "backend_unavailable"),
        (grpc.StatusCode.UNAVAILABLE, "auth_failed"),
        (grpc.StatusCode.PERMISSION_DENIED, ""),
        (grpc.StatusCode.UNAUTHENTICATED, ""),
        (grpc.StatusCode.INTERNAL, "internal"),
    ],
)
def test_a_key_server_that_cannot_serve_is_failed_over(
    servers: list[KeyServer], make_client: Any, code: grpc.StatusCode, kind: str
) -> None:
    first, second, _ = servers
    client = make_client([first.address, second.address])
    checked(client, servers)
    first.fake.fail["Encrypt"] = (code, kind)
    assert client.provider.encrypt(b"k" * 32, "u").key_id == KEK_1
    assert (first.fake.called("Encrypt"), second.fake.called("Encrypt")) == (1, 1)
    assert client.sample("kleidi_remote_failovers_total", endpoint=first.address) == 1
    # when the last one says the same, the caller learns every endpoint's reason
    second.fake.fail["Encrypt"] = (code, kind)
    with pytest.raises(BackendUnavailable) as raised:
        client.provider.encrypt(b"k" * 32, "u")
    text = str(raised.value)
    assert f"{first.address}: {code.name}" in text and f"{second.address}: {code.name}" in text
    if kind:
        assert f"({kind})" in text
    # the first, now tried last since it failed, had nothing after it
    assert client.sample("kleidi_remote_failovers_total", endpoint=first.address) == 1


def test_a_failed_call_sends_later_calls_elsewhere_until_the_next_check(
    servers: list[KeyServer], make_client: Any
) -> None:
    first, second, _ = servers
    client = make_client([first.address, second.address], timeout="1s")
    checked(client, servers)
    first.fake.hang.add("Encrypt")
    client.provider.encrypt(b"k" * 32, "u", time.monotonic() + 2)  # pays the hang once
    started = time.monotonic()
    client.provider.encrypt(b"k" * 32, "u", time.monotonic() + 2)
    assert time.monotonic() - started < 0.5
    assert first.fake.called("Encrypt") == 1
    first.fake.hang.clear()
    checked(client, servers)  # healthy again: first in line again
    client.provider.encrypt(b"k" * 32, "u")
    assert first.fake.called("Encrypt") == 1


# --- key_id agreement ----------------------------------------------------------------------------------------------


def test_an_endpoint_with_another_kek_is_refused_and_reported_until_it_agrees(
    servers: list[KeyServer], make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    first, odd, third = servers
    odd.fake.key_id = KEK_2
    client = make_client([odd.address, first.address, third.address])
    caplog.set_level(logging.WARNING, logger="kleidi.remote")
    for _ in range(2):
        client.provider.check()
    assert client.provider.key_id() == KEK_1  # two against one
    assert client.sample("kleidi_remote_endpoint_key_mismatch", endpoint=odd.address) == 1
    assert client.sample("kleidi_remote_endpoint_up", endpoint=odd.address) == 0
    assert client.sample("kleidi_remote_endpoint_key_mismatch", endpoint=first.address) == 0
    assert client.sample("kleidi_remote_endpoint_up", endpoint=first.address) == 1
    refusals = [r for r in caplog.records if "another KEK" in r.getMessage()]
    assert len(refusals) == 2  # at every check, not only when it started
    assert refusals[0].__dict__["endpoint"] == odd.address
    assert refusals[0].__dict__["key_id_hash"] == key_id_hash(KEK_2)
    assert refusals[0].__dict__["agreed_key_id_hash"] == key_id_hash(KEK_1)
    assert not any(KEK_2 in r.getMessage() or KEK_2 in str(r.__dict__) for r in caplog.records)

    # never used, not even when the agreeing ones are gone
    first.stop()
    third.stop()
    with pytest.raises(BackendUnavailable):
        client.provider.encrypt(b"k" * 32, "u")
    assert odd.fake.called("Encrypt") == 0
    with pytest.raises(BackendUnavailable) as raised:
        client.provider.check()
    assert odd.address in str(raised.value) and "another KEK" in str(raised.value)
    assert client.provider.key_id() == KEK_1

    # it agrees again: admitted at the next check
    odd.fake.key_id = KEK_1
    client.provider.check()
    assert client.sample("kleidi_remote_endpoint_key_mismatch", endpoint=odd.address) == 0
    assert client.sample("kleidi_remote_endpoint_up", endpoint=odd.address) == 1
    assert client.round_trip() == b"k" * 32
    assert odd.fake.called("Encrypt") >= 1


@pytest.mark.parametrize("odd_first", [True, False])
def test_one_key_server_changing_kek_never_flips_the_key_id(
    servers: list[KeyServer], make_client: Any, odd_first: bool
) -> None:
    """The reviewer's case: two key servers agreed, then the wrong token is loaded on one. One against one is a tie,
    and a tie keeps the agreed key_id, whichever endpoint comes first."""
    usual, odd, _ = servers
    order = [odd, usual] if odd_first else [usual, odd]
    client = make_client([s.address for s in order])
    client.provider.check()
    seen = [client.provider.key_id()]
    odd.fake.key_id = KEK_2
    client.provider.check()
    seen.append(client.provider.key_id())
    assert client.sample("kleidi_remote_endpoint_key_mismatch", endpoint=odd.address) == 1
    assert client.sample("kleidi_remote_endpoint_up", endpoint=usual.address) == 1
    for server in servers:
        server.fake.calls.clear()
    assert client.provider.encrypt(b"k" * 32, "u").key_id == KEK_1
    assert (usual.fake.called("Encrypt"), odd.fake.called("Encrypt")) == (1, 0)
    odd.fake.key_id = KEK_1  # fixed again
    client.provider.check()
    seen.append(client.provider.key_id())
    assert seen == [KEK_1, KEK_1, KEK_1]
    assert client.sample("kleidi_remote_endpoint_key_mismatch", endpoint=odd.address) == 0


@pytest.mark.parametrize("odd_first", [True, False])
def test_before_any_key_id_is_agreed_a_tie_agrees_on_nothing(
    servers: list[KeyServer], make_client: Any, odd_first: bool
) -> None:
    """One against one is no majority of the configured key servers, whichever comes first: nothing is agreed,
    and neither is reported as mismatched, since there is nothing to mismatch yet."""
    odd, usual, _ = servers
    odd.fake.key_id = KEK_2
    client = make_client([s.address for s in ([odd, usual] if odd_first else [usual, odd])])
    with pytest.raises(BackendUnavailable) as raised:
        client.provider.check()
    assert "1 of the 2 configured key servers agree on a key_id" in str(raised.value)
    assert client.provider.key_id() == ""
    for server in (odd, usual):
        assert client.sample("kleidi_remote_endpoint_key_mismatch", endpoint=server.address) == 0
    with pytest.raises(BackendUnavailable):
        client.provider.encrypt(b"k" * 32, "u")
    assert odd.fake.called("Encrypt") == usual.fake.called("Encrypt") == 0
    odd.fake.key_id = KEK_1  # fixed
    client.provider.check()
    assert client.provider.key_id() == KEK_1


def test_a_restarted_plugin_does_not_agree_with_a_minority(
    servers: list[KeyServer], make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The plugin (re)starts while only a mis-provisioned key server (another KEK: a wrong token, an old backup)
    answers. Taking its key_id would put new data key seeds under a KEK the other plugins refuse, and the rule for
    moving an agreed key_id would never take it back: so nothing is agreed until a majority of the configured key
    servers report the same key_id. Decrypt names its key and goes on meanwhile."""
    odd, first, second = servers
    odd.fake.key_id = KEK_2
    first.stop()
    second.stop()
    client = make_client([odd.address, first.address, second.address])
    health = HealthMonitor(client.provider, 1.0, client.metrics)
    caplog.set_level(logging.WARNING, logger="kleidi.remote")
    for _ in range(2):
        state = health.check_once()
        assert not state.ok
        assert "1 of the 3 configured key servers agree on a key_id" in state.reason
        assert "a majority of the configured ones (2) must agree before the first Encrypt" in state.reason
        assert odd.address in state.reason and first.address in state.reason
    assert client.provider.key_id() == ""
    with pytest.raises(BackendUnavailable) as raised:
        client.provider.encrypt(b"k" * 32, "u")
    assert "1 of the 3 configured key servers agree on a key_id" in str(raised.value)
    assert odd.fake.called("Encrypt") == 0
    assert client.provider.decrypt(f"wrapped:{KEK_2}:s".encode(), KEK_2, {"fake.kleidi.io/uid": b"u"}, "u") == b"s"
    waiting = [r for r in caplog.records if "no key_id agreed" in r.getMessage()]
    assert len(waiting) == 2  # at every check, as a refused key server is
    assert "1 of the 3" in waiting[0].__dict__["reason"]
    assert key_id_hash(KEK_2) in waiting[0].__dict__["endpoints"]
    assert not any(KEK_2 in r.getMessage() or KEK_2 in str(r.__dict__) for r in caplog.records)

    # the good ones come back: agreed on theirs, and the odd one is refused and reported
    first.start()
    second.start()
    wait_for(lambda: health.check_once().ok, 5, "agreement once the good key servers answer")
    assert client.provider.key_id() == KEK_1
    assert client.sample("kleidi_remote_endpoint_key_mismatch", endpoint=odd.address) == 1
    assert client.sample("kleidi_remote_endpoint_up", endpoint=odd.address) == 0
    odd.fake.calls.clear()
    assert client.provider.encrypt(b"k" * 32, "u").key_id == KEK_1
    assert odd.fake.called("Encrypt") == 0


def test_a_majority_of_the_configured_key_servers_agrees_with_one_away(
    servers: list[KeyServer], make_client: Any
) -> None:
    first, second, away = servers
    away.stop()
    client = make_client([away.address, first.address, second.address])
    client.provider.check()
    assert client.provider.key_id() == KEK_1
    assert client.provider.encrypt(b"k" * 32, "u").key_id == KEK_1


def test_with_two_key_servers_one_away_at_start_nothing_is_agreed_until_both_agree(
    servers: list[KeyServer], make_client: Any
) -> None:
    """One of two is no majority: Encrypt waits for the other, Decrypt does not."""
    present, away, _ = servers
    away.stop()
    client = make_client([present.address, away.address])
    with pytest.raises(BackendUnavailable) as raised:
        client.provider.check()
    assert "1 of the 2 configured key servers agree on a key_id" in str(raised.value)
    with pytest.raises(BackendUnavailable):
        client.provider.encrypt(b"k" * 32, "u")
    assert client.provider.decrypt(f"wrapped:{KEK_1}:s".encode(), KEK_1, {"fake.kleidi.io/uid": b"u"}, "u") == b"s"
    # back with another KEK: still no majority
    away.fake.key_id = KEK_2
    away.start()
    wait_for(lambda: _late_answered(client, away), 5, "the returning endpoint's Status")
    assert "1 of the 2 configured key servers agree on a key_id" in _check_error(client)
    assert client.provider.key_id() == ""
    away.fake.key_id = KEK_1
    client.provider.check()
    assert client.provider.key_id() == KEK_1
    assert client.provider.encrypt(b"k" * 32, "u").key_id == KEK_1


def test_a_single_key_server_is_a_majority_at_once(servers: list[KeyServer], make_client: Any) -> None:
    server = servers[0]
    server.fake.key_id = KEK_2
    client = make_client([server.address])
    client.provider.check()
    assert client.provider.key_id() == KEK_2
    assert client.provider.encrypt(b"k" * 32, "u").key_id == KEK_2


def test_a_sole_survivor_reporting_another_key_id_is_refused(servers: list[KeyServer], make_client: Any) -> None:
    """One of two agreeing key servers is away and the other now reports another key_id: one of two is no
    majority, so the key_id stays, the survivor is refused, and the plugin turns unhealthy."""
    gone, survivor, _ = servers
    client = make_client([gone.address, survivor.address])
    client.provider.check()
    gone.stop()
    survivor.fake.key_id = KEK_2
    with pytest.raises(BackendUnavailable) as raised:
        client.provider.check()
    assert "another KEK" in str(raised.value)
    assert client.provider.key_id() == KEK_1
    assert client.sample("kleidi_remote_endpoint_key_mismatch", endpoint=survivor.address) == 1
    survivor.fake.calls.clear()
    with pytest.raises(BackendUnavailable):
        client.provider.encrypt(b"k" * 32, "u")
    assert survivor.fake.called("Encrypt") == 0
    # the one that was away comes back with the agreed key: it serves, the survivor stays refused
    gone.start()
    wait_for(lambda: _checks_ok(client), 5, "the returning key server usable")
    assert client.provider.key_id() == KEK_1
    assert client.provider.encrypt(b"k" * 32, "u").key_id == KEK_1
    assert survivor.fake.called("Encrypt") == 0


def _checks_ok(client: Client) -> bool:
    try:
        client.provider.check()
    except KleidiError:
        return False
    return True


def test_encrypt_is_refused_until_a_key_id_is_agreed(servers: list[KeyServer], make_client: Any) -> None:
    """Before a check has agreed on a key_id, an Encrypt answer could carry any key server's key_id: it is refused
    (UNAVAILABLE, on which the server runs a check at once). Decrypt names its key, so it may go through."""
    server = servers[0]
    server.fake.healthz = "token gone"
    client = make_client([server.address])
    with pytest.raises(BackendUnavailable) as raised:
        client.provider.encrypt(b"k" * 32, "u")
    assert "no key_id agreed" in str(raised.value)
    with pytest.raises(BackendUnavailable):
        client.provider.check()  # the first check fails: still nothing agreed
    assert client.provider.key_id() == ""
    with pytest.raises(BackendUnavailable):
        client.provider.encrypt(b"k" * 32, "u")
    assert server.fake.called("Encrypt") == 0
    assert client.provider.decrypt(f"wrapped:{KEK_1}:s".encode(), KEK_1, {"fake.kleidi.io/uid": b"u"}, "u") == b"s"
    server.fake.healthz = "ok"
    client.provider.check()
    assert client.provider.encrypt(b"k" * 32, "u").key_id == KEK_1


def test_an_endpoint_that_never_agreed_cannot_take_over(servers: list[KeyServer], make_client: Any) -> None:
    """Away at the first checks, then back with another KEK while the agreeing ones are gone: still refused."""
    first, second, late = servers
    late.stop()
    client = make_client([first.address, second.address, late.address])
    client.provider.check()
    first.stop()
    second.stop()
    late.fake.key_id = KEK_2
    late.start()
    wait_for(lambda: _late_answered(client, late), 5, "the late endpoint's Status")
    with pytest.raises(BackendUnavailable) as raised:
        client.provider.check()
    assert "another KEK" in str(raised.value)
    assert client.provider.key_id() == KEK_1
    assert client.sample("kleidi_remote_endpoint_key_mismatch", endpoint=late.address) == 1


def _late_answered(client: Client, late: KeyServer) -> bool:
    with contextlib.suppress(BackendUnavailable):
        client.provider.check()
    return late.fake.called("Status") > 0


def test_an_endpoint_whose_kek_is_unknown_is_used_only_once_it_agrees(
    servers: list[KeyServer], make_client: Any
) -> None:
    """Down at the check, so its KEK is unknown: a Decrypt there could get a final answer (NOT_FOUND) another key
    server would not give. The next check (which a failed call asks for at once) admits it."""
    first, second, late = servers
    late.stop()
    client = make_client([first.address, second.address, late.address])
    client.provider.check()
    late.start()
    first.stop()
    second.stop()
    with pytest.raises(BackendUnavailable):
        client.provider.encrypt(b"k" * 32, "u")
    assert late.fake.called("Encrypt") == 0
    wait_for(lambda: _late_answered(client, late), 5, "the late endpoint's Status")
    assert client.round_trip() == b"k" * 32


def test_a_rotation_on_every_key_server_moves_the_key_id(servers: list[KeyServer], make_client: Any) -> None:
    first, second, _ = servers
    client = make_client([first.address, second.address])
    client.provider.check()
    # a rolling rotation: the first key server has rotated, the second not yet (a tie: the agreed key_id stays)
    first.fake.key_id = KEK_2
    client.provider.check()
    assert client.provider.key_id() == KEK_1
    assert client.sample("kleidi_remote_endpoint_key_mismatch", endpoint=first.address) == 1
    second.fake.key_id = KEK_2
    client.provider.check()
    assert client.provider.key_id() == KEK_2
    for server in (first, second):
        assert client.sample("kleidi_remote_endpoint_key_mismatch", endpoint=server.address) == 0
        assert client.sample("kleidi_remote_endpoint_up", endpoint=server.address) == 1
    assert client.provider.encrypt(b"k" * 32, "u").key_id == KEK_2


def test_a_strict_majority_of_the_agreeing_key_servers_moves_the_key_id(
    servers: list[KeyServer], make_client: Any
) -> None:
    """Those that agreed count whether they answer or not: with one of three away, one rotated key server is not
    enough, two are."""
    first, second, away = servers
    client = make_client([s.address for s in servers])
    client.provider.check()
    away.stop()
    first.fake.key_id = KEK_2
    with contextlib.suppress(BackendUnavailable):
        client.provider.check()
    assert client.provider.key_id() == KEK_1
    second.fake.key_id = KEK_2
    client.provider.check()
    assert client.provider.key_id() == KEK_2
    # the one that was away comes back on the old key: refused until it has the new one too
    away.fake.calls.clear()
    away.start()
    wait_for(lambda: _late_answered(client, away), 5, "the returning endpoint's Status")
    assert client.sample("kleidi_remote_endpoint_key_mismatch", endpoint=away.address) == 1
    away.fake.key_id = KEK_2
    wait_for(lambda: _checks(client), 5, "every endpoint on the new key_id")
    assert client.provider.key_id() == KEK_2


def test_a_single_endpoint_that_rotates_moves_the_key_id(servers: list[KeyServer], make_client: Any) -> None:
    server = servers[0]
    client = make_client([server.address])
    client.provider.check()
    server.fake.key_id = KEK_2
    client.provider.check()
    assert client.provider.key_id() == KEK_2
    assert client.provider.encrypt(b"k" * 32, "u").key_id == KEK_2


def test_a_new_key_id_is_taken_only_once_a_round_trip_proves_it(servers: list[KeyServer], make_client: Any) -> None:
    first, second, _ = servers
    client = make_client([first.address, second.address])
    client.provider.check()
    for server in (first, second):
        server.fake.key_id = KEK_2
        server.fake.fail["Decrypt"] = (grpc.StatusCode.UNAVAILABLE, "backend_unavailable")
    with pytest.raises(BackendUnavailable):
        client.provider.check()
    assert client.provider.key_id() == KEK_1
    for server in (first, second):
        del server.fake.fail["Decrypt"]
    client.provider.check()
    assert client.provider.key_id() == KEK_2


def test_only_healthy_endpoints_vote(servers: list[KeyServer], make_client: Any) -> None:
    sick, first, second = servers
    sick.fake.healthz = "token gone"
    first.fake.key_id = second.fake.key_id = KEK_2
    client = make_client([sick.address, first.address, second.address])
    client.provider.check()
    assert client.provider.key_id() == KEK_2
    # an unhealthy endpoint that reports another KEK is not used either, even when it recovers
    sick.fake.healthz = "ok"
    first.stop()
    second.stop()
    with pytest.raises(BackendUnavailable):
        client.provider.encrypt(b"k" * 32, "u")
    assert sick.fake.called("Encrypt") == 0


def test_an_encrypt_under_another_key_id_than_agreed_is_not_returned(
    servers: list[KeyServer], make_client: Any
) -> None:
    """A key server that rotated since the last check: its answer would break Status/Encrypt agreement."""
    rotated, other, _ = servers
    client = make_client([rotated.address, other.address])
    client.provider.check()
    rotated.fake.encrypt_key_id = KEK_2
    assert client.provider.encrypt(b"k" * 32, "u").key_id == KEK_1  # from the other one
    other.fake.encrypt_key_id = KEK_2
    with pytest.raises(BackendUnavailable) as raised:  # UNAVAILABLE: the server runs the health check at once
        client.provider.encrypt(b"k" * 32, "u")
    assert key_id_hash(KEK_2) in str(raised.value) and KEK_2 not in str(raised.value)
    # once every key server reports the new key_id, the check publishes it and Encrypt agrees again
    rotated.fake.key_id = other.fake.key_id = KEK_2
    client.provider.check()
    assert client.provider.key_id() == KEK_2
    assert client.provider.encrypt(b"k" * 32, "u").key_id == KEK_2


# --- health ----------------------------------------------------------------------------------------------------


def test_status_is_asked_of_every_endpoint_side_by_side(
    servers: list[KeyServer], make_client: Any, certs: Path
) -> None:
    # five, so that the three answering are a majority of the configured ones and agree on a key_id
    servers = servers + [KeyServer(certs).start() for _ in range(2)]
    try:
        _status_side_by_side(servers, make_client)
    finally:
        for server in servers[3:]:
            server.stop()


def _status_side_by_side(servers: list[KeyServer], make_client: Any) -> None:
    for server in servers[:2]:
        server.fake.hang.add("Status")
    client = make_client([s.address for s in servers], timeout="1s")
    started = time.monotonic()
    client.provider.check()
    assert time.monotonic() - started < 1.8  # two hung Status calls cost one timeout, not two
    assert client.provider.key_id() == KEK_1
    assert [client.sample("kleidi_remote_endpoint_up", endpoint=s.address) for s in servers] == [0, 0, 1, 1, 1]
    assert (
        client.sample(
            "kleidi_remote_calls_total", endpoint=servers[0].address, method="Status", code="DEADLINE_EXCEEDED"
        )
        == 1
    )


def test_health_goes_bad_when_no_key_server_answers_and_recovers_by_itself(
    servers: list[KeyServer], make_client: Any
) -> None:
    first, second, _ = servers
    client = make_client([first.address, second.address])
    health = HealthMonitor(client.provider, 1.0, client.metrics)
    assert health.check_once().ok
    first.stop()
    assert health.check_once().ok  # one is enough
    second.stop()
    state = health.check_once()
    assert not state.ok
    assert first.address in state.reason and second.address in state.reason
    assert state.key_id == KEK_1  # the last agreed key_id is kept
    second.start()
    wait_for(lambda: health.check_once().ok, 5, "healthy again once a key server is back")
    assert client.round_trip() == b"k" * 32


def test_a_round_trip_failure_makes_the_endpoint_unusable(servers: list[KeyServer], make_client: Any) -> None:
    first, second, _ = servers
    first.fake.fail["Decrypt"] = (grpc.StatusCode.UNAVAILABLE, "backend_unavailable")
    client = make_client([first.address, second.address])
    client.provider.check()  # proven through the second
    assert client.sample("kleidi_remote_endpoint_up", endpoint=first.address) == 0
    assert client.sample("kleidi_remote_endpoint_up", endpoint=second.address) == 1
    second.fake.fail["Encrypt"] = (grpc.StatusCode.UNAVAILABLE, "backend_unavailable")
    with pytest.raises(BackendUnavailable) as raised:
        client.provider.check()
    assert "health round trip (Decrypt) failed" in str(raised.value)
    assert "health round trip (Encrypt) failed" in str(raised.value)


# --- certificates ------------------------------------------------------------------------------------------------


def test_a_rotated_client_certificate_is_used_without_restart(servers: list[KeyServer], make_client: Any) -> None:
    server = servers[0]
    client = make_client([server.address])
    client.provider.check()
    client.use("cp-2")
    client.provider.check()  # every check looks at the files
    assert client.sample("kleidi_tls_reloads_total", side="client", result="ok") == 1
    server.fake.calls.clear()
    client.round_trip()
    assert {name for _, name in server.fake.calls} == {"cp-2"}


def test_a_changed_ca_file_is_used_without_restart(servers: list[KeyServer], make_client: Any, tmp_path: Path) -> None:
    """A CA rotation: the client trusts a bundle of the old and the new CA, the key server moves to a certificate
    from the new CA, then the client trusts the new CA alone. Calls keep working, and the plugin is not restarted."""
    server = servers[0]
    new_ca = tmp_path / "new-ca"
    pki.init(new_ca, [pki.Request("server", "keyserver", ("127.0.0.1",))], days=1, ca_days=1)
    client = make_client([server.address])
    client.provider.check()
    old_pem, new_pem = client.ca.read_bytes(), (new_ca / pki.CA_CERT).read_bytes()
    client.set_ca(old_pem + new_pem)
    client.provider.check()
    assert client.sample("kleidi_tls_reloads_total", side="client", result="ok") == 1
    server.stop()
    server.start(server_certs=new_ca)
    wait_for(lambda: _checks_ok(client), 5, "the key server with the new CA's certificate usable")
    assert client.round_trip() == b"k" * 32
    client.set_ca(new_pem)
    client.provider.check()
    assert client.sample("kleidi_tls_reloads_total", side="client", result="ok") == 2
    assert client.round_trip() == b"k" * 32
    # proof the new CA alone is in use: a key server back on the old CA's certificate is refused at the handshake
    server.stop()
    server.start()
    wait_for(lambda: "handshake failed" in _check_error(client).lower(), 5, "the old certificate refused")


def _check_error(client: Client) -> str:
    try:
        client.provider.check()
    except KleidiError as exc:
        return str(exc)
    return ""


def test_a_half_done_rotation_keeps_the_certificate_in_use(
    servers: list[KeyServer], make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = servers[0]
    client = make_client([server.address])
    client.provider.check()
    client.use("cp-2", key=False)  # the new certificate, still the old key
    caplog.set_level(logging.WARNING, logger="kleidi.remote")
    client.provider.check()
    assert client.sample("kleidi_tls_reloads_total", side="client", result="error") == 1
    assert any("remote.client_key" in str(r.__dict__.get("reason")) for r in caplog.records)
    server.fake.calls.clear()
    client.round_trip()
    assert {name for _, name in server.fake.calls} == {"cp-1"}
    client.use("cp-2", cert=False)  # the rotation completes
    client.provider.check()
    assert client.sample("kleidi_tls_reloads_total", side="client", result="ok") == 1
    server.fake.calls.clear()
    client.round_trip()
    assert {name for _, name in server.fake.calls} == {"cp-2"}


def test_calls_look_at_the_files_too(
    servers: list[KeyServer], make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kleidi.providers.remote as remote

    monkeypatch.setattr(remote, "_FILES_EVERY", 0.0)
    server = servers[0]
    client = make_client([server.address])
    client.provider.check()
    client.use("cp-2")
    server.fake.calls.clear()
    client.round_trip()
    assert {name for _, name in server.fake.calls} == {"cp-2"}


@pytest.mark.parametrize("setting", ["ca_cert", "client_cert", "client_key"])
def test_a_missing_file_is_a_config_error_naming_the_setting(certs: Path, tmp_path: Path, setting: str) -> None:
    cert, key = pki.leaf_files(certs, "client", "cp-1")
    section = {"endpoints": ["127.0.0.1:1"], "ca_cert": str(certs / pki.CA_CERT), "client_cert": str(cert)}
    section["client_key"] = str(key)
    section[setting] = str(tmp_path / "nope.pem")
    with pytest.raises(ConfigError) as raised:
        RemoteProvider(RemoteConfig.model_validate(section), Metrics())
    assert str(raised.value) == f"remote.{setting}: cannot read {tmp_path / 'nope.pem'}: No such file or directory"


def test_unusable_files_are_named_without_their_content(certs: Path, tmp_path: Path) -> None:
    cert, key = pki.leaf_files(certs, "client", "cp-1")
    other_key = pki.leaf_files(certs, "client", "cp-2")[1]
    garbage = tmp_path / "garbage.pem"
    secret = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END PRIVATE KEY-----\n"
    garbage.write_text(secret)
    base = {"endpoints": ["127.0.0.1:1"], "ca_cert": str(certs / pki.CA_CERT), "client_cert": str(cert)}
    cases = {
        "client_key": (str(garbage), f"remote.client_key: {garbage} is not an unencrypted PEM private key"),
        "ca_cert": (str(garbage), f"remote.ca_cert: {garbage} holds no PEM certificate"),
    }
    for setting, (path, message) in cases.items():
        section = {**base, "client_key": str(key), setting: path}
        with pytest.raises(ConfigError) as raised:
            RemoteProvider(RemoteConfig.model_validate(section), Metrics())
        assert str(raised.value) == message
        assert "c2VjcmV0" not in str(raised.value)
    with pytest.raises(ConfigError) as raised:
        RemoteProvider(RemoteConfig.model_validate({**base, "client_key": str(other_key)}), Metrics())
    assert str(raised.value).startswith(f"remote.client_key: {other_key} is not the key of the certificate")


# --- metrics ---------------------------------------------------------------------------------------------------


def test_metrics_count_calls_failovers_and_backend_time(servers: list[KeyServer], make_client: Any) -> None:
    first, second, _ = servers
    client = make_client([first.address, second.address])
    client.provider.check()
    first.fake.fail["Encrypt"] = (grpc.StatusCode.UNAVAILABLE, "backend_unavailable")
    for _ in range(3):
        client.provider.encrypt(b"k" * 32, "u")
    sample = client.sample
    # the first failure sends the endpoint to the back of the line: later calls go to the second directly
    assert sample("kleidi_remote_calls_total", endpoint=first.address, method="Encrypt", code="UNAVAILABLE") == 1
    assert sample("kleidi_remote_calls_total", endpoint=second.address, method="Encrypt", code="OK") == 3
    assert sample("kleidi_remote_calls_total", endpoint=first.address, method="Encrypt", code="OK") == 1  # check
    assert sample("kleidi_remote_failovers_total", endpoint=first.address) == 1
    assert sample("kleidi_remote_calls_total", endpoint=first.address, method="Status", code="OK") == 1
    assert sample("kleidi_backend_duration_seconds_count", provider="remote", operation="encrypt") == 3
    assert sample("kleidi_backend_duration_seconds_count", provider="remote", operation="check") == 1
    assert (
        sample("kleidi_backend_errors_total", provider="remote", operation="encrypt", kind="backend_unavailable") == 0
    )
    assert [sample("kleidi_remote_endpoint_up", endpoint=s.address) for s in (first, second)] == [1, 1]
