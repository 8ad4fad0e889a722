"""A non-dev OpenBao with TLS and on-disk storage: verification, cert auth, seal/unseal, and a kill mid-load."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from kleidi.config import VaultConfig
from kleidi.errors import AuthFailed, BackendUnavailable
from kleidi.observability import Metrics
from kleidi.providers.vault import VaultProvider
from tests.backends.openbao import OpenBao, TestCA, unique, vault_section
from tests.plugin import KleidiProcess, wait_for

pytestmark = pytest.mark.integration


@dataclass
class Tls:
    bao: OpenBao
    ca: TestCA
    key: str
    policy: str
    token_file: Path
    cert_auth: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    root = tmp_path_factory.mktemp("bao-tls")
    ca = TestCA(root / "ca")
    bao = OpenBao(root / "server", tls=True, ca=ca).start()
    try:
        key = unique()
        bao.create_key(key)
        policy = bao.kleidi_policy(key)
        token_file = root / "token"
        token_file.write_text(bao.token([policy], ttl="1h"))
        # cert auth: client certificates issued by the test CA with CN kleidi-node map to the kleidi policy
        bao.enable_auth("cert")
        bao.write(
            "auth/cert/certs/kleidi",
            certificate=ca.pem,
            allowed_common_names=["kleidi-node"],
            token_policies=[policy],
            token_ttl="1h",
        )
        cert, cert_key = ca.issue("kleidi-node", client=True)
        cert_auth = {"method": "cert", "role": "kleidi", "client_cert": str(cert), "client_key": str(cert_key)}
        yield Tls(bao, ca, key, policy, token_file, cert_auth)
    finally:
        bao.stop()


def provider(section: dict[str, Any]) -> VaultProvider:
    return VaultProvider(VaultConfig.model_validate(section), Metrics())


def test_tls_verified_against_the_configured_ca(tls: Tls) -> None:
    p = provider(vault_section(tls.bao, tls.key, {"method": "token", "token_file": str(tls.token_file)}))
    try:
        p.check()
        seed = os.urandom(32)
        assert p.decrypt(p.encrypt(seed, "u").ciphertext, "", {}, "u") == seed
    finally:
        p.close()


@pytest.mark.parametrize("ca_cert", ["system", "other"])
def test_tls_refuses_a_server_it_cannot_verify(tls: Tls, tmp_path: Path, ca_cert: str) -> None:
    extra = {} if ca_cert == "system" else {"ca_cert": str(TestCA(tmp_path / "other", "other CA").file)}
    section = vault_section(tls.bao, tls.key, {"method": "token", "token_file": str(tls.token_file)}, **extra)
    if ca_cert == "system":
        section.pop("ca_cert")
    p = provider(section)
    try:
        with pytest.raises(BackendUnavailable, match=r"TLS to Vault at .* failed: (CERTIFICATE_VERIFY_FAILED|cert)"):
            p.check()
    finally:
        p.close()


def test_cert_auth(tls: Tls, tmp_path: Path) -> None:
    p = provider(vault_section(tls.bao, tls.key, tls.cert_auth))
    try:
        p.check()
        seed = os.urandom(32)
        assert p.decrypt(p.encrypt(seed, "u").ciphertext, "", {}, "u") == seed
    finally:
        p.close()
    # A certificate from a CA Vault does not trust for this role is refused as an auth failure.
    stranger_cert, stranger_key = TestCA(tmp_path / "stranger", "stranger CA").issue("kleidi-node", client=True)
    auth = {**tls.cert_auth, "client_cert": str(stranger_cert), "client_key": str(stranger_key)}
    p = provider(vault_section(tls.bao, tls.key, auth))
    try:
        with pytest.raises(AuthFailed, match="cert login at auth/cert refused"):
            p.check()
    finally:
        p.close()


def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def plugin(tls: Tls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KleidiProcess]:
    """kleidi serve over TLS with cert auth, for the outage tests (which run in file order)."""
    config = {"provider": "vault", "health_interval": "1s", "vault": vault_section(tls.bao, tls.key, tls.cert_auth)}
    with KleidiProcess(tmp_path_factory.mktemp("kleidi"), config) as proc:
        proc.start()
        proc.wait_healthy()
        yield proc


def test_sealed_vault_is_unhealthy_and_recovers_after_unseal(tls: Tls, plugin: KleidiProcess) -> None:
    with plugin.client(timeout=1.0) as kms:
        seed = os.urandom(32)
        before = kms.encrypt(seed)
        tls.bao.seal()
        _, reason = wait_for(lambda: (h := plugin.healthz())[0] == 503 and h, 10, "healthz to turn 503")
        assert "sealed" in reason
        assert "sealed" in kms.status().healthz
        assert _code(lambda: kms.encrypt(os.urandom(32))) == grpc.StatusCode.UNAVAILABLE
        assert _code(lambda: kms.decrypt(before.ciphertext)) == grpc.StatusCode.UNAVAILABLE
        tls.bao.unseal()
        plugin.wait_healthy(15)
        assert kms.status().key_id == before.key_id
        assert kms.decrypt(before.ciphertext, before.key_id) == seed
    assert plugin.proc is not None and plugin.proc.poll() is None


def test_vault_killed_and_restarted_mid_load_gives_no_wrong_or_lost_answer(tls: Tls, plugin: KleidiProcess) -> None:
    written: list[tuple[bytes, bytes]] = []  # (seed, ciphertext) of every Encrypt that answered OK
    wrong: list[str] = []
    failures: dict[grpc.StatusCode, int] = {}
    ok_after_restart = threading.Event()
    restarted = threading.Event()
    stop = threading.Event()
    lock = threading.Lock()

    def load(worker: int) -> None:
        with plugin.client(timeout=3.0) as kms:
            while not stop.is_set():
                seed = os.urandom(32)
                try:
                    answer = kms.encrypt(seed, uid=f"w{worker}")
                    with lock:
                        written.append((seed, answer.ciphertext))
                    if kms.decrypt(answer.ciphertext, answer.key_id) != seed:
                        wrong.append("decrypt returned a different seed")
                    if restarted.is_set():
                        ok_after_restart.set()
                except grpc.RpcError as err:
                    with lock:
                        failures[err.code()] = failures.get(err.code(), 0) + 1

    workers = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for worker in workers:
        worker.start()
    try:
        wait_for(lambda: len(written) >= 20, 15, "load to get going")
        tls.bao.kill()
        wait_for(lambda: plugin.healthz()[0] == 503, 10, "healthz to notice the dead Vault")
        # Stay down past a few call deadlines, so callers see the outage (shorter ones are absorbed by retries).
        wait_for(lambda: sum(failures.values()) >= 4, 20, "callers to see the outage")
        tls.bao.start()  # comes back sealed; the fixture unseals it, as an operator or auto-unseal would
        restarted.set()
        wait_for(ok_after_restart.is_set, 20, "calls to succeed again after the restart")
        plugin.wait_healthy(15)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert wrong == []
    assert set(failures) == {grpc.StatusCode.UNAVAILABLE}, failures
    # Nothing written before, during or after the outage is lost: every acknowledged ciphertext decrypts.
    with plugin.client() as kms:
        for seed, ciphertext in written:
            assert kms.decrypt(ciphertext) == seed
    assert plugin.proc is not None and plugin.proc.poll() is None
