"""The Go gRPC client for the benchmarks: the apiserver talks to KMS plugins with grpc-go, which costs less per
call than Python's grpcio, so the targets are judged on what this client sees."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.common import Result

SOURCE = Path(__file__).resolve().parent / "goclient" / "main.go"
DEBIAN_GOPATH = "/usr/share/gocode"


@functools.cache
def require() -> Path:
    """Build the client (once per process); exits with the fix when Go or Debian's grpc-go is missing."""
    if shutil.which("go") is None or not Path(DEBIAN_GOPATH, "src/google.golang.org/grpc").is_dir():
        raise SystemExit(
            "the benchmarks need Go and grpc-go: `make bench` installs golang-go and golang-google-grpc-dev"
        )
    root = Path(tempfile.mkdtemp(prefix="kleidi-goclient-"))
    package = root / "src" / "kmsbench"
    package.mkdir(parents=True)
    shutil.copy(SOURCE, package / "main.go")
    binary = root / "kmsbench"
    env = {**os.environ, "GOPATH": f"{root}:{DEBIAN_GOPATH}", "GO111MODULE": "off", "GOCACHE": str(root / "cache")}
    subprocess.run(["go", "build", "-o", str(binary), "./src/kmsbench"], cwd=root, env=env, check=True)
    return binary


def measure(binary: Path, socket: str, method: str, request: bytes, clients: int, calls_per_client: int) -> Result:
    out = subprocess.run(
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
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout.split()
    return Result(ops_per_s=float(out[0]), p50_ms=float(out[1]), p99_ms=float(out[2]))
