"""The TPM path: kleidi (aes-cbc-hmac through tpm2-pkcs11) against raw PyKCS11 on the same software TPM.

Starts a private software TPM (swtpm + tpm2-abrmd + a tpm2-pkcs11 token, see tests/backends/tpm.py) and one
`kleidi serve` process on it, then measures Encrypt and Decrypt of a 32-byte DEK seed:

- kleidi: the KMS v2 gRPC calls over kleidi's unix socket, as the apiserver makes them;
- raw:    the same work done directly with PyKCS11 in this process, one session per client thread:
          Encrypt = CKM_AES_CBC over the PKCS#7-padded seed + CKM_SHA256_HMAC over header|IV|ciphertext,
          Decrypt = CKM_SHA256_HMAC, constant-time compare, CKM_AES_CBC, unpad.

Both pay two TPM operations per call; the TPM serialises them, so more clients add queueing, not
throughput. Request counts are small because a software TPM does only a few hundred operations a second.

    python -m bench.tpm [--requests 80] [--clients 1,8] [--pool-size 4]
"""

from __future__ import annotations

import argparse
import hmac
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PyKCS11

from kleidi.client import KmsClient
from tests.backends.tpm import SoftwareTPM
from tests.plugin import KleidiProcess

SEED_BYTES = 32
BLOCK = 16
HMAC = PyKCS11.Mechanism(PyKCS11.CKM_SHA256_HMAC, None)
# Stands in for kleidi's blob header (magic, version, mechanism, two labels, fingerprint): same size class.
RAW_HEADER = b"kl\x01\x02" + b"\x0ckleidi-kek-1" + b"\x0ckleidi-mac-1" + bytes(8)


@dataclass
class Result:
    op: str
    clients: int
    path: str
    ops: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def run_clients(clients: int, per_client: int, call: Callable[[int, int], None]) -> tuple[float, list[float]]:
    """Run `call(client, i)` per_client times in each of `clients` threads; wall time and every latency."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def worker(client: int) -> None:
        start.wait()
        own = latencies[client]
        for i in range(per_client):
            began = time.perf_counter()
            call(client, i)
            own.append(time.perf_counter() - began)

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(worker, c) for c in range(clients)]
        start.wait()
        began = time.perf_counter()
        for future in futures:
            future.result()
        wall = time.perf_counter() - began
    return wall, [x for own in latencies for x in own]


# --- raw PyKCS11 -----------------------------------------------------------------------------------------


class RawToken:
    """PyKCS11 on the software TPM's token, one logged-in session per client."""

    def __init__(self, tpm: SoftwareTPM, sessions: int) -> None:
        self.lib = PyKCS11.PyKCS11Lib()
        with tpm.environ():
            self.lib.load(tpm.module)
        slot = next(
            s
            for s in self.lib.getSlotList(tokenPresent=True)
            if self.lib.getTokenInfo(s).label.strip() == tpm.token_label
        )
        self.sessions = [self.lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION) for _ in range(sessions)]
        self.sessions[0].login(tpm.pin)
        self.aes = self._find(tpm.aes_key_label)
        self.mac = self._find(tpm.hmac_key_label)

    def _find(self, label: str) -> Any:
        found = self.sessions[0].findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY), (PyKCS11.CKA_LABEL, label)])
        if len(found) != 1:
            raise RuntimeError(f"{len(found)} keys labelled {label}")
        return found[0]

    def encrypt(self, session: Any, seed: bytes) -> bytes:
        iv = os.urandom(BLOCK)
        pad = BLOCK - len(seed) % BLOCK
        body = bytes(session.encrypt(self.aes, seed + bytes([pad]) * pad, PyKCS11.Mechanism(PyKCS11.CKM_AES_CBC, iv)))
        signed = RAW_HEADER + iv + body
        return signed + bytes(session.sign(self.mac, signed, HMAC))

    def decrypt(self, session: Any, blob: bytes) -> bytes:
        signed, mac = blob[:-32], blob[-32:]
        if not hmac.compare_digest(bytes(session.sign(self.mac, signed, HMAC)), mac):
            raise ValueError("MAC mismatch")
        iv, body = signed[len(RAW_HEADER) : len(RAW_HEADER) + BLOCK], signed[len(RAW_HEADER) + BLOCK :]
        padded = bytes(session.decrypt(self.aes, body, PyKCS11.Mechanism(PyKCS11.CKM_AES_CBC, iv)))
        return padded[: -padded[-1]]

    def close(self) -> None:
        self.sessions[0].logout()
        for session in self.sessions:
            session.closeSession()
        self.lib.unload()


def bench_raw(token: RawToken, clients: int, per_client: int) -> list[Result]:
    seeds = [[os.urandom(SEED_BYTES) for _ in range(per_client)] for _ in range(clients)]
    blobs: list[list[bytes]] = [[b""] * per_client for _ in range(clients)]

    def enc(c: int, i: int) -> None:
        blobs[c][i] = token.encrypt(token.sessions[c], seeds[c][i])

    def dec(c: int, i: int) -> None:
        if token.decrypt(token.sessions[c], blobs[c][i]) != seeds[c][i]:
            raise AssertionError("raw round trip returned a different seed")

    results = []
    for op, call in (("Encrypt", enc), ("Decrypt", dec)):
        wall, latencies = run_clients(clients, per_client, call)
        results.append(Result(op, clients, "raw PyKCS11", clients * per_client, wall, latencies))
    return results


# --- kleidi ----------------------------------------------------------------------------------------------


def bench_kleidi(socket: str, clients: int, per_client: int) -> list[Result]:
    kms = [KmsClient(socket, timeout=30) for _ in range(clients)]
    seeds = [[os.urandom(SEED_BYTES) for _ in range(per_client)] for _ in range(clients)]
    answers: list[list[Any]] = [[None] * per_client for _ in range(clients)]

    def enc(c: int, i: int) -> None:
        answers[c][i] = kms[c].encrypt(seeds[c][i], uid=f"bench-{c}-{i}")

    def dec(c: int, i: int) -> None:
        answer = answers[c][i]
        if kms[c].decrypt(answer.ciphertext, answer.key_id, {}, f"bench-{c}-{i}") != seeds[c][i]:
            raise AssertionError("kleidi round trip returned a different seed")

    try:
        for client in kms:
            client.wait_ready(10)
            client.status()
        results = []
        for op, call in (("Encrypt", enc), ("Decrypt", dec)):
            wall, latencies = run_clients(clients, per_client, call)
            results.append(Result(op, clients, "kleidi socket", clients * per_client, wall, latencies))
        return results
    finally:
        for client in kms:
            client.close()


# --- report ----------------------------------------------------------------------------------------------


def table(results: Sequence[Result]) -> str:
    raw = {(r.op, r.clients): r.rate for r in results if r.path == "raw PyKCS11"}
    lines = [
        f"{'op':<8} {'clients':>7} {'path':<14} {'calls':>6} {'ops/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs raw':>7}",
    ]
    for r in results:
        base = raw.get((r.op, r.clients))
        ratio = f"{r.rate / base:.2f}" if base and r.path != "raw PyKCS11" else ""
        lines.append(
            f"{r.op:<8} {r.clients:>7} {r.path:<14} {r.ops:>6} {r.rate:>8.1f} "
            f"{r.percentile(0.50):>8.2f} {r.percentile(0.99):>8.2f} {ratio:>7}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tpm", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests", type=int, default=80, help="calls per operation and client count, split over the clients (80)"
    )
    parser.add_argument("--clients", default="1,8", help="comma-separated client counts (default 1,8)")
    parser.add_argument("--pool-size", type=int, default=4, help="kleidi pkcs11.pool_size (default 4)")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    if not counts or min(counts) < 1 or args.requests < 1:
        parser.error("--clients and --requests must be positive")

    print("TPM2 (software TPM: swtpm + tpm2-abrmd + tpm2-pkcs11), 32-byte seeds, aes-cbc-hmac", flush=True)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="kleidi-bench-tpm-") as work, SoftwareTPM() as tpm:
        config = {
            "provider": "pkcs11",
            "health_interval": "60s",
            "pkcs11": tpm.pkcs11_config(pool_size=args.pool_size, session_timeout="30s"),
        }
        with KleidiProcess(Path(work) / "kleidi", config, env={**os.environ, **tpm.env}) as kleidi:
            kleidi.start()
            token = RawToken(tpm, max(counts))
            try:
                # warm both paths (first calls load keys, fill caches, open channels)
                for _ in range(3):
                    token.decrypt(token.sessions[0], token.encrypt(token.sessions[0], os.urandom(SEED_BYTES)))
                bench_kleidi(kleidi.socket, 1, 3)
                for clients in counts:
                    per_client = -(-args.requests // clients)
                    results += bench_raw(token, clients, per_client)
                    results += bench_kleidi(kleidi.socket, clients, per_client)
            finally:
                token.close()
    results.sort(key=lambda r: (r.op != "Encrypt", r.clients, r.path != "raw PyKCS11"))
    print(table(results))
    rates = [r.rate for r in results if r.path == "kleidi socket"]
    if rates:
        print(f"kleidi median {statistics.median(rates):.0f} calls/s; each call is two TPM operations.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
