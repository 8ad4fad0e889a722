"""What every benchmark shares: timing of concurrent callers and the table it prints."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kleidi.api import v1beta1_pb2, v2_pb2
from kleidi.client import KmsClient


@dataclass(frozen=True)
class Result:
    ops_per_s: float
    p50_ms: float
    p99_ms: float


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


def median(results: list[Result]) -> Result:
    """Column by column, the median of several rounds' results."""
    return Result(
        ops_per_s=statistics.median(r.ops_per_s for r in results),
        p50_ms=statistics.median(r.p50_ms for r in results),
        p99_ms=statistics.median(r.p99_ms for r in results),
    )


def rotated(names: list[str], number: int) -> list[str]:
    """The order round ``number`` measures ``names`` in: each goes first in turn, so none always runs warmest."""
    shift = number % len(names)
    return names[shift:] + names[:shift]


# The gRPC method of each operation the benchmarks measure, as the Go client names it (keys as kms_requests').
METHODS = {
    "v2 Status": "/v2.KeyManagementService/Status",
    "v2 Encrypt": "/v2.KeyManagementService/Encrypt",
    "v2 Decrypt": "/v2.KeyManagementService/Decrypt",
    "v1 Encrypt": "/v1beta1.KeyManagementService/Encrypt",
    "v1 Decrypt": "/v1beta1.KeyManagementService/Decrypt",
}

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
    """Serialized KMS v2 and v1beta1 Encrypt and Decrypt requests for a 32-byte data key, each Decrypt for a
    blob the plugin made; keyed "v2 Encrypt", "v1 Decrypt" and so on."""
    seed = os.urandom(32)
    blob = client.encrypt(seed)
    return {
        "v2 Encrypt": v2_pb2.EncryptRequest(plaintext=seed, uid="bench").SerializeToString(),
        "v2 Decrypt": v2_pb2.DecryptRequest(
            ciphertext=blob.ciphertext, key_id=blob.key_id, uid="bench"
        ).SerializeToString(),
        "v1 Encrypt": v1beta1_pb2.EncryptRequest(version="v1beta1", plain=seed).SerializeToString(),
        "v1 Decrypt": v1beta1_pb2.DecryptRequest(version="v1beta1", cipher=client.v1_encrypt(seed)).SerializeToString(),
    }
