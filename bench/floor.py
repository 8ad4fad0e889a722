"""The floor: the least any Python KMS plugin pays for the RPC layer, to measure kleidi against.

A plain synchronous ``grpc.server`` with 4 worker threads serving KMS v2 and v1beta1 on a unix socket, with
AES-256-GCM done in process by ``cryptography`` (no backend, no checks, no metrics, no logging). The
benchmarks start it themselves, beside kleidi, and call both with the same client in the same run.

The token floor is the same server with the AES-256-GCM calls made on a PKCS#11 token, as cheaply as kleidi knows
how: one session per worker thread, a session copy of the KEK, and the calls made through the module's function
list with ctypes (kleidi's own ``pkcs11_direct.Direct``), with nothing else around them: the least a plugin on
this synchronous server pays to make the token call kleidi makes. The SoftHSM bench measures kleidi against both.

    python -m bench.floor SOCKET                                        (serves until SIGTERM or SIGINT)
    python -m bench.floor SOCKET --pkcs11 MODULE TOKEN KEY PIN_FILE     (SOFTHSM2_CONF in the environment)
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


class _TokenAead:
    """AES-256-GCM on a PKCS#11 token with the least around each call (see the module docstring); the same interface
    as cryptography's AESGCM, for the calls the floor makes."""

    def __init__(self, module: str, token: str, key: str, pin_file: str) -> None:
        import PyKCS11

        from kleidi.providers.pkcs11_direct import Direct

        self._pkcs11 = PyKCS11
        self._lib = PyKCS11.PyKCS11Lib().load(module)
        self._slot = next(
            s for s in self._lib.getSlotList(tokenPresent=True) if self._lib.getTokenInfo(s).label.strip() == token
        )
        first = self._lib.openSession(self._slot, PyKCS11.CKF_SERIAL_SESSION)
        first.login(Path(pin_file).read_text().strip())  # a login holds for every session of the application
        found = first.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY), (PyKCS11.CKA_LABEL, key)])[0]
        self._direct = Direct(module)
        # The copy lives as long as the session that made it, which the floor keeps open.
        self._key = self._direct.session_copy(first.session.value(), found.value())
        self._sessions = threading.local()
        self._keep = [first]

    def _session(self) -> int:
        handle: int | None = getattr(self._sessions, "handle", None)
        if handle is None:
            session = self._lib.openSession(self._slot, self._pkcs11.CKF_SERIAL_SESSION)
            self._keep.append(session)
            handle = self._sessions.handle = session.session.value()
        return handle

    def encrypt(self, iv: bytes, data: bytes, aad: None) -> bytes:
        return self._direct.gcm_encrypt(self._session(), self._key, iv, b"", 128, data)

    def decrypt(self, iv: bytes, data: bytes, aad: None) -> bytes:
        return self._direct.gcm_decrypt(self._session(), self._key, iv, b"", 128, data)


class _V2(v2_pb2_grpc.KeyManagementServiceServicer):
    def __init__(self, aead: Any) -> None:
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
    def __init__(self, aead: Any) -> None:
        self._aead = aead

    def Version(self, request: Any, context: Any) -> Any:
        return v1beta1_pb2.VersionResponse(version="v1beta1", runtime_name="floor", runtime_version="0")

    def Encrypt(self, request: Any, context: Any) -> Any:
        iv = os.urandom(12)
        return v1beta1_pb2.EncryptResponse(cipher=iv + self._aead.encrypt(iv, request.plain, None))

    def Decrypt(self, request: Any, context: Any) -> Any:
        blob = request.cipher
        return v1beta1_pb2.DecryptResponse(plain=self._aead.decrypt(blob[:12], blob[12:], None))


def serve(socket: str, pkcs11: list[str]) -> None:
    aead = _TokenAead(*pkcs11) if pkcs11 else AESGCM(AESGCM.generate_key(bit_length=256))
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

    def __init__(
        self, workdir: Path, pkcs11: tuple[str, str, str, str] | None = None, env: dict[str, str] | None = None
    ) -> None:
        """``pkcs11``: module, token label, key label and PIN file, for the token floor."""
        self.socket = str(workdir / ("token-floor.sock" if pkcs11 else "floor.sock"))
        self._args = ["--pkcs11", *pkcs11] if pkcs11 else []
        self._env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Floor:
        env = {**os.environ, **self._env} if self._env else None
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.floor", self.socket, *self._args], env=env)
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
    if len(sys.argv) not in (2, 7) or (len(sys.argv) == 7 and sys.argv[2] != "--pkcs11"):
        raise SystemExit("usage: python -m bench.floor SOCKET [--pkcs11 MODULE TOKEN KEY PIN_FILE]")
    serve(sys.argv[1], sys.argv[3:])
