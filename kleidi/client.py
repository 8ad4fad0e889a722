"""A KMS client over the plugin's unix socket, as the apiserver speaks it. Used by `kleidi check`,
the tests and the benchmarks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from kleidi.api import v1beta1_pb2, v1beta1_pb2_grpc, v2_pb2, v2_pb2_grpc
from kleidi.config import socket_path


class KmsClient:
    """One channel to a plugin socket, with the v2 and v1beta1 stubs on it."""

    def __init__(self, socket: str, timeout: float = 3.0) -> None:
        self.path = socket_path(socket)
        self.timeout = timeout
        # The apiserver sends :authority "localhost"; do the same.
        self._channel = grpc.insecure_channel(f"unix://{self.path}", options=[("grpc.default_authority", "localhost")])
        self._v2 = v2_pb2_grpc.KeyManagementServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._v1 = v1beta1_pb2_grpc.KeyManagementServiceStub(self._channel)  # type: ignore[no-untyped-call]

    def __enter__(self) -> KmsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout: float) -> None:
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def status(self) -> Any:
        return self._v2.Status(v2_pb2.StatusRequest(), timeout=self.timeout)

    def encrypt(self, plaintext: bytes, uid: str = "") -> Any:
        return self._v2.Encrypt(v2_pb2.EncryptRequest(plaintext=plaintext, uid=uid), timeout=self.timeout)

    def decrypt(
        self, ciphertext: bytes, key_id: str = "", annotations: Mapping[str, bytes] | None = None, uid: str = ""
    ) -> bytes:
        request = v2_pb2.DecryptRequest(ciphertext=ciphertext, key_id=key_id, annotations=annotations or {}, uid=uid)
        return bytes(self._v2.Decrypt(request, timeout=self.timeout).plaintext)

    def v1_version(self) -> Any:
        return self._v1.Version(v1beta1_pb2.VersionRequest(version="v1beta1"), timeout=self.timeout)

    def v1_encrypt(self, plaintext: bytes) -> bytes:
        request = v1beta1_pb2.EncryptRequest(version="v1beta1", plain=plaintext)
        return bytes(self._v1.Encrypt(request, timeout=self.timeout).cipher)

    def v1_decrypt(self, ciphertext: bytes) -> bytes:
        request = v1beta1_pb2.DecryptRequest(version="v1beta1", cipher=ciphertext)
        return bytes(self._v1.Decrypt(request, timeout=self.timeout).plain)
