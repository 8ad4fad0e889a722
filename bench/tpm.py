"""kleidi (aes-cbc-hmac through tpm2-pkcs11) vs raw PyKCS11 CBC+HMAC on the same software TPM token.

Starts a private software TPM (swtpm + tpm2-abrmd + a tpm2-pkcs11 token, see tests/backends/tpm.py) and one
`kleidi serve` process on it, then measures Encrypt and Decrypt of a 32-byte DEK seed:

- kleidi: the KMS v2 gRPC calls over kleidi's unix socket, made by the Go gRPC client (bench/goclient/main.go)
          as the apiserver makes them, one connection per caller (it does not compare what Decrypt returns: the
          tests check kleidi's answers, this measures them);
- raw:    the same work done with PyKCS11 in this process, one session per client thread:
          Encrypt = CKM_AES_CBC over the PKCS#7-padded seed + CKM_SHA256_HMAC over header|IV|ciphertext,
          Decrypt = CKM_SHA256_HMAC, constant-time compare, CKM_AES_CBC, unpad, compare with the seed.

Both pay two TPM operations per call, and the TPM serialises them: more clients add queueing, not
throughput. Call counts are small because a software TPM does only a few hundred operations a second.

    python -m bench tpm            (with the other backends: python -m bench)
    python -m bench.tpm [--calls 80] [--clients 1,8] [--pool-size 4]
"""

from __future__ import annotations

import argparse
import hmac
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import PyKCS11

from bench import goclient
from bench.common import HEADER, METHODS, Result, kms_requests, measure, row
from tests.backends.tpm import SoftwareTPM
from tests.plugin import KleidiProcess

# Calls per measurement, split over the clients (a software TPM does ~170 kleidi calls/s).
CALLS = 80
SEED_BYTES = 32
BLOCK = 16
MAC_BYTES = 32
HMAC = PyKCS11.Mechanism(PyKCS11.CKM_SHA256_HMAC, None)
# Stands in for kleidi's blob header (magic, version, mechanism, two labels, fingerprint): the same size.
RAW_HEADER = b"kl\x01\x02" + b"\x0ckleidi-kek-1" + b"\x0ckleidi-mac-1" + bytes(8)


class RawToken:
    """PyKCS11 on the software TPM's token, one logged-in session per client."""

    def __init__(self, tpm: SoftwareTPM, sessions: int) -> None:
        self.lib = PyKCS11.PyKCS11Lib()
        with tpm.environ():  # tpm2-pkcs11 reads its TCTI and store at C_Initialize
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
        signed, mac = blob[:-MAC_BYTES], blob[-MAC_BYTES:]
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


def _checked(call: Callable[[], bytes], expected: bytes, what: str) -> Callable[[], None]:
    def run() -> None:
        if call() != expected:
            raise AssertionError(f"{what} round trip returned a different seed")

    return run


def run(calls: int = CALLS, client_counts: Sequence[int] = (1, 8), pool_size: int = 4) -> list[str]:
    """Measure both paths; returns the printed table lines."""
    binary = goclient.require()
    lines = [
        "",
        f"kleidi pkcs11 (software TPM via tpm2-pkcs11, aes-cbc-hmac, pool_size {pool_size}), 32-byte data keys;",
        "raw = PyKCS11 CBC+HMAC on the same token in this process; every call is two TPM operations",
        HEADER,
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory(prefix="kleidi-bench-tpm-") as work, SoftwareTPM() as tpm:
        config = {
            "provider": "pkcs11",
            "health_timeout": "40s",  # longer than the session wait below
            "pkcs11": tpm.pkcs11_config(pool_size=pool_size, session_timeout="30s"),
        }
        with KleidiProcess(Path(work) / "kleidi", config, env={**os.environ, **tpm.env}) as plugin:
            plugin.start()
            plugin.wait_healthy(30)
            token = RawToken(tpm, max(client_counts))
            try:
                with plugin.client(timeout=30) as kms:
                    requests = kms_requests(kms)

                def kleidi(operation: str, callers: int, calls_per_caller: int) -> Result:
                    method, request = METHODS[operation], requests.get(operation, b"")
                    return goclient.measure(binary, plugin.socket, method, request, callers, calls_per_caller)

                seed = os.urandom(SEED_BYTES)
                raw_blob = token.encrypt(token.sessions[0], seed)
                status = kleidi("v2 Status", 1, 200)
                lines.append(row("Status", 1, status, None))
                print(lines[-1], flush=True)
                for n in client_counts:
                    per_client = -(-calls // n)
                    raw_enc = measure(lambda i: lambda: token.encrypt(token.sessions[i], seed), n, per_client)
                    raw_dec = measure(
                        lambda i: _checked(lambda: token.decrypt(token.sessions[i], raw_blob), seed, "raw"),
                        n,
                        per_client,
                    )
                    enc, dec = kleidi("v2 Encrypt", n, per_client), kleidi("v2 Decrypt", n, per_client)
                    for name, plugin_result, raw_result in (("Encrypt", enc, raw_enc), ("Decrypt", dec, raw_dec)):
                        lines.append(row(name, n, plugin_result, raw_result))
                        print(lines[-1], flush=True)
            finally:
                token.close()
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m bench` calls this with no arguments: the defaults."""
    parser = argparse.ArgumentParser(prog="python -m bench.tpm", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--calls", type=int, default=CALLS, help=f"calls per measurement, split over the clients ({CALLS})"
    )
    parser.add_argument("--clients", default="1,8", help="comma-separated client counts (1,8)")
    parser.add_argument("--pool-size", type=int, default=4, help="kleidi pkcs11.pool_size (4)")
    args = parser.parse_args([] if argv is None else argv)
    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    if not counts or min(counts) < 1 or args.calls < 1:
        parser.error("--clients and --calls must be positive")
    run(args.calls, counts, args.pool_size)


if __name__ == "__main__":
    main(sys.argv[1:])
