"""End to end: `kleidi serve` on Vault transit (a real OpenBao dev server), called over its socket."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from kleidi.client import KmsClient
from tests.backends.openbao import JwtIssuer, OpenBao, shared_dev_server, unique, vault_section
from tests.plugin import KleidiProcess, wait_for

pytestmark = pytest.mark.integration

TOKEN_SHAPES = re.compile(r"\b(?:hv[sbr]|[sbr])\.[A-Za-z0-9]{20,}|eyJ[A-Za-z0-9_-]+\.eyJ")


def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[no-any-return]


def vault_config(bao: OpenBao, key: str, auth: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "provider": "vault",
        "health_interval": "1s",
        "log_level": "debug",
        **top,
        "vault": vault_section(bao, key, auth),
    }


class Deployment:
    """A transit key, its policy, an AppRole and a JWT role whose credentials sit in files, as on a node."""

    def __init__(self, bao: OpenBao, root: Path) -> None:
        self.bao = bao
        self.key = unique()
        bao.create_key(self.key)
        self.policy = bao.kleidi_policy(self.key)
        mount = bao.enable_auth("approle")
        role = unique("role")
        bao.write(f"auth/{mount}/role/{role}", token_policies=[self.policy], token_ttl="1h")
        self.role_id = bao.client().adapter.get(f"/v1/auth/{mount}/role/{role}/role-id")["data"]["role_id"]
        self.secret_id = bao.write(f"auth/{mount}/role/{role}/secret-id")["data"]["secret_id"]
        root.mkdir(parents=True, exist_ok=True)
        (root / "role-id").write_text(self.role_id)
        (root / "secret-id").write_text(self.secret_id)
        self.approle = {
            "method": "approle",
            "role_id_file": str(root / "role-id"),
            "secret_id_file": str(root / "secret-id"),
        }
        issuer = JwtIssuer()
        self.jwt_mount = bao.enable_auth("jwt", unique("jwt"))
        bao.write(f"auth/{self.jwt_mount}/config", jwt_validation_pubkeys=[issuer.public_pem])
        bao.write(
            f"auth/{self.jwt_mount}/role/kleidi",
            role_type="jwt",
            bound_audiences=["kleidi"],
            user_claim="sub",
            token_policies=[self.policy],
            token_ttl="1h",
        )
        self.jwt = issuer.sign({"sub": "node-1", "aud": "kleidi"})
        (root / "jwt").write_text(self.jwt)
        self.jwt_auth = {"method": "jwt", "mount": self.jwt_mount, "role": "kleidi", "jwt_file": str(root / "jwt")}


@pytest.fixture(scope="module")
def bao() -> OpenBao:
    return shared_dev_server()


@pytest.fixture(scope="module")
def deployment(bao: OpenBao, tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return Deployment(bao, tmp_path_factory.mktemp("creds"))


@pytest.fixture(scope="module")
def serving(bao: OpenBao, deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KleidiProcess]:
    with KleidiProcess(tmp_path_factory.mktemp("kleidi"), vault_config(bao, deployment.key, deployment.approle)) as p:
        p.start()
        p.wait_healthy()
        yield p


def test_status_encrypt_decrypt_agree(serving: KleidiProcess) -> None:
    with serving.client() as kms:
        status = kms.status()
        assert (status.version, status.healthz) == ("v2", "ok")
        assert re.fullmatch(r"vault:[0-9a-f]{16}:v1:[0-9a-f]{8}", status.key_id)
        seed = os.urandom(32)
        answer = kms.encrypt(seed, uid="uid-1")
        assert answer.key_id == status.key_id
        assert answer.ciphertext.startswith(b"vault:v1:") and len(answer.ciphertext) < 1024
        assert dict(answer.annotations) == {}
        assert kms.decrypt(answer.ciphertext, answer.key_id, {}, "uid-2") == seed
        assert kms.v1_version().version == "v1beta1"
        dek = os.urandom(32)
        assert kms.v1_decrypt(kms.v1_encrypt(dek)) == dek


def test_bad_ciphertext_is_invalid_argument_and_serving_continues(serving: KleidiProcess) -> None:
    with serving.client() as kms:
        good = kms.encrypt(os.urandom(32)).ciphertext
        flipped = good[:12] + bytes([good[12] ^ 1]) + good[13:]
        for bad in (os.urandom(64), b"vault:v1:!!!!", flipped):
            assert _code(lambda bad=bad: kms.decrypt(bad)) == grpc.StatusCode.INVALID_ARGUMENT
        assert kms.status().healthz == "ok"


def test_parallel_clients(serving: KleidiProcess) -> None:
    def one(i: int) -> bool:
        with KmsClient(serving.socket) as kms:
            seeds = [os.urandom(32) for _ in range(10)]
            return all(kms.decrypt(kms.encrypt(s, uid=f"{i}").ciphertext) == s for s in seeds)

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, range(8)))


def test_rotation_shows_in_status_within_one_health_interval(
    bao: OpenBao, deployment: Deployment, serving: KleidiProcess
) -> None:
    with serving.client() as kms:
        before = kms.status().key_id
        seed = os.urandom(32)
        old = kms.encrypt(seed)
        version = bao.rotate_key(deployment.key)
        status = wait_for(lambda: (s := kms.status()).key_id != before and s, 3, "Status to show the rotation")
        assert f":v{version}:" in status.key_id and status.healthz == "ok"
        fresh = kms.encrypt(os.urandom(32))
        assert fresh.key_id == status.key_id
        assert fresh.ciphertext.startswith(f"vault:v{version}:".encode())
        assert kms.decrypt(old.ciphertext, old.key_id) == seed


def test_metrics_show_vault_requests_logins_and_ttl(serving: KleidiProcess) -> None:
    code, text = serving.http("/metrics")
    assert code == 200
    assert 'kleidi_vault_requests_total{operation="encrypt",status="200"}' in text
    assert 'kleidi_vault_requests_total{operation="read_key",status="200"}' in text
    assert 'kleidi_vault_logins_total{method="approle",result="ok"} 1.0' in text
    assert "kleidi_vault_request_duration_seconds_bucket" in text
    ttl = next(line for line in text.splitlines() if line.startswith("kleidi_vault_token_ttl_seconds "))
    assert 0 < float(ttl.split()[1]) <= 3600


def test_auth_failure_never_exits_and_recovers_by_itself(bao: OpenBao, deployment: Deployment, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token = bao.token([deployment.policy], ttl="1h")
    token_file.write_text(token)
    config = vault_config(bao, deployment.key, {"method": "token", "token_file": str(token_file)})
    with KleidiProcess(tmp_path / "kleidi", config) as plugin:
        plugin.start()
        plugin.wait_healthy()
        bao.client().auth.token.revoke(token)
        _, reason = wait_for(lambda: (h := plugin.healthz())[0] == 503 and h, 10, "healthz to turn 503")
        assert "invalid, expired or revoked" in reason
        with plugin.client() as kms:
            assert _code(lambda: kms.encrypt(os.urandom(32))) == grpc.StatusCode.UNAVAILABLE
            assert "revoked" in kms.status().healthz
            replacement = bao.token([deployment.policy], ttl="1h")
            token_file.write_text(replacement + "\n")
            plugin.wait_healthy(15)
            seed = os.urandom(32)
            assert kms.decrypt(kms.encrypt(seed).ciphertext) == seed
        assert plugin.proc is not None and plugin.proc.poll() is None
        log = plugin.log()
        assert token not in log and replacement not in log


def test_jwt_login_and_no_secret_in_logs_or_metrics(
    bao: OpenBao, deployment: Deployment, serving: KleidiProcess, tmp_path: Path
) -> None:
    with KleidiProcess(tmp_path / "kleidi", vault_config(bao, deployment.key, deployment.jwt_auth)) as plugin:
        plugin.start()
        plugin.wait_healthy()
        with plugin.client() as kms:
            seed = os.urandom(32)
            assert kms.decrypt(kms.encrypt(seed).ciphertext) == seed
        jwt_metrics = plugin.http("/metrics")[1]
    jwt_log = plugin.log()
    approle_metrics = serving.http("/metrics")[1]
    approle_log = serving.log()
    assert '"msg":"vault login"' in jwt_log and '"msg":"vault login"' in approle_log
    for secret in (deployment.secret_id, deployment.role_id, deployment.jwt, *deployment.jwt.split(".")[1:]):
        for text in (jwt_log, approle_log, jwt_metrics, approle_metrics):
            assert secret not in text
    # Whatever tokens Vault handed out, nothing shaped like one (s.…, hvs.…) or like a JWT is in the logs.
    for text in (jwt_log, approle_log):
        assert TOKEN_SHAPES.search(text) is None, TOKEN_SHAPES.search(text)
