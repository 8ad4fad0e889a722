"""kleidi over its socket vs raw hvac transit calls against the same OpenBao, in one run."""

from __future__ import annotations

import base64
import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import hvac

from bench import goclient
from bench.common import HEADER, Result, kms_requests, measure, row
from kleidi.api import v2_pb2
from tests.backends.openbao import OpenBao, vault_section
from tests.plugin import KleidiProcess

CALLS = 500
KEY = "kleidi-bench"


def _raw_calls(bao: OpenBao, token: str, ciphertext: str, clients: int) -> dict[str, Result]:
    """The same transit calls made with hvac directly: one client (one pooled session) per thread."""
    seed = base64.b64encode(os.urandom(32)).decode()
    hvacs = [hvac.Client(url=bao.address, token=token, timeout=5) for _ in range(clients)]

    def enc(i: int) -> Callable[[], object]:
        return lambda: hvacs[i].secrets.transit.encrypt_data(KEY, seed)

    def dec(i: int) -> Callable[[], object]:
        return lambda: hvacs[i].secrets.transit.decrypt_data(KEY, ciphertext)

    results = {"encrypt": measure(enc, clients, CALLS), "decrypt": measure(dec, clients, CALLS)}
    for client in hvacs:
        client.adapter.close()
    return results


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="kleidi-bench-vault-") as tmp:
        root = Path(tmp)
        bao = OpenBao(root / "bao", tls=False).start()
        try:
            bao.create_key(KEY)
            token = bao.token([bao.kleidi_policy(KEY)], ttl="2h")
            token_file = root / "token"
            token_file.write_text(token)
            config = {
                "provider": "vault",
                "log_level": "warning",
                "vault": vault_section(bao, KEY, {"method": "token", "token_file": str(token_file)}),
            }
            with KleidiProcess(root / "kleidi", config) as plugin:
                plugin.start()
                plugin.wait_healthy()
                with plugin.client() as kms:
                    requests = kms_requests(kms)
                raw: dict[tuple[str, int], Result] = {}
                for n in (1, 8):
                    ciphertext = v2_pb2.DecryptRequest.FromString(requests["Decrypt"]).ciphertext.decode()
                    results = _raw_calls(bao, token, ciphertext, n)
                    raw["Encrypt", n], raw["Decrypt", n] = results["encrypt"], results["decrypt"]
                binary = goclient.require()
                for client, call in [("Go grpc, as the apiserver", functools.partial(goclient.measure, binary))]:
                    print(f"\nkleidi vault (OpenBao, transit aes256-gcm96), 32-byte data keys; client: {client}")
                    print("raw = hvac transit calls against the same OpenBao in this process")
                    print(HEADER)
                    ours: dict[tuple[str, int], Result] = {}
                    for n in (1, 8):
                        for op in ("Encrypt", "Decrypt"):
                            ours[op, n] = call(
                                plugin.socket, f"/v2.KeyManagementService/{op}", requests[f"v2 {op}"], n, CALLS
                            )
                            print(row(op, n, ours[op, n], raw[op, n]))
                    _targets(ours, raw)
        finally:
            bao.stop()


def _targets(ours: dict[tuple[str, int], Result], raw: dict[tuple[str, int], Result]) -> None:
    over = max(ours[op, 1].p50_ms - raw[op, 1].p50_ms for op in ("Encrypt", "Decrypt"))
    ratio = min(ours[op, 8].ops_per_s / raw[op, 8].ops_per_s for op in ("Encrypt", "Decrypt"))
    for name, met, value in (
        ("p50 at most 0.4 ms over raw hvac at 1 client", over <= 0.4, f"+{over:.3f} ms"),
        ("at least 0.8x raw hvac ops/s at 8 clients", ratio >= 0.8, f"{ratio:.2f}x"),
    ):
        print(f"target {'met   ' if met else 'MISSED'} {name}: {value}")


if __name__ == "__main__":
    main()
