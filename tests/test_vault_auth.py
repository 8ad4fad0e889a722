"""Every login method and the token lifecycle against a real OpenBao dev server (cert auth is in test_vault_tls)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hvac.exceptions
import pytest

from kleidi.config import VaultConfig
from kleidi.errors import AuthFailed
from kleidi.observability import Metrics
from kleidi.providers.vault import VaultProvider
from tests.backends.openbao import (
    JwtIssuer,
    OpenBao,
    TestCA,
    TokenReviewServer,
    shared_dev_server,
    unique,
    vault_section,
    wait_for,
)

pytestmark = pytest.mark.integration

Factory = Callable[..., tuple[VaultProvider, Metrics]]


@pytest.fixture(scope="module")
def bao() -> OpenBao:
    return shared_dev_server()


@pytest.fixture(scope="module")
def key(bao: OpenBao) -> tuple[str, str]:
    """One transit key and its least-privilege policy for the module."""
    name = unique()
    bao.create_key(name)
    return name, bao.kleidi_policy(name)


@pytest.fixture
def make_provider(bao: OpenBao, key: tuple[str, str]) -> Iterator[Factory]:
    made: list[VaultProvider] = []

    def make(auth: dict[str, Any]) -> tuple[VaultProvider, Metrics]:
        metrics = Metrics()
        provider = VaultProvider(VaultConfig.model_validate(vault_section(bao, key[0], auth)), metrics)
        made.append(provider)
        return provider, metrics

    yield make
    for provider in made:
        provider.close()


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def round_trip(provider: VaultProvider) -> None:
    seed = os.urandom(32)
    wrapped = provider.encrypt(seed, "uid")
    assert provider.decrypt(wrapped.ciphertext, wrapped.key_id, {}, "uid") == seed


def healthy(provider: VaultProvider) -> bool:
    try:
        provider.check()
    except AuthFailed:
        return False
    return True


class Approle:
    """An AppRole with its role_id and secret_id in files, as the docs set it up."""

    def __init__(self, bao: OpenBao, policy: str, root: Path, **role: Any) -> None:
        self.bao = bao
        self.mount = bao.enable_auth("approle")
        self.name = unique("role")
        options = {"token_policies": [policy], "token_ttl": "1h", "token_max_ttl": "4h", **role}
        bao.write(f"auth/{self.mount}/role/{self.name}", **options)
        self.role_id = bao.client().adapter.get(f"/v1/auth/{self.mount}/role/{self.name}/role-id")["data"]["role_id"]
        self.role_id_file = root / "role-id"
        self.secret_id_file = root / "secret-id"
        self.role_id_file.write_text(self.role_id)
        self.secret_id = self.new_secret_id()

    def new_secret_id(self) -> str:
        secret_id = str(self.bao.write(f"auth/{self.mount}/role/{self.name}/secret-id")["data"]["secret_id"])
        self.secret_id_file.write_text(secret_id + "\n")
        self.secret_id = secret_id
        return secret_id

    def destroy_secret_id(self, secret_id: str) -> None:
        self.bao.write(f"auth/{self.mount}/role/{self.name}/secret-id/destroy", secret_id=secret_id)

    def auth(self) -> dict[str, Any]:
        return {"method": "approle", "role_id_file": str(self.role_id_file), "secret_id_file": str(self.secret_id_file)}


def current_token(provider: VaultProvider) -> str:
    """The token the provider holds (the test revokes it as an operator would)."""
    token = provider._auth._token
    assert token is not None
    return token.value


def test_approle_login_and_relogin_with_a_rotated_secret_id(
    bao: OpenBao, key: tuple[str, str], tmp_path: Path, make_provider: Factory
) -> None:
    role = Approle(bao, key[1], tmp_path)
    provider, metrics = make_provider(role.auth())
    provider.check()
    round_trip(provider)
    assert sample(metrics, "kleidi_vault_logins_total", method="approle", result="ok") == 1
    # The operator rotates the secret-id on disk and destroys the old one, then revokes kleidi's token.
    old = role.secret_id
    role.new_secret_id()
    role.destroy_secret_id(old)
    bao.client().auth.token.revoke(current_token(provider))
    round_trip(provider)  # refused once, logged in again with the new secret-id, retried: the caller sees nothing
    assert sample(metrics, "kleidi_vault_logins_total", method="approle", result="ok") == 2


def test_approle_with_a_wrong_secret_id_is_auth_failed_without_the_secret(
    bao: OpenBao, key: tuple[str, str], tmp_path: Path, make_provider: Factory
) -> None:
    role = Approle(bao, key[1], tmp_path)
    wrong = "0f0f0f0f-1111-2222-3333-444455556666"
    role.secret_id_file.write_text(wrong)
    provider, metrics = make_provider(role.auth())
    with pytest.raises(AuthFailed, match="approle login at auth/approle refused") as info:
        provider.check()
    assert wrong not in str(info.value) and role.role_id not in str(info.value)
    assert sample(metrics, "kleidi_vault_logins_total", method="approle", result="error") == 1
    # Requests fail fast while the login backs off, and recover once the right secret-id is on disk.
    with pytest.raises(AuthFailed):
        provider.encrypt(b"x" * 32, "uid")
    role.new_secret_id()
    wait_for(lambda: healthy(provider), 10, "approle login with the corrected secret-id")
    round_trip(provider)


def test_jwt_login_rereads_the_jwt_file(
    bao: OpenBao, key: tuple[str, str], tmp_path: Path, make_provider: Factory
) -> None:
    issuer = JwtIssuer()
    mount = bao.enable_auth("jwt", unique("jwt"))
    bao.write(f"auth/{mount}/config", jwt_validation_pubkeys=[issuer.public_pem], bound_issuer=issuer.issuer)
    bao.write(
        f"auth/{mount}/role/kleidi",
        role_type="jwt",
        bound_audiences=["kleidi"],
        user_claim="sub",
        bound_subject="kleidi-node-1",
        token_policies=[key[1]],
        token_ttl="1h",
    )
    jwt_file = tmp_path / "jwt"
    wrong_audience = issuer.sign({"sub": "kleidi-node-1", "aud": "someone-else"})
    jwt_file.write_text(wrong_audience)
    provider, metrics = make_provider({"method": "jwt", "mount": mount, "role": "kleidi", "jwt_file": str(jwt_file)})
    with pytest.raises(AuthFailed, match=f"jwt login at auth/{mount} refused") as info:
        provider.check()
    assert wrong_audience not in str(info.value)
    assert wrong_audience.split(".")[1] not in str(info.value)
    jwt_file.write_text(issuer.sign({"sub": "kleidi-node-1", "aud": "kleidi"}))
    wait_for(lambda: healthy(provider), 10, "jwt login with the new JWT on disk")
    round_trip(provider)
    assert sample(metrics, "kleidi_vault_logins_total", method="jwt", result="ok") == 1


def test_kubernetes_login_through_tokenreview(
    bao: OpenBao, key: tuple[str, str], tmp_path: Path, make_provider: Factory
) -> None:
    ca = TestCA(tmp_path / "ca")
    review = TokenReviewServer(ca)
    try:
        issuer = JwtIssuer("https://kubernetes.default.svc.cluster.local")
        mount = bao.enable_auth("kubernetes", unique("k8s"))
        bao.write(
            f"auth/{mount}/config",
            kubernetes_host=review.address,
            kubernetes_ca_cert=ca.pem,
            token_reviewer_jwt=review.reviewer_jwt,
            disable_local_ca_jwt=True,
        )
        bao.write(
            f"auth/{mount}/role/kleidi",
            bound_service_account_names=["kleidi"],
            bound_service_account_namespaces=["kube-system"],
            token_policies=[key[1]],
            token_ttl="1h",
        )
        sa_token = issuer.service_account_token("kube-system", "kleidi")
        jwt_file = tmp_path / "sa-token"
        jwt_file.write_text(sa_token)
        auth = {"method": "kubernetes", "mount": mount, "role": "kleidi", "jwt_file": str(jwt_file)}
        provider, metrics = make_provider(auth)
        # TokenReview does not know the token yet: the apiserver says no, kleidi reports it without the JWT.
        with pytest.raises(AuthFailed, match=f"kubernetes login at auth/{mount} refused") as info:
            provider.check()
        assert sa_token not in str(info.value) and review.reviews == 1
        review.accept(sa_token, "kube-system", "kleidi")
        wait_for(lambda: healthy(provider), 10, "kubernetes login once TokenReview accepts the token")
        round_trip(provider)
        assert review.reviews == 2
        assert sample(metrics, "kleidi_vault_logins_total", method="kubernetes", result="ok") == 1
    finally:
        review.close()


def test_renewable_short_ttl_token_is_renewed_not_replaced(
    bao: OpenBao, key: tuple[str, str], tmp_path: Path, make_provider: Factory
) -> None:
    token = bao.token([key[1]], ttl="2s", explicit_max_ttl="1m", renewable=True)
    (tmp_path / "token").write_text(token)
    provider, metrics = make_provider({"method": "token", "token_file": str(tmp_path / "token")})
    provider.check()
    issued = time.monotonic()
    wait_for(lambda: sample(metrics, "kleidi_vault_token_renewals_total", result="ok") >= 3, 10, "three renewals")
    assert time.monotonic() - issued > 2  # past the original TTL: only renewals kept the token alive
    round_trip(provider)
    lookup = bao.client().auth.token.lookup(token)["data"]
    assert lookup["ttl"] > 0
    assert sample(metrics, "kleidi_vault_logins_total", method="token", result="ok") == 1
    assert 0 < sample(metrics, "kleidi_vault_token_ttl_seconds") <= 2


def test_max_ttl_forces_a_new_login_without_failing_requests(
    bao: OpenBao, key: tuple[str, str], tmp_path: Path, make_provider: Factory
) -> None:
    role = Approle(bao, key[1], tmp_path, token_ttl="2s", token_max_ttl="3s")
    provider, metrics = make_provider(role.auth())
    provider.check()
    errors: list[BaseException] = []
    done = threading.Event()
    calls = 0

    def load() -> None:
        nonlocal calls
        while not done.is_set():
            try:
                round_trip(provider)
                calls += 1
            except BaseException as exc:
                errors.append(exc)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        wait_for(
            lambda: sample(metrics, "kleidi_vault_logins_total", method="approle", result="ok") >= 3, 15, "re-logins"
        )
    finally:
        done.set()
        worker.join()
    assert errors == []
    assert calls > 10
    assert sample(metrics, "kleidi_vault_token_renewals_total", result="ok") >= 1


def test_close_revokes_a_login_token_but_never_a_configured_one(
    bao: OpenBao, key: tuple[str, str], tmp_path: Path, make_provider: Factory
) -> None:
    role = Approle(bao, key[1], tmp_path)
    provider, _ = make_provider(role.auth())
    provider.check()
    login_token = current_token(provider)
    provider.close()
    with pytest.raises(hvac.exceptions.Forbidden):
        bao.client(login_token).auth.token.lookup_self()
    configured = bao.token([key[1]], ttl="1h")
    (tmp_path / "token").write_text(configured)
    provider, _ = make_provider({"method": "token", "token_file": str(tmp_path / "token")})
    provider.check()
    provider.close()
    assert bao.client(configured).auth.token.lookup_self()["data"]["ttl"] > 0
