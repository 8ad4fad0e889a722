"""The Vault transit provider in-process against a real OpenBao dev server: transit, key_id, rotation, errors."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import hvac.exceptions
import pytest

from kleidi.config import VaultConfig
from kleidi.errors import AuthFailed, BackendUnavailable, ConfigError, IntegrityError, InvalidInput, KeyNotFound
from kleidi.observability import Metrics
from kleidi.providers.vault import VaultProvider
from tests.backends.openbao import OpenBao, free_port, policy_hcl, shared_dev_server, unique, vault_section, wait_for

pytestmark = pytest.mark.integration


@dataclass
class Setup:
    bao: OpenBao
    key: str
    policy: str
    token: str
    token_file: Path
    metrics: Metrics
    provider: VaultProvider

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


Factory = Callable[..., VaultProvider]


@pytest.fixture(scope="module")
def bao() -> OpenBao:
    return shared_dev_server()


@pytest.fixture
def make_provider() -> Iterator[Factory]:
    """Builds providers from a vault section and closes them after the test."""
    made: list[VaultProvider] = []

    def make(section: dict[str, Any], metrics: Metrics | None = None) -> VaultProvider:
        provider = VaultProvider(VaultConfig.model_validate(section), metrics or Metrics())
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()


@pytest.fixture
def setup(bao: OpenBao, tmp_path: Path, make_provider: Factory) -> Setup:
    """A fresh transit key, the least-privilege policy on it, and a provider logged in with a token of that policy."""
    key = unique()
    bao.create_key(key)
    policy = bao.kleidi_policy(key)
    token = bao.token([policy], ttl="1h")
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    metrics = Metrics()
    provider = make_provider(vault_section(bao, key, {"method": "token", "token_file": str(token_file)}), metrics)
    return Setup(bao, key, policy, token, token_file, metrics, provider)


def flip_bit(ciphertext: bytes, index: int) -> bytes:
    """Flip one bit of the raw bytes inside a transit ciphertext, keeping it valid base64."""
    prefix, _, encoded = ciphertext.rpartition(b":")
    raw = bytearray(base64.b64decode(encoded))
    raw[index] ^= 0x01
    return prefix + b":" + base64.b64encode(bytes(raw))


def expected_key_id(bao: OpenBao, key: str, version: int, mount: str = "transit") -> str:
    digest = hashlib.sha256(f"{bao.address}||{mount}|{key}".encode()).hexdigest()[:16]
    # the version's creation time keeps a re-created key from reusing an old key_id
    created = bao.client().secrets.transit.read_key(key, mount_point=mount)["data"]["keys"][str(version)]
    return f"vault:{digest}:v{version}:{hashlib.sha256(str(created).encode()).hexdigest()[:8]}"


def test_round_trip_key_id_and_ciphertext_shape(setup: Setup) -> None:
    provider = setup.provider
    assert provider.key_id() == ""  # nothing is known before the first check; Status reports unhealthy
    provider.check()
    assert provider.key_id() == expected_key_id(setup.bao, setup.key, 1)
    seed = os.urandom(32)
    wrapped = provider.encrypt(seed, "uid-1")
    assert wrapped.key_id == provider.key_id()
    assert wrapped.ciphertext.startswith(b"vault:v1:")
    assert len(wrapped.ciphertext) < 1024
    assert dict(wrapped.annotations) == {}
    assert seed not in wrapped.ciphertext and base64.b64encode(seed) not in wrapped.ciphertext
    assert provider.decrypt(wrapped.ciphertext, wrapped.key_id, {}, "uid-2") == seed
    assert provider.encrypt(seed, "uid-3").ciphertext != wrapped.ciphertext
    # KMS v1 sends no key_id; the ciphertext says which version to use
    assert provider.decrypt(wrapped.ciphertext, "", {}, "") == seed


def test_encrypt_before_any_check_reads_the_key_itself(setup: Setup) -> None:
    wrapped = setup.provider.encrypt(b"k" * 32, "uid")
    assert wrapped.key_id == expected_key_id(setup.bao, setup.key, 1) == setup.provider.key_id()


def test_key_id_is_stable_across_instances_and_distinct_per_key(
    setup: Setup, bao: OpenBao, make_provider: Factory
) -> None:
    setup.provider.check()
    again = make_provider(vault_section(bao, setup.key, {"method": "token", "token_file": str(setup.token_file)}))
    again.check()
    assert again.key_id() == setup.provider.key_id()
    other_key = unique()
    bao.create_key(other_key)
    root_file = setup.token_file.parent / "root-token"
    root_file.write_text(bao.root_token)
    other = make_provider(vault_section(bao, other_key, {"method": "token", "token_file": str(root_file)}))
    other.check()
    assert other.key_id() != setup.provider.key_id()
    other_mount = make_provider(
        vault_section(bao, other_key, {"method": "token", "token_file": str(root_file)}, transit_mount="transit2")
    )
    bao.create_key(other_key, mount="transit2")
    other_mount.check()
    assert other_mount.key_id() not in (other.key_id(), setup.provider.key_id())
    assert other_mount.key_id() == expected_key_id(bao, other_key, 1, mount="transit2")


def test_rotation_changes_key_id_at_check_and_old_data_still_decrypts(setup: Setup, bao: OpenBao) -> None:
    provider = setup.provider
    provider.check()
    v1_id = provider.key_id()
    old_seed = os.urandom(32)
    old = provider.encrypt(old_seed, "before")
    assert bao.rotate_key(setup.key) == 2
    # Until the health loop's check sees the rotation, Encrypt keeps agreeing with what Status reports.
    assert provider.encrypt(os.urandom(32), "lagging").key_id == v1_id == provider.key_id()
    provider.check()
    v2_id = provider.key_id()
    assert v2_id == expected_key_id(bao, setup.key, 2) != v1_id
    new_seed = os.urandom(32)
    new = provider.encrypt(new_seed, "after")
    assert new.key_id == v2_id and new.ciphertext.startswith(b"vault:v2:")
    assert provider.decrypt(old.ciphertext, old.key_id, {}, "old") == old_seed
    assert provider.decrypt(new.ciphertext, new.key_id, {}, "new") == new_seed
    # Once Vault forbids decrypting v1, old data fails clearly instead of silently.
    bao.client().secrets.transit.update_key_configuration(setup.key, min_decryption_version=2)
    with pytest.raises(KeyNotFound, match="key version"):
        provider.decrypt(old.ciphertext, old.key_id, {}, "old")
    assert provider.decrypt(new.ciphertext, new.key_id, {}, "new") == new_seed


def test_raised_min_encryption_version_moves_encrypt_only_with_status(setup: Setup, bao: OpenBao) -> None:
    provider = setup.provider
    provider.check()
    published = provider.key_id()
    bao.rotate_key(setup.key)
    bao.rotate_key(setup.key)
    bao.client().secrets.transit.update_key_configuration(setup.key, min_encryption_version=3)
    # Status still reports v1, which may no longer encrypt: answering with v3's key_id would break the
    # apiserver's Status == Encrypt rule, so Encrypt fails (UNAVAILABLE, which runs the check at once) ...
    with pytest.raises(BackendUnavailable, match="version 1 may no longer encrypt"):
        provider.encrypt(b"s" * 32, "uid")
    assert provider.key_id() == published
    # ... and the check proves and publishes the newest version, for Status and Encrypt together
    provider.check()
    wrapped = provider.encrypt(b"s" * 32, "uid")
    assert wrapped.ciphertext.startswith(b"vault:v3:")
    assert wrapped.key_id == expected_key_id(bao, setup.key, 3) == provider.key_id()


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda ct: os.urandom(len(ct)), InvalidInput),
        (lambda ct: b"not a transit ciphertext", InvalidInput),
        (lambda ct: ct[:-12], InvalidInput),
        (lambda ct: ct[:9] + b"!!" + ct[11:], InvalidInput),
        (lambda ct: flip_bit(ct, 20), IntegrityError),
        (lambda ct: b"vault:v99:" + ct[9:], KeyNotFound),
    ],
    ids=["garbage", "not-transit", "truncated", "bad-base64", "bit-flip", "unknown-version"],
)
def test_bad_ciphertext_is_rejected_never_decrypted(
    setup: Setup, mutate: Callable[[bytes], bytes], error: type[Exception]
) -> None:
    seed = os.urandom(32)
    wrapped = setup.provider.encrypt(seed, "uid")
    bad = mutate(wrapped.ciphertext)
    with pytest.raises(error) as info:
        setup.provider.decrypt(bad, wrapped.key_id, {}, "uid")
    assert setup.token not in str(info.value)
    assert info.value.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


def test_ciphertext_of_another_key_fails_integrity(setup: Setup, bao: OpenBao) -> None:
    other = unique()
    bao.create_key(other)
    foreign = bao.client().secrets.transit.encrypt_data(other, base64.b64encode(b"x" * 32).decode())
    with pytest.raises(IntegrityError):
        setup.provider.decrypt(foreign["data"]["ciphertext"].encode(), "", {}, "uid")


def test_policy_allows_kleidi_and_nothing_more(setup: Setup, bao: OpenBao) -> None:
    setup.provider.check()  # encrypt, decrypt and read on the key: enough for everything kleidi does
    other = unique()
    bao.create_key(other)
    limited = bao.client(setup.token)
    for forbidden in (
        lambda: limited.secrets.transit.encrypt_data(other, "AAAA"),
        lambda: limited.secrets.transit.rotate_key(setup.key),
        lambda: limited.secrets.transit.create_key(unique()),
        lambda: limited.secrets.transit.export_key(setup.key, "encryption-key"),
    ):
        with pytest.raises(hvac.exceptions.Forbidden):
            forbidden()


def test_policy_without_key_read_fails_check_with_a_reason(
    bao: OpenBao, tmp_path: Path, make_provider: Factory
) -> None:
    key = unique()
    bao.create_key(key)
    name = unique("no-read")
    bao.client().sys.create_or_update_policy(
        name,
        f'path "transit/encrypt/{key}" {{ capabilities = ["update"] }}\n'
        f'path "transit/decrypt/{key}" {{ capabilities = ["update"] }}\n',
    )
    token = bao.token([name], ttl="1h")
    (tmp_path / "t").write_text(token)
    provider = make_provider(vault_section(bao, key, {"method": "token", "token_file": str(tmp_path / "t")}))
    with pytest.raises(AuthFailed, match="policy") as info:
        provider.check()
    assert token not in str(info.value)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_missing_key_and_derived_key_fail_check(bao: OpenBao, tmp_path: Path, make_provider: Factory) -> None:
    (tmp_path / "root").write_text(bao.root_token)
    auth = {"method": "token", "token_file": str(tmp_path / "root")}
    missing = make_provider(vault_section(bao, unique("missing"), auth))
    with pytest.raises(KeyNotFound, match="not found"):
        missing.check()
    derived_key = unique("derived")
    bao.create_key(derived_key, derived=True)
    with pytest.raises(ConfigError, match="derived"):
        make_provider(vault_section(bao, derived_key, auth)).check()


def test_revoked_token_fails_unavailable_then_recovers_from_a_new_token_file(setup: Setup, bao: OpenBao) -> None:
    provider = setup.provider
    provider.check()
    bao.client().auth.token.revoke(setup.token)
    with pytest.raises(AuthFailed) as info:
        provider.encrypt(b"x" * 32, "uid")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert setup.token not in str(info.value)
    with pytest.raises(AuthFailed):
        provider.check()
    fresh = bao.token([setup.policy], ttl="1h")
    setup.token_file.write_text(fresh + "\n")

    def healthy() -> bool:
        try:
            provider.check()
        except AuthFailed:
            return False
        return True

    wait_for(healthy, 10, "the provider to pick up the new token file")
    seed = os.urandom(32)
    assert provider.decrypt(provider.encrypt(seed, "u").ciphertext, "", {}, "u") == seed


def test_unreachable_vault_fails_unavailable_inside_the_deadline(tmp_path: Path, make_provider: Factory) -> None:
    (tmp_path / "t").write_text("not-a-real-token")
    section = {
        "address": f"http://127.0.0.1:{free_port()}",
        "key_name": "kleidi",
        "timeout": "2s",
        "auth": {"method": "token", "token_file": str(tmp_path / "t")},
    }
    provider = make_provider(section)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="cannot connect"):
        provider.encrypt(b"x" * 32, "uid", deadline=time.monotonic() + 0.6)
    assert time.monotonic() - started < 1.2
    with pytest.raises(BackendUnavailable):
        provider.check()
    assert provider.key_id() == ""


def test_concurrent_calls_share_one_login(setup: Setup) -> None:
    seeds = [os.urandom(32) for _ in range(64)]
    results: list[bytes] = [b""] * len(seeds)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            wrapped = setup.provider.encrypt(seeds[i], f"uid-{i}")
            results[i] = setup.provider.decrypt(wrapped.ciphertext, wrapped.key_id, {}, f"uid-{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(seeds))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == seeds
    assert setup.sample("kleidi_vault_logins_total", method="token", result="ok") == 1
    assert setup.sample("kleidi_vault_requests_total", operation="encrypt", status="200") == 64
    assert setup.sample("kleidi_vault_requests_total", operation="decrypt", status="200") == 64
    assert setup.sample("kleidi_vault_request_duration_seconds_count", operation="encrypt") == 64
    assert setup.sample("kleidi_backend_duration_seconds_count", provider="vault", operation="decrypt") == 64
    assert setup.token.encode() not in setup.metrics.render()


def test_namespace_login_and_transit_stay_inside_the_namespace(
    bao: OpenBao, tmp_path: Path, make_provider: Factory
) -> None:
    namespace = unique("ns")
    bao.write(f"sys/namespaces/{namespace}")
    admin = hvac.Client(url=bao.address, token=bao.root_token, namespace=namespace)
    admin.sys.enable_secrets_engine("transit", path="transit")
    admin.secrets.transit.create_key("kleidi")
    admin.sys.create_or_update_policy("kleidi", policy_hcl("kleidi"))
    admin.sys.enable_auth_method("approle")
    admin.adapter.post("/v1/auth/approle/role/kleidi", json={"token_policies": ["kleidi"], "token_ttl": "1h"})
    (tmp_path / "role-id").write_text(admin.adapter.get("/v1/auth/approle/role/kleidi/role-id")["data"]["role_id"])
    secret = admin.adapter.post("/v1/auth/approle/role/kleidi/secret-id", json={})
    (tmp_path / "secret-id").write_text(secret["data"]["secret_id"])
    auth = {
        "method": "approle",
        "role_id_file": str(tmp_path / "role-id"),
        "secret_id_file": str(tmp_path / "secret-id"),
    }
    provider = make_provider(vault_section(bao, "kleidi", auth, namespace=namespace))
    provider.check()
    digest = hashlib.sha256(f"{bao.address}|{namespace}|transit|kleidi".encode()).hexdigest()[:16]
    created = admin.secrets.transit.read_key("kleidi")["data"]["keys"]["1"]
    assert provider.key_id() == f"vault:{digest}:v1:{hashlib.sha256(str(created).encode()).hexdigest()[:8]}"
    seed = os.urandom(32)
    wrapped = provider.encrypt(seed, "uid")
    assert provider.decrypt(wrapped.ciphertext, wrapped.key_id, {}, "uid") == seed
    # The namespace's key is not the root namespace's: its ciphertext means nothing there.
    with pytest.raises(hvac.exceptions.VaultError):
        bao.client().secrets.transit.decrypt_data("kleidi", wrapped.ciphertext.decode())


def test_a_recreated_key_never_reuses_a_key_id(setup: Setup, bao: OpenBao, make_provider: Factory) -> None:
    setup.provider.check()
    before = setup.provider.key_id()
    client = bao.client()
    client.secrets.transit.update_key_configuration(setup.key, deletion_allowed=True)
    client.secrets.transit.delete_key(setup.key)
    time.sleep(1.1)  # transit stamps versions with whole seconds
    client.secrets.transit.create_key(setup.key)
    again = make_provider(vault_section(bao, setup.key, {"method": "token", "token_file": str(setup.token_file)}))
    again.check()
    assert again.key_id().startswith(before.rsplit(":", 1)[0] + ":") and again.key_id() != before
