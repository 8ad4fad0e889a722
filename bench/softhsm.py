"""kleidi on a SoftHSM2 token against the floor (bench/floor.py), both called by the Go client in one run, with
the token floor (the floor making kleidi's AES-GCM token call on the same token, with nothing around it) and raw
PyKCS11 calls on the token for reference.

    python -m bench softhsm        (with the other backends: python -m bench)
    python -m bench.softhsm [--set KEY=VALUE ...] [--variant KEY=VALUE ...]
                            [--without pkcs11-direct|token-work|request-path] [--only v2|v1|Encrypt|Decrypt]

--set changes the config of the kleidi measured; each --variant starts one more kleidi with that setting on top,
measured in the same rounds, so what a tuning setting buys is read off one run (docs/performance.md).
--without does the same for a kleidi with a mechanism taken out (bench/launch.py): pkcs11-direct, its token calls
through PyKCS11; token-work, the token's AES-GCM done in process as the floor does it, which leaves kleidi's own
request path to compare with the floor; request-path, everything but the token call taken out, which leaves the
token call's cost to compare with the floor, and kleidi's own code's to compare with kleidi.
"""

from __future__ import annotations

import argparse
import json
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
from bench.common import METHODS, Result, kms_requests, measure, median, rotated, rss_mib
from bench.floor import Floor
from kleidi.client import KmsClient
from tests.backends.softhsm import SoftHsm
from tests.plugin import KleidiProcess, wait_for

CALLS = 1000
TOKEN_FLOOR = "token floor"
ROUNDS = 5
CLIENTS = (1, 8)
_PKCS11_TUNING = ("pool_size", "session_keys", "inline_calls", "session_timeout")
# What bench/launch.py takes out of a kleidi on a PKCS#11 token (its WITHOUT), and which of those replace AES-GCM calls.
_SOFTHSM_WITHOUT = ("pkcs11-direct", "token-work", "request-path")
_AES_GCM_ONLY = ("token-work", "request-path")
OPERATIONS = ("v2 Encrypt", "v2 Decrypt", "v1 Encrypt", "v1 Decrypt")


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
    parser.add_argument(
        "--variant",
        type=_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also measure a kleidi with this setting changed, in the same rounds (repeatable)",
    )
    parser.add_argument(
        "--without",
        choices=_SOFTHSM_WITHOUT,
        action="append",
        default=[],
        help="also measure a kleidi with this mechanism taken out, in the same rounds (bench/launch.py)",
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds, the median reported ({ROUNDS})")
    parser.add_argument(
        "--only", choices=("v2", "v1", "Encrypt", "Decrypt"), help="only the operations of this API or this method"
    )
    args = parser.parse_args([] if argv is None else argv)
    mechanism = next((value for key, value in args.set if key == ["pkcs11", "mechanism"]), "aes-gcm")
    for name in args.without:
        if name in _AES_GCM_ONLY and mechanism != "aes-gcm":
            parser.error(f"--without {name} replaces the token's AES-GCM calls: it needs pkcs11.mechanism=aes-gcm")
    binary = goclient.require()
    with tempfile.TemporaryDirectory(prefix="kleidi-bench-") as tmp:
        root = Path(tmp)
        hsm = SoftHsm(root / "hsm")
        hsm.keygen("kek-1")
        config: dict[str, Any] = {"provider": "pkcs11", "pkcs11": hsm.config("kek-1")}
        _apply(config, args.set)
        plugin = KleidiProcess(root / "kleidi", config, env=hsm.env)
        plugins = {"kleidi": plugin}
        try:
            started = time.perf_counter()
            plugin.start(wait=False)
            first_status = wait_for(lambda: _status_time(plugin, started), 30, "first Status", interval=0.005)
            for i, setting in enumerate(args.variant):
                variant = json.loads(json.dumps(config))
                _apply(variant, [setting])
                name = f"{'.'.join(setting[0])}={setting[1]}"
                plugins[name] = KleidiProcess(root / f"variant-{i}", variant, env=hsm.env)
                plugins[name].start()
            for mechanism in args.without:
                launcher = ("-m", "bench.launch", "--without", mechanism)
                plugins[f"without {mechanism}"] = KleidiProcess(
                    root / f"without-{mechanism}", config, env=hsm.env, launcher=launcher
                )
                plugins[f"without {mechanism}"].start()
            targets: dict[str, tuple[str, dict[str, bytes]]] = {}
            for name, each in plugins.items():
                each.wait_healthy()
                with each.client() as kms:
                    targets[name] = (each.socket, kms_requests(kms))
            raw = {n: _raw_calls(hsm, n) for n in CLIENTS}
            token = (hsm.module, hsm.label, "kek-1", str(hsm.pin_file))
            with Floor(root) as floor, Floor(root, token, env=hsm.env) as token_floor:
                for who, each_floor in (("floor", floor), (TOKEN_FLOOR, token_floor)):
                    with KmsClient(each_floor.socket) as kms:
                        targets[who] = (each_floor.socket, kms_requests(kms))
                status = {
                    who: goclient.measure(binary, targets[who][0], METHODS["v2 Status"], b"", 1, CALLS)
                    for who in ("kleidi", "floor")
                }
                operations = [op for op in OPERATIONS if args.only is None or args.only in op.split()]
                rounds = [_round(binary, targets, operations, i) for i in range(args.rounds)]
                floor_rss = rss_mib(floor.pid)
            rss = {name: rss_mib(each.proc.pid) for name, each in plugins.items() if each.proc is not None}
            _report(config, status, rounds, raw, rss, floor_rss, first_status)
        finally:
            for each in plugins.values():
                each.stop()


def _round(
    binary: Path, targets: dict[str, tuple[str, dict[str, bytes]]], operations: Sequence[str], number: int
) -> dict[tuple[str, str, int], Result]:
    """Every operation at 1 and at 8 callers on every target back to back (this VM's throughput drifts by 20%
    within a minute, so a ratio compares measurements taken together), the order rotating by round."""
    found: dict[tuple[str, str, int], Result] = {}
    order = rotated(list(targets), number)
    for op in operations:
        for n in CLIENTS:
            for who in order:
                socket, requests = targets[who]
                found[who, op, n] = goclient.measure(binary, socket, METHODS[op], requests[op], n, CALLS)
    return found


def _report(
    config: dict[str, Any],
    status: dict[str, Result],
    rounds: list[dict[tuple[str, str, int], Result]],
    raw: dict[int, dict[str, Result]],
    rss: dict[str, float],
    floor_rss: float,
    first_status: float,
) -> None:
    print(f"\nkleidi pkcs11 on SoftHSM2 against the floor; settings: {_settings(config)}")
    print(f"client: Go grpc, as the apiserver; median of {len(rounds)} rounds; ratio = ops/s over the floor's")
    print("raw token/s: PyKCS11 AES-GCM calls on the same token in the bench's own process, one session per thread")
    print(
        f"{'operation':<12}{'callers':>8}{'kleidi/s':>10}{'p50 ms':>8}{'p99 ms':>8}{'floor/s':>10}{'p50 ms':>8}"
        f"{'ratio':>7}  {'each round':<26}{'raw token/s':>11}"
    )
    print(
        f"{'v2 Status':<12}{1:>8}{status['kleidi'].ops_per_s:>10.0f}{status['kleidi'].p50_ms:>8.3f}"
        f"{status['kleidi'].p99_ms:>8.3f}{status['floor'].ops_per_s:>10.0f}{status['floor'].p50_ms:>8.3f}"
    )
    operations = sorted({op for _, op, _ in rounds[0]}, key=OPERATIONS.index)
    ratios = {(who, op, n): _ratios(rounds, who, op, n) for who in rss for op in operations for n in CLIENTS}
    for op in operations:
        for n in CLIENTS:
            ours = median([r["kleidi", op, n] for r in rounds])
            floor = median([r["floor", op, n] for r in rounds])
            each = ratios["kleidi", op, n]
            token = raw[n][op.split()[1]].ops_per_s
            print(
                f"{op:<12}{n:>8}{ours.ops_per_s:>10.0f}{ours.p50_ms:>8.3f}{ours.p99_ms:>8.3f}{floor.ops_per_s:>10.0f}"
                f"{floor.p50_ms:>8.3f}{statistics.median(each):>7.2f}  {' '.join(f'{e:.2f}' for e in each):<26}"
                f"{token:>11.0f}"
            )
    variants = [who for who in rss if who != "kleidi"]
    if variants:
        print("\nvariants, measured in the same rounds: ratio over the floor, and over kleidi as set above")
        for who in variants:
            for op in operations:
                for n in CLIENTS:
                    over_floor = statistics.median(ratios[who, op, n])
                    over_kleidi = statistics.median(
                        r[who, op, n].ops_per_s / r["kleidi", op, n].ops_per_s for r in rounds
                    )
                    print(f"{who:<32}{op:<12}{n:>3}{over_floor:>7.2f}x floor{over_kleidi:>7.2f}x kleidi")
    print(
        f"\n{TOKEN_FLOOR} (bench/floor.py making kleidi's token call on the same token, with nothing around it), in"
        " the same rounds: its rate over the floor's, and kleidi's over its"
    )
    for op in operations:
        for n in CLIENTS:
            token_over_floor = statistics.median(_ratios(rounds, TOKEN_FLOOR, op, n))
            kleidi_over_token = statistics.median(
                r["kleidi", op, n].ops_per_s / r[TOKEN_FLOOR, op, n].ops_per_s for r in rounds
            )
            print(f"{op:<12}{n:>3}{token_over_floor:>7.2f}x floor   kleidi {kleidi_over_token:.2f}x the token floor")
    status_ratio = status["kleidi"].p50_ms / status["floor"].p50_ms
    worst = min(((op, n) for op in operations for n in CLIENTS), key=lambda k: statistics.median(ratios["kleidi", *k]))
    lowest = statistics.median(ratios["kleidi", *worst])
    mb = 1.048576  # MB per MiB
    checks = [
        ("every Encrypt/Decrypt at least 0.9x the floor", lowest >= 0.9, f"{worst[0]} at {worst[1]}: {lowest:.2f}x"),
        ("Status p50 within 1.15x the floor's", status_ratio <= 1.15, f"{status_ratio:.2f}x"),
        (
            "RSS under 80 MB after the run",
            rss["kleidi"] * mb < 80,
            f"{rss['kleidi'] * mb:.1f} MB (the floor: {floor_rss * mb:.1f} MB)",
        ),
    ]
    for name, met, value in checks:
        print(f"target {'met   ' if met else 'MISSED'} {name}: {value}")
    print(f"time from start to first served Status: {first_status * 1000:.0f} ms")


def _ratios(rounds: list[dict[tuple[str, str, int], Result]], who: str, op: str, n: int) -> list[float]:
    return [r[who, op, n].ops_per_s / r["floor", op, n].ops_per_s for r in rounds]


def _settings(config: dict[str, Any]) -> str:
    """The settings that differ from kleidi's defaults, or "defaults"."""
    own = {k: v for k, v in config.items() if k not in ("provider", "pkcs11")}
    own.update({f"pkcs11.{k}": v for k, v in config["pkcs11"].items() if k in _PKCS11_TUNING})
    return ", ".join(f"{k}={v}" for k, v in own.items()) or "defaults"


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
