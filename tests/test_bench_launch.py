"""bench/launch.py: a kleidi with a mechanism taken out must do the same work, or the benchmark's comparison means
nothing. Taken out here: the ctypes token calls (providers/pkcs11_direct.py), replaced by PyKCS11's Session calls;
the token's own AES-GCM work, done in process as the floor does it; and everything on the request path but the
token call."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.backends.softhsm import SoftHsm
from tests.conftest import pkcs11_config
from tests.plugin import KleidiProcess

pytestmark = pytest.mark.integration

_WITHOUT_DIRECT = ("-m", "bench.launch", "--without", "pkcs11-direct")
_WITHOUT_TOKEN_WORK = ("-m", "bench.launch", "--without", "token-work")
_WITHOUT_REQUEST_PATH = ("-m", "bench.launch", "--without", "request-path")


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    token = SoftHsm(tmp_path_factory.mktemp("hsm"))
    token.keygen("kek-1")
    token.keygen("mac-1", "GENERIC:32")
    return token


@contextlib.contextmanager
def _beside_shipped(
    workdir: Path, hsm: SoftHsm, config: dict[str, Any], launcher: tuple[str, ...]
) -> Iterator[tuple[KleidiProcess, KleidiProcess]]:
    """kleidi as shipped and kleidi started by ``launcher``, both serving, on the same token and config."""
    with (
        KleidiProcess(workdir / "shipped", config, env=hsm.env) as shipped,
        KleidiProcess(workdir / "variant", config, env=hsm.env, launcher=launcher) as variant,
    ):
        for each in (shipped, variant):
            each.start()
            each.wait_healthy()
        yield shipped, variant


@pytest.fixture(params=["aes-gcm", "aes-cbc-hmac"])
def pair(request: pytest.FixtureRequest, tmp_path: Path, hsm: SoftHsm) -> Iterator[tuple[KleidiProcess, KleidiProcess]]:
    """kleidi as shipped and kleidi on PyKCS11's calls, on the same token and KEK."""
    extra = {"mechanism": "aes-cbc-hmac", "hmac_key_label": "mac-1"} if request.param == "aes-cbc-hmac" else {}
    with _beside_shipped(tmp_path, hsm, pkcs11_config(hsm, **extra), _WITHOUT_DIRECT) as both:
        yield both


def test_without_direct_calls_same_blobs_both_ways(pair: tuple[KleidiProcess, KleidiProcess]) -> None:
    shipped, pykcs11 = pair
    with shipped.client() as ours, pykcs11.client() as theirs:
        assert theirs.status().key_id == ours.status().key_id
        for maker, opener in ((ours, theirs), (theirs, ours)):
            seed = os.urandom(32)
            answer = maker.encrypt(seed)
            assert opener.decrypt(answer.ciphertext, answer.key_id) == seed
            dek = os.urandom(32)
            assert opener.v1_decrypt(maker.v1_encrypt(dek)) == dek


def test_without_direct_calls_still_refuses_tampering(pair: tuple[KleidiProcess, KleidiProcess]) -> None:
    shipped, pykcs11 = pair
    with shipped.client() as ours, pykcs11.client() as theirs:
        answer = ours.encrypt(os.urandom(32))
        tampered = answer.ciphertext[:-1] + bytes([answer.ciphertext[-1] ^ 1])
        with pytest.raises(grpc.RpcError) as info:
            theirs.decrypt(tampered, answer.key_id)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_without_token_work_does_the_aes_gcm_in_process(tmp_path: Path, hsm: SoftHsm) -> None:
    with (
        _beside_shipped(tmp_path, hsm, pkcs11_config(hsm), _WITHOUT_TOKEN_WORK) as (shipped, in_process),
        shipped.client() as ours,
        in_process.client() as theirs,
    ):
        # the same KEK label, but the key_id's fingerprint is made by the in-process key, not the token's
        ours_id, theirs_id = ours.status().key_id, theirs.status().key_id
        assert theirs_id.rsplit(":", 1)[0] == ours_id.rsplit(":", 1)[0] == "pkcs11:aes-gcm:kek-1"
        assert theirs_id != ours_id
        # its own blobs round-trip, v2 and v1
        seed = os.urandom(32)
        answer = theirs.encrypt(seed)
        assert theirs.decrypt(answer.ciphertext, answer.key_id) == seed
        dek = os.urandom(32)
        assert theirs.v1_decrypt(theirs.v1_encrypt(dek)) == dek
        # the work is not the token's: neither opens the other's blobs, whose key_id names another key
        for maker, opener in ((ours, theirs), (theirs, ours)):
            made = maker.encrypt(os.urandom(32))
            with pytest.raises(grpc.RpcError) as info:
                opener.decrypt(made.ciphertext, made.key_id)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        tampered = answer.ciphertext[:-1] + bytes([answer.ciphertext[-1] ^ 1])
        with pytest.raises(grpc.RpcError) as info:
            theirs.decrypt(tampered, answer.key_id)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_without_request_path_makes_and_opens_the_same_blobs_with_the_token(tmp_path: Path, hsm: SoftHsm) -> None:
    with (
        _beside_shipped(tmp_path, hsm, pkcs11_config(hsm), _WITHOUT_REQUEST_PATH) as (shipped, bare),
        shipped.client() as ours,
        bare.client() as theirs,
    ):
        key_id = ours.status().key_id
        for maker, opener in ((ours, theirs), (theirs, ours)):
            seed = os.urandom(32)
            answer = maker.encrypt(seed)
            assert answer.key_id == key_id
            assert opener.decrypt(answer.ciphertext, answer.key_id) == seed
            dek = os.urandom(32)
            assert opener.v1_decrypt(maker.v1_encrypt(dek)) == dek
        # kleidi's request path is gone from the one, not the other: both served the same calls, one counted them
        assert _requests(shipped) == 4 and _requests(bare) == 0


def _requests(plugin: KleidiProcess) -> float:
    """kleidi_requests_total over every label."""
    return sum(value for sample, value in plugin.metrics().items() if sample.startswith("kleidi_requests_total{"))
