"""What every benchmark shares: timing of concurrent callers and the table it prints."""

from __future__ import annotations

import multiprocessing
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kleidi.api import v2_pb2
from kleidi.client import KmsClient


@dataclass(frozen=True)
class Result:
    ops_per_s: float
    p50_ms: float
    p99_ms: float


# Calls one gRPC method over a unix socket: (socket, method, serialized request, clients, calls per client).
Caller = Callable[[str, str, bytes, int, int], Result]


def measure(make_call: Callable[[int], Callable[[], object]], clients: int, calls_per_client: int) -> Result:
    """Run ``calls_per_client`` calls on each of ``clients`` threads; ``make_call(i)`` gives thread i its call
    (so each thread can hold its own channel or session)."""
    calls = [make_call(i) for i in range(clients)]
    for call in calls:  # warm up connections and caches outside the measurement
        for _ in range(20):
            call()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def run(i: int) -> None:
        call, out = calls[i], latencies[i]
        start.wait()
        for _ in range(calls_per_client):
            t0 = time.perf_counter()
            call()
            out.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    flat = sorted(x for per in latencies for x in per)
    return Result(
        ops_per_s=len(flat) / elapsed,
        p50_ms=statistics.median(flat) * 1000,
        p99_ms=flat[min(len(flat) - 1, int(len(flat) * 0.99))] * 1000,
    )


def _socket_worker(
    socket: str, method: str, request: bytes, calls: int, barrier: Any, results: Any
) -> None:  # pragma: no cover - runs in a child process
    import grpc

    with grpc.insecure_channel(f"unix://{socket}", options=[("grpc.default_authority", "localhost")]) as channel:
        call = channel.unary_unary(method)  # raw bytes in and out: the client does as little as the Go one
        for _ in range(20):
            call(request, timeout=5)
        out = []
        barrier.wait()
        began = time.perf_counter()
        for _ in range(calls):
            t0 = time.perf_counter()
            call(request, timeout=5)
            out.append(time.perf_counter() - t0)
        results.put((began, time.perf_counter(), out))


def measure_socket(socket: str, method: str, request: bytes, clients: int, calls_per_client: int) -> Result:
    """Call a gRPC method on a unix socket from ``clients`` separate processes (one channel each), so the
    callers do not share a GIL with each other; ``request`` is the serialized request message."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(clients)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_socket_worker, args=(socket, method, request, calls_per_client, barrier, results))
        for _ in range(clients)
    ]
    for w in workers:
        w.start()
    runs = [results.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
    elapsed = max(end for _, end, _ in runs) - min(began for began, _, _ in runs)
    flat = sorted(x for _, _, per in runs for x in per)
    return Result(
        ops_per_s=len(flat) / elapsed,
        p50_ms=statistics.median(flat) * 1000,
        p99_ms=flat[min(len(flat) - 1, int(len(flat) * 0.99))] * 1000,
    )


HEADER = f"{'operation':<26}{'clients':>8}{'ops/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'raw ops/s':>11}{'raw p50':>9}" + (
    f"{'p50 over raw':>14}{'ops ratio':>11}"
)


def row(name: str, clients: int, plugin: Result, raw: Result | None) -> str:
    line = f"{name:<26}{clients:>8}{plugin.ops_per_s:>10.0f}{plugin.p50_ms:>9.3f}{plugin.p99_ms:>9.3f}"
    if raw is None:
        return line
    return line + (
        f"{raw.ops_per_s:>11.0f}{raw.p50_ms:>9.3f}{plugin.p50_ms - raw.p50_ms:>+12.3f}ms"
        f"{plugin.ops_per_s / raw.ops_per_s:>10.2f}x"
    )


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def kms_requests(client: KmsClient) -> dict[str, bytes]:
    """Serialized Encrypt and Decrypt requests for a 32-byte data key, the Decrypt one for a real blob."""
    seed = os.urandom(32)
    blob = client.encrypt(seed)
    return {
        "Encrypt": v2_pb2.EncryptRequest(plaintext=seed, uid="bench").SerializeToString(),
        "Decrypt": v2_pb2.DecryptRequest(
            ciphertext=blob.ciphertext, key_id=blob.key_id, uid="bench"
        ).SerializeToString(),
    }
