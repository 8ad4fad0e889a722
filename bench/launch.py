"""`kleidi` with one of its mechanisms taken out, so a benchmark can show what the mechanism buys in the same
run, for mechanisms that have no setting to turn them off.

    python -m bench.launch --without vault-fast-path serve --config FILE
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def _no_vault_fast_path() -> None:
    from kleidi.providers.vault import VaultProvider

    del VaultProvider.encrypt_fast  # kleidi.providers.base.fast_path() then finds none: every call takes a worker


def _no_pkcs11_direct() -> None:
    """The token calls of a request through PyKCS11's Session methods, as kleidi made them before
    providers/pkcs11_direct.py: what a plugin written on PyKCS11 alone pays."""
    from typing import Any

    import PyKCS11

    from kleidi.providers import pkcs11_direct, pkcs11_token

    class ViaPyKCS11:
        def __init__(self, module: str) -> None:
            # The module is loaded already: PyKCS11 shares it, and the session and object handles are the same.
            self._lib = PyKCS11.PyKCS11Lib().load(module)
            self._direct = pkcs11_direct.Direct(module)  # session copies stay: pkcs11.session_keys measures those
            self._sessions: dict[int, Any] = {}  # a provider on PyKCS11 would hold these objects, not build them
            self._keys: dict[int, Any] = {}

        def _session(self, handle: int) -> Any:
            session = self._sessions.get(handle)
            if session is None:
                raw = PyKCS11.LowLevel.CK_SESSION_HANDLE()
                raw.assign(handle)
                session = self._sessions[handle] = PyKCS11.Session(self._lib, raw)
            return session

        def _key(self, session: Any, handle: int) -> Any:
            key = self._keys.get(handle)
            if key is None:
                key = self._keys[handle] = PyKCS11.CK_OBJECT_HANDLE(session)
                key.assign(handle)
            return key

        def gcm_encrypt(self, session: int, key: int, iv: bytes, aad: bytes, tag_bits: int, data: bytes) -> bytes:
            sess = self._session(session)
            return bytes(sess.encrypt(self._key(sess, key), data, PyKCS11.AES_GCM_Mechanism(iv, aad, tag_bits)))

        def gcm_decrypt(self, session: int, key: int, iv: bytes, aad: bytes, tag_bits: int, data: bytes) -> bytes:
            sess = self._session(session)
            return bytes(sess.decrypt(self._key(sess, key), data, PyKCS11.AES_GCM_Mechanism(iv, aad, tag_bits)))

        def cbc(self, session: int, key: int, iv: bytes, data: bytes, *, encrypt: bool) -> bytes:
            sess = self._session(session)
            mechanism = PyKCS11.Mechanism(PyKCS11.CKM_AES_CBC, iv)
            call = sess.encrypt if encrypt else sess.decrypt
            return bytes(call(self._key(sess, key), data, mechanism))

        def hmac_sha256(self, session: int, key: int, data: bytes) -> bytes:
            sess = self._session(session)
            return bytes(sess.sign(self._key(sess, key), data, PyKCS11.Mechanism(PyKCS11.CKM_SHA256_HMAC)))

        def session_copy(self, session: int, key: int) -> int:
            return self._direct.session_copy(session, key)

    pkcs11_token.Direct = ViaPyKCS11  # type: ignore[assignment,attr-defined]


def _no_token_work() -> None:
    """The token's AES-GCM work done in process by ``cryptography``, as the floor (bench/floor.py) does it, in place
    of the token and of kleidi's ctypes call into it, with everything else on the path kept: sessions and their
    checkout, the KEK and its session copies, the blob format, the contract checks, metrics. Over the floor, this
    kleidi shows what the rest of its request path costs. aes-gcm only (bench/softhsm.py refuses the rest)."""
    import PyKCS11
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from kleidi.providers import pkcs11_direct

    # One key for every handle: the bench's token holds one KEK, and its session copies have handles of their own.
    aead = AESGCM(AESGCM.generate_key(bit_length=256))

    def gcm_encrypt(self: object, session: int, key: int, iv: bytes, aad: bytes, tag_bits: int, data: bytes) -> bytes:
        assert tag_bits == 128, "cryptography's AESGCM makes 128-bit tags"
        return aead.encrypt(iv, data, aad or None)

    def gcm_decrypt(self: object, session: int, key: int, iv: bytes, aad: bytes, tag_bits: int, data: bytes) -> bytes:
        try:
            return aead.decrypt(iv, data, aad or None)
        except InvalidTag:  # a tampered blob: what the standard has a token answer (SoftHSM says GENERAL_ERROR)
            raise PyKCS11.PyKCS11Error(PyKCS11.CKR_ENCRYPTED_DATA_INVALID) from None

    pkcs11_direct.Direct.gcm_encrypt = gcm_encrypt  # type: ignore[method-assign]
    pkcs11_direct.Direct.gcm_decrypt = gcm_decrypt  # type: ignore[method-assign]


def _no_request_path() -> None:
    """kleidi's server (its gRPC setup, socket, health loop and metrics endpoint) with Encrypt and Decrypt answered by
    the token call alone, inline on the event loop: a pooled session, the KEK's session copy, AES-GCM through the
    ctypes call, the blob in kleidi's format. Everything else on kleidi's request path is gone: the request and answer
    checks, the deadline, metrics, the error mapping, the provider's retry and the Call/KeyCalls layers. Over the
    floor, this kleidi shows the token call on kleidi's server model, and over kleidi, what kleidi's own code costs.
    Blobs are opened with the current KEK only, whatever their header names (a foreign one fails authentication).
    aes-gcm only: this launcher does not check, bench/softhsm.py refuses the rest."""
    import os
    from typing import Any

    from kleidi import rpc
    from kleidi.api import v1beta1_pb2, v2_pb2
    from kleidi.providers.pkcs11 import Pkcs11Provider
    from kleidi.providers.pkcs11_blob import GCM_IV_BYTES, GCM_TAG_BYTES

    tag_bits = GCM_TAG_BYTES * 8

    def encrypt(provider: Pkcs11Provider, plaintext: bytes) -> tuple[bytes, str]:
        kek = provider._current  # published by the first health check, before the plugin reports healthy
        assert kek is not None
        iv = os.urandom(GCM_IV_BYTES)
        with provider._token.session(None) as sess:
            body = sess.direct.gcm_encrypt(sess.handle, kek.aes_handle, iv, kek.header, tag_bits, plaintext)
        return kek.header + iv + body, kek.key_id

    def decrypt(provider: Pkcs11Provider, blob: bytes) -> bytes:
        kek = provider._current
        assert kek is not None
        iv_at, body_at = len(kek.header), len(kek.header) + GCM_IV_BYTES
        with provider._token.session(None) as sess:
            return sess.direct.gcm_decrypt(
                sess.handle, kek.aes_handle, blob[iv_at:body_at], kek.header, tag_bits, blob[body_at:]
            )

    async def v2_encrypt(self: Any, request: Any, context: Any) -> Any:
        ciphertext, key_id = encrypt(self._calls._provider, request.plaintext)
        return v2_pb2.EncryptResponse(ciphertext=ciphertext, key_id=key_id)

    async def v2_decrypt(self: Any, request: Any, context: Any) -> Any:
        return v2_pb2.DecryptResponse(plaintext=decrypt(self._calls._provider, request.ciphertext))

    async def v1_encrypt(self: Any, request: Any, context: Any) -> Any:
        return v1beta1_pb2.EncryptResponse(cipher=encrypt(self._provider, request.plain)[0])

    async def v1_decrypt(self: Any, request: Any, context: Any) -> Any:
        return v1beta1_pb2.DecryptResponse(plain=decrypt(self._provider, request.cipher))

    rpc.KmsV2Servicer.Encrypt = v2_encrypt  # type: ignore[method-assign]
    rpc.KmsV2Servicer.Decrypt = v2_decrypt  # type: ignore[method-assign]
    rpc.KmsV1Servicer.Encrypt = v1_encrypt  # type: ignore[method-assign]
    rpc.KmsV1Servicer.Decrypt = v1_decrypt  # type: ignore[method-assign]


WITHOUT: dict[str, Callable[[], None]] = {
    "vault-fast-path": _no_vault_fast_path,
    "pkcs11-direct": _no_pkcs11_direct,
    "token-work": _no_token_work,
    "request-path": _no_request_path,
}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--without" or argv[1] not in WITHOUT:
        raise SystemExit(f"usage: python -m bench.launch --without {{{','.join(WITHOUT)}}} KLEIDI-ARGS...")
    from kleidi import tuning

    tuning.grpc_environment()  # as `kleidi serve` does, before the hook's imports bring gRPC in
    WITHOUT[argv[1]]()
    from kleidi.cli import main as kleidi

    return kleidi(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
