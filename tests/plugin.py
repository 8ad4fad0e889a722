"""Run `kleidi serve` as a real process and talk to it like the apiserver and the kubelet do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from kleidi.client import KmsClient
from tests.ports import free_port

REPO = Path(__file__).resolve().parent.parent


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test with ``what`` otherwise."""
    until = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > until:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class KleidiProcess:
    """One `kleidi serve` process with its own config file, socket, probe port and log file.

    ``config`` is the whole config mapping; ``listen`` and ``metrics_listen`` are filled in unless given."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        env: dict[str, str] | None = None,
        launcher: tuple[str, ...] = ("-m", "kleidi"),
    ) -> None:
        self.workdir = workdir
        self.launcher = launcher  # what runs `kleidi` (bench/launch.py takes a mechanism out first)
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = str(workdir / "run" / "kleidi.sock")
        self.config = {"listen": f"unix://{self.socket}", "metrics_listen": f"127.0.0.1:{free_port()}", **config}
        self.config_file = workdir / "kleidi.yaml"
        self.log_file = workdir / "kleidi.log"
        self.env = {**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def write_config(self, **changes: Any) -> None:
        self.config.update(changes)
        self.config_file.write_text(json.dumps(self.config, indent=2))

    def start(self, wait: bool = True, extra_args: tuple[str, ...] = ()) -> KleidiProcess:
        self.write_config()
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        log = self.log_file.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, *self.launcher, "serve", "--config", str(self.config_file), *extra_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=REPO,
        )
        log.close()
        if wait:
            wait_for(self._serving, 20, f"kleidi to serve on {self.socket}\n{self.log()}")
        return self

    def _serving(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"kleidi exited with {self.proc.returncode}:\n{self.log()}")
        if not os.path.exists(self.socket):
            return False
        try:
            with self.client(timeout=1.0) as kms:
                kms.status()
        except grpc.RpcError:
            return False
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def restart(self) -> KleidiProcess:
        self.stop()
        return self.start()

    def wait_exit(self, timeout: float = 20) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines of the current run."""
        text = self.log_file.read_bytes()[self._log_offset :].decode(errors="replace")
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def probe_port(self) -> int | None:
        listen = str(self.config.get("metrics_listen") or "")
        return int(listen.rsplit(":", 1)[1]) if listen else None

    def http(self, path: str) -> tuple[int, str]:
        port = self.probe_port()
        assert port is not None, "probe server is not up"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def metrics(self) -> dict[str, float]:
        """Every sample on /metrics, by name and labels as written there (labels sorted by name)."""
        status, text = self.http("/metrics")
        assert status == 200
        samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        return {sample: float(value) for sample, value in samples}

    def healthz(self) -> tuple[int, str]:
        return self.http("/healthz")

    def wait_healthy(self, timeout: float = 20) -> None:
        wait_for(lambda: self.healthz()[0] == 200, timeout, f"healthz ok\n{self.log()[-3000:]}")

    def client(self, timeout: float = 3.0) -> KmsClient:
        return KmsClient(self.socket, timeout)

    def __enter__(self) -> KleidiProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
