"""A real etcd for tests (Debian's etcd-server and etcd-client): on 127.0.0.1, free ports, a temp data directory,
optionally TLS with client-certificate authentication as kubeadm runs it. Values are planted with etcdctl, the
value on stdin."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.backends.openbao import TestCA
from tests.backends.process import die_with_parent, stop_process
from tests.plugin import free_port, wait_for


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # make deps installs etcd-server and etcd-client; a missing binary is a failure, not a skip
        raise RuntimeError(f"{name} is missing: apt-get install etcd-server etcd-client (make deps)")
    return path


class Etcd:
    """One etcd member. With ``ca``, it serves TLS and requires a client certificate that ``ca`` signed; the
    client's certificate and key are then ``client_cert`` and ``client_key``."""

    def __init__(self, root: Path, ca: TestCA | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca = ca
        self.client_port, self.peer_port = free_port(), free_port()
        scheme = "https" if ca else "http"
        self.endpoint = f"{scheme}://127.0.0.1:{self.client_port}"
        self.log_file = root / "etcd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.tls: list[str] = []
        self.client_flags: list[str] = []
        if ca is not None:
            server_cert, server_key = ca.issue("etcd-server")
            self.client_cert, self.client_key = ca.issue("etcd-client", client=True)
            self.tls = [
                f"--cert-file={server_cert}",
                f"--key-file={server_key}",
                f"--trusted-ca-file={ca.file}",
                "--client-cert-auth",
            ]
            self.client_flags = [f"--cacert={ca.file}", f"--cert={self.client_cert}", f"--key={self.client_key}"]

    def start(self) -> Etcd:
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            binary("etcd"),
            "--name=test",
            f"--data-dir={self.root / 'data'}",
            f"--listen-client-urls={self.endpoint}",
            f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            *self.tls,
        ]
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - only calls prctl, async-signal-safe
            )
        wait_for(self._healthy, 20, f"etcd on {self.endpoint}\n{self.log()[-2000:]}", interval=0.2)
        return self

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"etcd exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        return self.etcdctl("endpoint", "health", check=False).returncode == 0

    def etcdctl(self, *args: str, stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        argv = [binary("etcdctl"), f"--endpoints={self.endpoint}", *self.client_flags, *args]
        done = subprocess.run(argv, input=stdin, capture_output=True, env={"ETCDCTL_API": "3"}, check=False, timeout=30)
        if check and done.returncode != 0:
            raise AssertionError(f"etcdctl {args[0]} failed: {done.stderr.decode(errors='replace')}")
        return done

    def put(self, key: str, value: bytes) -> None:
        """A value exactly as given (etcdctl put reads it from stdin when the command line has none)."""
        self.etcdctl("put", key, stdin=value)

    def stop(self) -> None:
        stop_process(self.proc, group=True)
        self.proc = None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def __enter__(self) -> Etcd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
