"""kleidi on a SoftHSM2 token against the floor (bench/floor.py), both called by the Go client in one run, with
raw PyKCS11 calls on the same token for reference.

    python -m bench softhsm        (with the other backends: python -m bench)
    python -m bench.softhsm [--set pkcs11.session_keys=never ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import PyKCS11
import yaml

from bench import goclient
from bench.common import Result, kms_requests, measure, rss_mib
from bench.floor import Floor
from kleidi.client import KmsClient
from tests.backends.softhsm import SoftHsm
from tests.plugin import KleidiProcess, wait_for

CALLS = 1000
ROUNDS = 5
CLIENTS = (1, 8)
OPERATIONS = ("v2 Encrypt", "v2 Decrypt", "v1 Encrypt", "v1 Decrypt")
METHODS = {
    "v2 Status": "/v2.KeyManagementService/Status",
    "v2 Encrypt": "/v2.KeyManagementService/Encrypt",
    "v2 Decrypt": "/v2.KeyManagementService/Decrypt",
    "v1 Encrypt": "/v1beta1.KeyManagementService/Encrypt",
    "v1 Decrypt": "/v1beta1.KeyManagementService/Decrypt",
}


def _raw_calls(hsm: SoftHsm, clients: int) -> dict[str, Result]:
    """AES-GCM on the token with PyKCS11 in this process, one session per thread: what the token costs."""
    os.environ["SOFTHSM2_CONF"] = str(hsm.conf)
    lib = PyKCS11.PyKCS11Lib().load(hsm.module)
    slot = next(s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).label.strip() == hsm.label)
    sessions = [lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION) for _ in range(clients)]
    sessions[0].login(hsm.pin)
    key = sessions[0].findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY), (PyKCS11.CKA_LABEL, "kek-1")])[0]
    seed, aad, iv = os.urandom(32), b"k" * 20, os.urandom(12)
    blob = bytes(sessions[0].encrypt(key, seed, PyKCS11.AES_GCM_Mechanism(iv, aad, 128)))

    def enc(i: int):  # type: ignore[no-untyped-def]
        return lambda: sessions[i].encrypt(key, seed, PyKCS11.AES_GCM_Mechanism(os.urandom(12), aad, 128))

    def dec(i: int):  # type: ignore[no-untyped-def]
        return lambda: sessions[i].decrypt(key, blob, PyKCS11.AES_GCM_Mechanism(iv, aad, 128))

    try:
        return {"Encrypt": measure(enc, clients, CALLS), "Decrypt": measure(dec, clients, CALLS)}
    finally:
        sessions[0].logout()
        for session in sessions:
            session.closeSession()
        lib.unload()


def _setting(text: str) -> tuple[list[str], Any]:
    path, sep, value = text.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"expected key=value (such as pkcs11.session_keys=never), got {text!r}")
    return path.split("."), yaml.safe_load(value)


def _apply(config: dict[str, Any], settings: Sequence[tuple[list[str], Any]]) -> None:
    for path, value in settings:
        node = config
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m bench` calls this with no arguments: the defaults."""
    parser = argparse.ArgumentParser(prog="python -m bench.softhsm", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--set", type=_setting, action="append", default=[], metavar="KEY=VALUE", help="a kleidi config setting"
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds, the median reported ({ROUNDS})")
    parser.add_argument(
        "--only", choices=("v2", "v1", "Encrypt", "Decrypt"), help="only the operations of this API or this method"
    )
    args = parser.parse_args([] if argv is None else argv)
    binary = goclient.require()
    with tempfile.TemporaryDirectory(prefix="kleidi-bench-") as tmp:
        root = Path(tmp)
        hsm = SoftHsm(root / "hsm")
        hsm.keygen("kek-1")
        config: dict[str, Any] = {"provider": "pkcs11", "pkcs11": hsm.config("kek-1")}
        _apply(config, args.set)
        plugin = KleidiProcess(root / "kleidi", config, env=hsm.env)
        started = time.perf_counter()
        plugin.start(wait=False)
        first_status = wait_for(lambda: _status_time(plugin, started), 30, "first Status", interval=0.005)
        try:
            plugin.wait_healthy()
            with plugin.client() as kms:
                requests = kms_requests(kms)
            raw = {n: _raw_calls(hsm, n) for n in CLIENTS}
            with Floor(root) as floor:
                floor_requests = _floor_requests(floor.socket)
                sockets = {"kleidi": plugin.socket, "floor": floor.socket}
                asks = {"kleidi": requests, "floor": floor_requests}
                status = {
                    who: goclient.measure(binary, sockets[who], METHODS["v2 Status"], b"", 1, CALLS)
                    for who in ("kleidi", "floor")
                }
                operations = [op for op in OPERATIONS if args.only is None or args.only in op.split()]
                rounds = [_round(binary, sockets, asks, operations, i % 2 == 1) for i in range(args.rounds)]
                floor_rss = rss_mib(floor.pid)
            assert plugin.proc is not None
            _report(config, status, rounds, raw, rss_mib(plugin.proc.pid), floor_rss, first_status)
        finally:
            plugin.stop()


def _floor_requests(socket: str) -> dict[str, bytes]:
    with KmsClient(socket) as floor:
        return kms_requests(floor)


def _round(
    binary: Path,
    sockets: dict[str, str],
    requests: dict[str, dict[str, bytes]],
    operations: Sequence[str],
    floor_first: bool,
) -> dict[tuple[str, str, int], Result]:
    """Every operation at 1 and at 8 callers, kleidi and the floor back to back (this VM's throughput drifts by
    20% within a minute, so a ratio compares measurements taken together), who goes first alternating by round."""
    found: dict[tuple[str, str, int], Result] = {}
    order = ("floor", "kleidi") if floor_first else ("kleidi", "floor")
    for op in operations:
        for n in CLIENTS:
            for who in order:
                found[who, op, n] = goclient.measure(binary, sockets[who], METHODS[op], requests[who][op], n, CALLS)
    return found


def _median(results: list[Result]) -> Result:
    return Result(
        ops_per_s=statistics.median(r.ops_per_s for r in results),
        p50_ms=statistics.median(r.p50_ms for r in results),
        p99_ms=statistics.median(r.p99_ms for r in results),
    )


def _report(
    config: dict[str, Any],
    status: dict[str, Result],
    rounds: list[dict[tuple[str, str, int], Result]],
    raw: dict[int, dict[str, Result]],
    rss: float,
    floor_rss: float,
    first_status: float,
) -> None:
    tuned = {k: v for k, v in config["pkcs11"].items() if k in ("session_keys", "pool_size")}
    print(f"\nkleidi pkcs11 on SoftHSM2 (aes-gcm{', ' if tuned else ''}{tuned or ''}) against the floor")
    print(f"client: Go grpc, as the apiserver; median of {len(rounds)} rounds; ratio = kleidi / floor ops/s")
    print(
        f"{'operation':<12}{'callers':>8}{'kleidi/s':>10}{'p50 ms':>8}{'p99 ms':>8}{'floor/s':>10}{'p50 ms':>8}"
        f"{'ratio':>7}  {'each round':<26}{'raw token/s':>11}"
    )
    print(
        f"{'v2 Status':<12}{1:>8}{status['kleidi'].ops_per_s:>10.0f}{status['kleidi'].p50_ms:>8.3f}"
        f"{status['kleidi'].p99_ms:>8.3f}{status['floor'].ops_per_s:>10.0f}{status['floor'].p50_ms:>8.3f}"
    )
    ratios: dict[tuple[str, int], float] = {}
    for op in sorted({op for _, op, _ in rounds[0]}, key=OPERATIONS.index):
        for n in CLIENTS:
            ours = _median([r["kleidi", op, n] for r in rounds])
            floor = _median([r["floor", op, n] for r in rounds])
            each = [r["kleidi", op, n].ops_per_s / r["floor", op, n].ops_per_s for r in rounds]
            ratios[op, n] = statistics.median(each)
            token = raw[n][op.split()[1]].ops_per_s
            print(
                f"{op:<12}{n:>8}{ours.ops_per_s:>10.0f}{ours.p50_ms:>8.3f}{ours.p99_ms:>8.3f}{floor.ops_per_s:>10.0f}"
                f"{floor.p50_ms:>8.3f}{ratios[op, n]:>7.2f}  {' '.join(f'{e:.2f}' for e in each):<26}{token:>11.0f}"
            )
    status_ratio = status["kleidi"].p50_ms / status["floor"].p50_ms
    worst = min(ratios, key=lambda k: ratios[k])
    mb = 1.048576  # MB per MiB
    checks = [
        (
            "every Encrypt/Decrypt at least 0.9x the floor",
            ratios[worst] >= 0.9,
            f"{worst[0]} at {worst[1]}: {ratios[worst]:.2f}x",
        ),
        ("Status p50 within 1.15x the floor's", status_ratio <= 1.15, f"{status_ratio:.2f}x"),
        ("RSS under 80 MB after the run", rss * mb < 80, f"{rss * mb:.1f} MB (the floor: {floor_rss * mb:.1f} MB)"),
    ]
    for name, met, value in checks:
        print(f"target {'met   ' if met else 'MISSED'} {name}: {value}")
    print(f"time from start to first served Status: {first_status * 1000:.0f} ms")


def _status_time(plugin: KleidiProcess, started: float) -> float | None:
    if not os.path.exists(plugin.socket):
        return None
    try:
        with KmsClient(plugin.socket, timeout=0.5) as kms:
            kms.status()
    except Exception:
        return None
    return time.perf_counter() - started


if __name__ == "__main__":
    main(sys.argv[1:])
