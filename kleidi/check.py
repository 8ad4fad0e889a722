"""`kleidi check`: exercise a running plugin the way the kube-apiserver does and report every violation
of docs/kms-contract.md. Works against any KMS v2 plugin, not only kleidi."""

from __future__ import annotations

import os
import stat
import sys
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TextIO

import grpc

from kleidi import contract
from kleidi.client import KmsClient
from kleidi.config import socket_path

_BAD_STATUSES = (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


@dataclass
class Report:
    out: TextIO
    failures: list[str] = field(default_factory=list)

    def step(self, name: str, problems: list[str], detail: str = "") -> bool:
        if problems:
            self.failures.extend(f"{name}: {p}" for p in problems)
            self.out.write(f"FAIL  {name}: {'; '.join(problems)}\n")
        else:
            self.out.write(f"ok    {name}{'  ' + detail if detail else ''}\n")
        return not problems


def _rpc_error(call: Callable[[], object]) -> grpc.RpcError | None:
    try:
        call()
    except grpc.RpcError as exc:
        return exc
    return None


def _rejected(name: str, call: Callable[[], object]) -> list[str]:
    """A bad request must get a clear error, not OK and not a crash (UNKNOWN/INTERNAL)."""
    error = _rpc_error(call)
    if error is None:
        return [f"{name} was accepted"]
    code = error.code()
    if code in _BAD_STATUSES:
        return [f"{name} gave {code.name} ({error.details()}); expected a clear error such as INVALID_ARGUMENT"]
    return []


def _socket_problems(path: str) -> list[str]:
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        return [f"{path} is not a socket"]
    if st.st_mode & 0o007:
        return [f"socket mode {stat.S_IMODE(st.st_mode):04o} lets every local user call the plugin"]
    return []


def run_check(socket: str, timeout: float, include_v1: bool = False, out: TextIO = sys.stdout) -> int:
    """Print a short report; return 0 if the plugin honours the contract, 1 otherwise."""
    report = Report(out)
    try:
        path = socket_path(socket)
    except ValueError as exc:
        report.step("socket", [str(exc)])
        return 1
    out.write(f"checking KMS plugin at unix://{path}\n")
    if not os.path.exists(path):
        report.step("socket", [f"{path} does not exist"])
        return 1
    report.step("socket permissions", _socket_problems(path), f"{stat.S_IMODE(os.lstat(path).st_mode):04o}")
    with KmsClient(path, timeout) as client:
        try:
            client.wait_ready(timeout)
        except grpc.FutureTimeoutError:
            report.step("connect", [f"no gRPC server answered within {timeout}s"])
            return 1
        try:
            _check_v2(client, report)
            if include_v1:
                _check_v1(client, report)
        except grpc.RpcError as exc:
            report.step("call", [f"{exc.code().name}: {exc.details()}"])
    out.write(f"{'PASS' if not report.failures else 'FAIL'}: {len(report.failures)} violation(s)\n")
    return 1 if report.failures else 0


def _check_v2(client: KmsClient, report: Report) -> None:
    status = client.status()
    if not report.step(
        "Status",
        contract.status_problems(status.version, status.healthz, status.key_id),
        f"version={status.version} healthz={status.healthz} key_id={status.key_id}",
    ):
        return
    seed = os.urandom(contract.DEK_SEED_BYTES)
    uid = str(uuid.uuid4())
    answer = client.encrypt(seed, uid)
    annotations = dict(answer.annotations)
    problems = (
        contract.ciphertext_problems(answer.ciphertext)
        + contract.key_id_problems(answer.key_id)
        + contract.annotation_problems(annotations)
    )
    if answer.key_id != status.key_id:
        problems.append(f"Encrypt key_id {answer.key_id!r} differs from Status key_id {status.key_id!r}")
    report.step("Encrypt", problems, f"{len(answer.ciphertext)}-byte ciphertext")
    if seed in answer.ciphertext:
        report.step("Encrypt hides the plaintext", ["the plaintext appears in the ciphertext"])
    plaintext = client.decrypt(answer.ciphertext, answer.key_id, annotations, uid)
    report.step("Decrypt round trip", [] if plaintext == seed else ["Decrypt returned a different plaintext"])

    flipped = bytearray(answer.ciphertext)
    flipped[len(flipped) // 2] ^= 0x01
    tampering = {
        "bit-flipped ciphertext": bytes(flipped),
        "truncated ciphertext": answer.ciphertext[: len(answer.ciphertext) // 2],
        "garbage ciphertext": os.urandom(len(answer.ciphertext)),
    }
    for name, bad in tampering.items():

        def decrypt_bad(bad: bytes = bad) -> bytes:
            return client.decrypt(bad, answer.key_id, annotations)

        report.step(f"rejects {name}", _rejected(name, decrypt_bad))
    report.step("rejects empty plaintext", _rejected("empty plaintext", lambda: client.encrypt(b"", uid)))

    with ThreadPoolExecutor(8) as pool:
        seeds = [os.urandom(32) for _ in range(16)]
        results = list(pool.map(lambda seed: _round_trip(client, seed), seeds))
    wrong = sum(1 for got, want in zip(results, seeds, strict=True) if got != want)
    report.step("16 concurrent round trips", [f"{wrong} concurrent round trips gave a wrong answer"] if wrong else [])
    again = client.status()
    problems = [] if again.version == status.version else [f"version changed from {status.version} to {again.version}"]
    report.step("Status version is stable", problems)


def _round_trip(client: KmsClient, seed: bytes) -> bytes:
    answer = client.encrypt(seed)
    return client.decrypt(answer.ciphertext, answer.key_id, dict(answer.annotations))


def _check_v1(client: KmsClient, report: Report) -> None:
    version = client.v1_version()
    problems = [] if version.version == contract.KMS_V1 else [f"Version says {version.version!r}, not v1beta1"]
    if not report.step("v1beta1 Version", problems, f"{version.runtime_name} {version.runtime_version}"):
        return
    dek = os.urandom(32)
    cipher = client.v1_encrypt(dek)
    problems = [] if client.v1_decrypt(cipher) == dek else ["v1beta1 Decrypt returned a different plaintext"]
    report.step("v1beta1 round trip", problems)
