"""The floor: the least any Python KMS plugin pays for the RPC layer, to measure kleidi against.

A plain synchronous ``grpc.server`` with 4 worker threads serving KMS v2 and v1beta1 on a unix socket, with
AES-256-GCM done in process by ``cryptography`` (no backend, no checks, no metrics, no logging). The
benchmarks start it themselves, beside kleidi, and call both with the same client in the same run.

    python -m bench.floor SOCKET      (serves until SIGTERM or SIGINT)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kleidi.api import v1beta1_pb2, v1beta1_pb2_grpc, v2_pb2, v2_pb2_grpc

WORKERS = 4
_KEY_ID = "floor-1"


class _V2(v2_pb2_grpc.KeyManagementServiceServicer):
    def __init__(self, aead: AESGCM) -> None:
        self._aead = aead

    def Status(self, request: Any, context: Any) -> Any:
        return v2_pb2.StatusResponse(version="v2", healthz="ok", key_id=_KEY_ID)

    def Encrypt(self, request: Any, context: Any) -> Any:
        iv = os.urandom(12)
        return v2_pb2.EncryptResponse(ciphertext=iv + self._aead.encrypt(iv, request.plaintext, None), key_id=_KEY_ID)

    def Decrypt(self, request: Any, context: Any) -> Any:
        blob = request.ciphertext
        return v2_pb2.DecryptResponse(plaintext=self._aead.decrypt(blob[:12], blob[12:], None))


class _V1(v1beta1_pb2_grpc.KeyManagementServiceServicer):
    def __init__(self, aead: AESGCM) -> None:
        self._aead = aead

    def Version(self, request: Any, context: Any) -> Any:
        return v1beta1_pb2.VersionResponse(version="v1beta1", runtime_name="floor", runtime_version="0")

    def Encrypt(self, request: Any, context: Any) -> Any:
        iv = os.urandom(12)
        return v1beta1_pb2.EncryptResponse(cipher=iv + self._aead.encrypt(iv, request.plain, None))

    def Decrypt(self, request: Any, context: Any) -> Any:
        blob = request.cipher
        return v1beta1_pb2.DecryptResponse(plain=self._aead.decrypt(blob[:12], blob[12:], None))


def serve(socket: str) -> None:
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS))
    v2_pb2_grpc.add_KeyManagementServiceServicer_to_server(_V2(aead), server)  # type: ignore[no-untyped-call]
    v1beta1_pb2_grpc.add_KeyManagementServiceServicer_to_server(_V1(aead), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(1).wait()


class Floor:
    """The floor server as a child process: ``with Floor(dir) as floor:`` then call ``floor.socket``."""

    def __init__(self, workdir: Path) -> None:
        self.socket = str(workdir / "floor.sock")
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Floor:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.floor", self.socket])
        until = time.monotonic() + 20
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > until:
                self.__exit__()
                raise RuntimeError("the floor server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


if __name__ == "__main__":
    serve(sys.argv[1])
