"""Soak: mixed Encrypt/Decrypt/Status load on kleidi for a long while, with its backend taken away and brought back
every few minutes, printing the plugin's RSS, open file descriptors, threads and call outcomes each minute.

    python -m bench.soak softhsm|vault [--minutes 30] [--restart-every 5] [--outage 20] [--clients 4] [--pause-ms 0]

softhsm: the token directory is moved away and back (an unplugged and replugged token). vault: OpenBao (TLS, on-disk
storage) is killed and started again. The Go client (bench/soakclient/main.go) makes the calls as apiservers do,
4 connections by default, 3 s deadlines, and counts every outcome. At the end the targets of issue 17/16 are checked:
RSS growth after the first minute under 5 MB; file descriptors and threads flat; every failed call during an outage
(until 10 s after the backend is back) UNAVAILABLE; no failed call outside one. CI does not run it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import goclient
from bench.common import METHODS, kms_requests, rss_mib
from tests.plugin import KleidiProcess

GRACE = 10.0  # after the backend is back: the health check and the reconnect back-off settle within it
STATUS = METHODS["v2 Status"]


@contextmanager
def _softhsm(root: Path) -> Iterator[tuple[dict[str, Any], dict[str, str], Callable[[], Callable[[], None]]]]:
    from tests.backends.softhsm import SoftHsm

    hsm = SoftHsm(root / "hsm")
    hsm.keygen("kek-1")

    def outage() -> Callable[[], None]:
        aside = hsm.take_away()
        return lambda: hsm.bring_back(aside)

    yield {"provider": "pkcs11", "pkcs11": hsm.config("kek-1")}, hsm.env, outage


@contextmanager
def _vault(root: Path) -> Iterator[tuple[dict[str, Any], dict[str, str], Callable[[], Callable[[], None]]]]:
    from tests.backends.openbao import OpenBao, TestCA, vault_section

    bao = OpenBao(root / "bao", tls=True, ca=TestCA(root / "ca")).start()
    try:
        bao.enable_transit()
        bao.create_key("kleidi-soak")
        token_file = root / "token"
        token_file.touch(mode=0o600)
        token_file.write_text(bao.token([bao.kleidi_policy("kleidi-soak")], period="24h"))
        auth = {"method": "token", "token_file": str(token_file)}

        def outage() -> Callable[[], None]:
            bao.kill()

            def restore() -> None:
                bao.start()  # raft storage: the key is still there; start() unseals

            return restore

        yield {"provider": "vault", "vault": vault_section(bao, "kleidi-soak", auth)}, dict(os.environ), outage
    finally:
        bao.stop()


BACKENDS = {"softhsm": _softhsm, "vault": _vault}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("backend", choices=sorted(BACKENDS))
    parser.add_argument("--minutes", type=float, default=30, help="how long (30)")
    parser.add_argument("--restart-every", type=float, default=5, help="minutes between backend outages (5)")
    parser.add_argument("--outage", type=float, default=20, help="seconds each outage lasts (20)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent connections (4)")
    parser.add_argument("--pause-ms", type=float, default=0, help="pause between one connection's calls (0)")
    args = parser.parse_args(argv)
    client = goclient.require("soakclient")
    with tempfile.TemporaryDirectory(prefix="kleidi-soak-") as tmp, BACKENDS[args.backend](Path(tmp)) as backend:
        config, env, outage = backend
        config = {**config, "health_interval": "5s", "log_level": "warning"}
        with KleidiProcess(Path(tmp) / "kleidi", config, env=env) as plugin:
            plugin.start()
            plugin.wait_healthy(30)
            assert plugin.proc is not None
            with plugin.client() as kms:
                requests = kms_requests(kms)
            mix = [(METHODS["v2 Encrypt"], requests["v2 Encrypt"])] * 2
            mix += [(METHODS["v2 Decrypt"], requests["v2 Decrypt"]), (STATUS, b"")]
            argv = [str(client), "-socket", plugin.socket, "-duration", f"{args.minutes * 60:.0f}s"]
            argv += ["-clients", str(args.clients), "-pause", f"{args.pause_ms}ms"]
            argv += [arg for method, request in mix for arg in ("-call", f"{method}={request.hex()}")]
            run = _Run(plugin.proc.pid)
            with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as load:
                threading.Thread(target=run.read, args=(load.stdout,), daemon=True).start()
                run.drive(args.minutes * 60, args.restart_every * 60, args.outage, outage)
                load.wait(60)
            run.verdict()


class _Run:
    """The soak's record: per-second outcomes from the client, outage windows, and per-minute samples."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.started = time.monotonic()
        self.seconds: list[tuple[float, dict[str, int]]] = []  # (time since start, counts in that second)
        self.outages: list[tuple[float, float]] = []  # (down at, back at), times since start
        self.samples: list[tuple[int, float, int, int]] = []  # (minute, RSS MiB, fds, threads)
        self.lock = threading.Lock()

    def read(self, stream: Any) -> None:
        for line in stream:
            entry = json.loads(line)
            with self.lock:
                self.seconds.append((time.monotonic() - self.started, entry["counts"]))

    def now(self) -> float:
        return time.monotonic() - self.started

    def drive(self, total: float, every: float, length: float, outage: Callable[[], Callable[[], None]]) -> None:
        print(f"{'minute':>6} {'RSS MiB':>8} {'fds':>5} {'threads':>8}  backend  calls in the minute")
        next_outage, next_sample, minute = every, 60.0, 0
        while self.now() < total:
            if self.now() >= next_outage and self.now() + length + GRACE < total:
                down = self.now()
                restore = outage()
                time.sleep(length)
                restore()
                self.outages.append((down, self.now()))
                next_outage += every
            if self.now() >= next_sample:
                minute += 1
                self._sample(minute, next_sample)
                next_sample += 60
            time.sleep(0.2)

    def _sample(self, minute: int, end: float) -> None:
        rss = rss_mib(self.pid)
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        threads = len(os.listdir(f"/proc/{self.pid}/task"))
        self.samples.append((minute, rss, fds, threads))
        with self.lock:
            counts = collections.Counter[str]()
            for at, each in self.seconds:
                if end - 60 <= at < end:
                    counts.update(each)
        down = any(end - 60 <= back and down <= end for down, back in self.outages)
        shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"{minute:>6} {rss:>8.1f} {fds:>5} {threads:>8}  {'outage' if down else 'up':<7}  {shown}", flush=True)

    def verdict(self) -> None:
        during, outside = collections.Counter[str](), collections.Counter[str]()
        with self.lock:
            for at, counts in self.seconds:
                # a client line covers the second before it was read
                window = any(down - 1 <= at <= back + GRACE for down, back in self.outages)
                for key, n in counts.items():
                    if not key.endswith(" OK"):
                        (during if window else outside)[key] += n
        warm = self.samples[0] if self.samples else None
        last = self.samples[-1] if self.samples else None
        checks: list[tuple[str, bool, str]] = []
        if warm is not None and last is not None:
            growth = (last[1] - warm[1]) * 1.048576
            checks.append(("RSS growth after the first minute under 5 MB", growth < 5, f"{growth:+.1f} MB"))
            checks.append(("file descriptors flat", abs(last[2] - warm[2]) <= 2, f"{warm[2]} then {last[2]}"))
            checks.append(("threads flat", abs(last[3] - warm[3]) <= 2, f"{warm[3]} then {last[3]}"))
        odd = {k: n for k, n in during.items() if not k.endswith(" Unavailable")}
        checks.append(("every failure during an outage UNAVAILABLE", not odd, str(dict(during)) or "none failed"))
        checks.append(("no failure outside an outage", not outside, str(dict(outside)) or "none"))
        print(f"outages: {len(self.outages)}")
        for name, met, value in checks:
            print(f"target {'met   ' if met else 'MISSED'} {name}: {value}")


if __name__ == "__main__":
    main(sys.argv[1:])
