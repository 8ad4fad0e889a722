"""The Go clients for the benchmarks, built once per process from bench/<program>/main.go with Debian's golang-go,
offline, in GOPATH mode:

- goclient: the gRPC client; the apiserver talks to KMS plugins with grpc-go, which costs less per call than
  Python's grpcio, so the targets are judged on what this client sees;
- transit: a lean Vault/OpenBao transit client (net/http, one kept-alive connection per caller), the raw
  reference for the Vault backend.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.common import Result

BENCH = Path(__file__).resolve().parent
DEBIAN_GOPATH = "/usr/share/gocode"
PROGRAMS = ("goclient", "transit", "soakclient")


def require(program: str = "goclient") -> Path:
    """Build ``program`` (once per process); exits with the fix when Go, or Debian's grpc-go for the gRPC
    client, is missing."""
    if program not in PROGRAMS:
        raise ValueError(f"no Go program {program!r} in bench/ (there are {', '.join(PROGRAMS)})")
    return _build(program)


@functools.cache
def _build(program: str) -> Path:
    if shutil.which("go") is None:
        raise SystemExit("the benchmarks need Go: `make bench` installs golang-go")
    if program != "transit" and not Path(DEBIAN_GOPATH, "src/google.golang.org/grpc").is_dir():
        raise SystemExit(
            "the benchmarks need Go and grpc-go: `make bench` installs golang-go and golang-google-grpc-dev"
        )
    root = Path(tempfile.mkdtemp(prefix=f"kleidi-{program}-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # the binary and Go's build cache
    package = root / "src" / program
    package.mkdir(parents=True)
    shutil.copy(BENCH / program / "main.go", package / "main.go")
    binary = root / program
    env = {**os.environ, "GOPATH": f"{root}:{DEBIAN_GOPATH}", "GO111MODULE": "off", "GOCACHE": str(root / "cache")}
    subprocess.run(["go", "build", "-o", str(binary), f"./src/{program}"], cwd=root, env=env, check=True)
    return binary


def _run(argv: list[str]) -> Result:
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(argv[0]).name} exited with {done.returncode}: {done.stderr.strip()}")
    out = done.stdout.split()
    return Result(ops_per_s=float(out[0]), p50_ms=float(out[1]), p99_ms=float(out[2]))


def measure(binary: Path, socket: str, method: str, request: bytes, clients: int, calls_per_client: int) -> Result:
    """``method`` on the KMS plugin at ``socket`` with the gRPC client, ``request`` sent as serialized."""
    return _run(
        [
            str(binary),
            "-socket",
            socket,
            "-method",
            method,
            "-request",
            request.hex(),
            "-clients",
            str(clients),
            "-calls",
            str(calls_per_client),
        ]
    )


def measure_transit(
    binary: Path,
    address: str,
    key: str,
    token_file: Path,
    op: str,
    clients: int,
    calls_per_client: int,
    *,
    ciphertext: str = "",
    mount: str = "transit",
) -> Result:
    """Transit ``op`` (encrypt, or decrypt of ``ciphertext``) on ``key`` with the transit client; the token is
    read from ``token_file``, never passed on the command line."""
    argv = [
        str(binary),
        "-address",
        address,
        "-key",
        key,
        "-mount",
        mount,
        "-token-file",
        str(token_file),
        "-op",
        op,
        "-clients",
        str(clients),
        "-calls",
        str(calls_per_client),
    ]
    if ciphertext:
        argv += ["-ciphertext", ciphertext]
    return _run(argv)
