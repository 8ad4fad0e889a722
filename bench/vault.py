"""kleidi's Vault backend on OpenBao against the bare transit call, both made by lean Go clients in one run.

- kleidi: KMS v2 Encrypt/Decrypt of a 32-byte data key over kleidi's unix socket, called by the Go gRPC client
  (bench/goclient/main.go) as the apiserver calls it;
- raw:    the transit call kleidi makes for it, less kleidi's key_version field
          (POST /v1/transit/encrypt|decrypt/<key>, a random 32-byte plaintext in base64, or the ciphertext kleidi
          made) with the same token on the same OpenBao, by a Go net/http client with one kept-alive connection
          per caller (bench/transit/main.go): what transit costs, with next to nothing of the client's own.

kleidi and raw are measured back to back in each round, who goes first alternating; the median of the rounds is
reported, the ratio being kleidi / raw ops/s.

    python -m bench vault          (with the other backends: python -m bench)
    python -m bench.vault [--rounds 5] [--calls 1000] [--without-fast-path]

--without-fast-path also measures, in the same rounds, a kleidi whose Vault fast path (providers/vault_fast.py)
is taken out (bench/launch.py): what that path buys.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import goclient
from bench.common import METHODS, Result, kms_requests, median, rotated
from kleidi.api import v2_pb2
from tests.backends.openbao import OpenBao, vault_section
from tests.plugin import KleidiProcess

CALLS = 1000
ROUNDS = 5
CLIENTS = (1, 8)
OPERATIONS = ("Encrypt", "Decrypt")
KEY = "kleidi-bench"
TARGET = 0.4  # issue 17: a lone kleidi call at least 0.4x the Go transit client's rate
WITHOUT_FAST = "kleidi without the fast path"
_Measure = Callable[[str, int], Result]  # (operation, callers) -> the result


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m bench` calls this with no arguments: the defaults."""
    parser = argparse.ArgumentParser(prog="python -m bench.vault", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds, the median reported ({ROUNDS})")
    parser.add_argument("--calls", type=int, default=CALLS, help=f"calls per caller in each measurement ({CALLS})")
    parser.add_argument(
        "--without-fast-path", action="store_true", help="also measure kleidi without its Vault fast path"
    )
    args = parser.parse_args([] if argv is None else argv)
    grpc_client, transit_client = goclient.require(), goclient.require("transit")
    with tempfile.TemporaryDirectory(prefix="kleidi-bench-vault-") as tmp:
        root = Path(tmp)
        bao = OpenBao(root / "bao", tls=False).start()
        try:
            bao.create_key(KEY)
            token_file = root / "token"
            token_file.touch(mode=0o600)
            token_file.write_text(bao.token([bao.kleidi_policy(KEY)], ttl="2h"))
            config = {
                "provider": "vault",
                "log_level": "warning",
                "vault": vault_section(bao, KEY, {"method": "token", "token_file": str(token_file)}),
            }
            plugins = {"kleidi": KleidiProcess(root / "kleidi", config)}
            if args.without_fast_path:
                launcher = ("-m", "bench.launch", "--without", "vault-fast-path")
                plugins[WITHOUT_FAST] = KleidiProcess(root / "without", config, launcher=launcher)
            try:
                callers: dict[str, _Measure] = {}
                for name, plugin in plugins.items():
                    plugin.start()
                    plugin.wait_healthy()
                    with plugin.client() as kms:
                        callers[name] = _kleidi_caller(grpc_client, plugin.socket, kms_requests(kms), args.calls)
                with plugins["kleidi"].client() as kms:
                    ciphertext = v2_pb2.DecryptRequest.FromString(kms_requests(kms)["v2 Decrypt"]).ciphertext.decode()

                def transit(op: str, clients: int) -> Result:
                    return goclient.measure_transit(
                        transit_client,
                        bao.address,
                        KEY,
                        token_file,
                        op.lower(),
                        clients,
                        args.calls,
                        ciphertext=ciphertext if op == "Decrypt" else "",
                    )

                callers["raw"] = transit
                rounds = [_round(callers, i) for i in range(args.rounds)]
            finally:
                for plugin in plugins.values():
                    plugin.stop()
            _report(rounds, args.calls)
        finally:
            bao.stop()


def _kleidi_caller(binary: Path, socket: str, requests: dict[str, bytes], calls: int) -> _Measure:
    def measure(op: str, clients: int) -> Result:
        return goclient.measure(binary, socket, METHODS[f"v2 {op}"], requests[f"v2 {op}"], clients, calls)

    return measure


def _round(callers: dict[str, _Measure], number: int) -> dict[tuple[str, str, int], Result]:
    """Each operation at 1 and at 8 callers, every caller back to back (this VM's throughput drifts within a
    minute, so a ratio compares measurements taken together), the order rotating by round."""
    found: dict[tuple[str, str, int], Result] = {}
    order = rotated(list(callers), number)
    for op in OPERATIONS:
        for n in CLIENTS:
            for who in order:
                found[who, op, n] = callers[who](op, n)
    return found


def _report(rounds: list[dict[tuple[str, str, int], Result]], calls: int) -> None:
    print("\nkleidi vault (OpenBao dev server, transit aes256-gcm96, token auth), 32-byte data keys, KMS v2")
    print(
        f"kleidi: Go grpc client, as the apiserver; raw: Go net/http transit client, one kept-alive connection per"
        f" caller\n{calls} calls per caller, median of {len(rounds)} rounds; ratio = kleidi / raw ops/s"
    )
    print(
        f"{'operation':<12}{'callers':>8}{'kleidi/s':>10}{'p50 ms':>8}{'p99 ms':>8}{'raw/s':>10}{'p50 ms':>8}"
        f"{'ratio':>7}  {'each round'}"
    )
    ratios: dict[tuple[str, int], float] = {}
    for op in OPERATIONS:
        for n in CLIENTS:
            ours = median([r["kleidi", op, n] for r in rounds])
            raw = median([r["raw", op, n] for r in rounds])
            each = [r["kleidi", op, n].ops_per_s / r["raw", op, n].ops_per_s for r in rounds]
            ratios[op, n] = statistics.median(each)
            print(
                f"{'v2 ' + op:<12}{n:>8}{ours.ops_per_s:>10.0f}{ours.p50_ms:>8.3f}{ours.p99_ms:>8.3f}"
                f"{raw.ops_per_s:>10.0f}{raw.p50_ms:>8.3f}{ratios[op, n]:>7.2f}  {' '.join(f'{e:.2f}' for e in each)}"
            )
    if (WITHOUT_FAST, OPERATIONS[0], 1) in rounds[0]:
        print(f"\n{WITHOUT_FAST}, measured in the same rounds: its ops/s over kleidi's")
        for op in OPERATIONS:
            for n in CLIENTS:
                each = [r[WITHOUT_FAST, op, n].ops_per_s / r["kleidi", op, n].ops_per_s for r in rounds]
                print(f"{'v2 ' + op:<12}{n:>8}{statistics.median(each):>7.2f}x  {' '.join(f'{e:.2f}' for e in each)}")
    worst = min(OPERATIONS, key=lambda op: ratios[op, 1])
    met = ratios[worst, 1] >= TARGET
    print(
        f"target {'met   ' if met else 'MISSED'} a lone kleidi call at least {TARGET}x the Go transit client's rate:"
        f" {worst} at 1: {ratios[worst, 1]:.2f}x"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
