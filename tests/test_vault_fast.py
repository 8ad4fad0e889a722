"""The Vault fast path (one attempt on the event loop) against a real OpenBao, and its HTTP reader."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from kleidi.config import VaultConfig
from kleidi.errors import IntegrityError, InvalidInput
from kleidi.observability import Metrics
from kleidi.providers.base import fast_path
from kleidi.providers.pkcs11 import Pkcs11Provider
from kleidi.providers.vault import VaultProvider
from kleidi.providers.vault_fast import _read_response
from tests.backends.openbao import OpenBao, shared_dev_server, unique, vault_section


@pytest.fixture(scope="module")
def bao() -> OpenBao:
    return shared_dev_server()


def _provider(bao: OpenBao, tmp_path: Path, metrics: Metrics) -> VaultProvider:
    key = unique()
    bao.create_key(key)
    token_file = tmp_path / "token"
    token_file.write_text(bao.token([bao.kleidi_policy(key)], ttl="1h"))
    section = vault_section(bao, key, {"method": "token", "token_file": str(token_file)})
    return VaultProvider(VaultConfig.model_validate(section), metrics)


@pytest.mark.integration
def test_fast_path_round_trip_and_fallbacks(bao: OpenBao, tmp_path: Path) -> None:
    metrics = Metrics()
    provider = _provider(bao, tmp_path, metrics)
    assert fast_path(provider) is provider

    async def scenario() -> None:
        seed = os.urandom(32)
        assert await provider.encrypt_fast(seed) is None  # no token or key version yet: take the regular path
        provider.check()
        wrapped = await provider.encrypt_fast(seed)
        assert wrapped is not None and wrapped.key_id == provider.key_id()
        assert await provider.decrypt_fast(wrapped.ciphertext, wrapped.key_id, {}) == seed
        assert provider.decrypt(wrapped.ciphertext, wrapped.key_id, {}, "u") == seed  # same blob, regular path
        # a final answer (tampered data) is reported at once, as the regular path would: no second transit call
        prefix, _, body = wrapped.ciphertext.rpartition(b":")
        tampered = prefix + b":" + (b"A" if body[:1] != b"A" else b"B") + body[1:]
        with pytest.raises((IntegrityError, InvalidInput)):
            await provider.decrypt_fast(tampered, "", {})
        with pytest.raises((IntegrityError, InvalidInput)):
            provider.decrypt(tampered, "", {}, "u")
        with pytest.raises(InvalidInput, match="not a Vault transit ciphertext"):
            await provider.decrypt_fast(b"garbage", "", {})
        with pytest.raises(InvalidInput, match="unexpected annotations"):
            await provider.decrypt_fast(wrapped.ciphertext, "", {"a.example.com": b"1"})
        for _ in range(20):  # keep-alive connections are reused, not piled up
            assert await provider.decrypt_fast(wrapped.ciphertext, "", {}) == seed
        assert len(provider._fast._idle) == 1

    asyncio.run(scenario())
    ok = metrics.registry.get_sample_value("kleidi_vault_requests_total", {"operation": "decrypt", "status": "200"})
    assert ok is not None and ok >= 22
    provider.close()


@pytest.mark.unit
def test_pkcs11_has_no_fast_path(tmp_path: Path) -> None:
    assert not hasattr(Pkcs11Provider, "encrypt_fast")


def _parse(raw: bytes) -> tuple[int, bool, bytes]:
    async def run() -> tuple[int, bool, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await _read_response(reader)

    return asyncio.run(run())


@pytest.mark.unit
def test_http_reader() -> None:
    assert _parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello") == (200, True, b"hello")
    assert _parse(b"HTTP/1.1 400 Bad\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}") == (400, False, b"{}")
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n"
    assert _parse(chunked) == (200, True, b"hello world")
    assert _parse(b"HTTP/1.0 204 No Content\r\n\r\n") == (204, False, b"")
    for bad in (b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", b"HTTP/1.1 200"):
        with pytest.raises((ValueError, asyncio.IncompleteReadError)):
            _parse(bad)
