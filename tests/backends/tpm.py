"""A software TPM behind tpm2-pkcs11, private to one test run.

`SoftwareTPM` starts, in a temporary directory:

- swtpm (TPM 2.0 emulator) on two consecutive free 127.0.0.1 ports (tests/ports.py) with a fresh state directory,
- a private dbus session bus (tpm2-abrmd registers on it; nothing touches the host's buses),
- tpm2-abrmd, the resource manager: without it the TPM runs out of object contexts (TPM_RC 0x902),
- a tpm2-pkcs11 store (sqlite) provisioned with `tpm2_ptool`: one token, an AES-256 key and an
  HMAC-SHA256 key with the caller's labels.

It exposes what a kleidi process needs: `env` (TCTI, store and bus variables), `module`, `token_label`
and `pin_file` (mode 0600). The PIN is passed in argv only to the short-lived `tpm2_ptool` provisioning
commands, never to a long-running process, and it never appears in error messages.

`stop_tpm()` / `start_tpm()` take the TPM side (swtpm and abrmd) away and bring it back on the same
state, for outage tests; the store and the dbus bus stay. `close()` stops everything, and is safe to call
after a partial start or a failing test.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from tests.backends.process import die_with_parent, stop_process
from tests.ports import free_port_pair

MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so"
TCTI = "tabrmd:bus_type=session"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


class TPMFixtureError(RuntimeError):
    pass


class SoftwareTPM:
    """swtpm + dbus + tpm2-abrmd + a tpm2-pkcs11 token, as a context manager."""

    module = MODULE

    def __init__(
        self,
        *,
        token_label: str = "kleidi-tpm",
        aes_key_label: str = "kleidi-kek-1",
        hmac_key_label: str = "kleidi-mac-1",
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.token_label = token_label
        self.aes_key_label = aes_key_label
        self.hmac_key_label = hmac_key_label
        self._own_dir = base_dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="kleidi-tpm-") if base_dir is None else base_dir)
        self.state_dir = self.dir / "tpm-state"
        self.store_dir = self.dir / "store"
        self.log_dir = self.dir / "logs"
        self.pin_file = self.dir / "pin"
        self.pin = secrets.token_hex(16)
        self._so_pin = secrets.token_hex(16)
        self.port = 0
        self.dbus_address = ""
        self.primary_id = ""
        self._swtpm: subprocess.Popen[bytes] | None = None
        self._abrmd: subprocess.Popen[bytes] | None = None
        self._dbus: subprocess.Popen[bytes] | None = None
        self._logs: list[IO[bytes]] = []
        self._bus_dir: Path | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start everything and provision the token with the AES and HMAC keys."""
        for path in (self.state_dir, self.store_dir, self.log_dir):
            path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(self.pin)
        os.chmod(self.pin_file, 0o600)
        self._start_dbus()
        self.start_tpm()
        self._provision()

    def close(self) -> None:
        """Stop every process this fixture started and remove its directory (if it created it)."""
        try:
            self.stop_tpm()
        finally:
            stop_process(self._dbus, STOP_TIMEOUT)
            self._dbus = None
            for handle in self._logs:
                handle.close()
            self._logs.clear()
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
            if self._bus_dir is not None:
                shutil.rmtree(self._bus_dir, ignore_errors=True)
                self._bus_dir = None

    def stop_tpm(self) -> None:
        """Take the TPM away: stop tpm2-abrmd and swtpm. State, store and dbus stay."""
        try:
            stop_process(self._abrmd, STOP_TIMEOUT)
        finally:
            self._abrmd = None
            stop_process(self._swtpm, STOP_TIMEOUT)
            self._swtpm = None

    def start_tpm(self) -> None:
        """Start swtpm and tpm2-abrmd on the current state directory and wait until the TPM answers."""
        if self._swtpm is not None or self._abrmd is not None:
            raise TPMFixtureError("the TPM side is already running")
        if not self.dbus_address:
            raise TPMFixtureError("start() first: the dbus session bus is not running")
        self._start_swtpm()
        try:
            self._start_abrmd()
        except BaseException:
            self.stop_tpm()
            raise

    @property
    def tpm_running(self) -> bool:
        return all(p is not None and p.poll() is None for p in (self._swtpm, self._abrmd))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in (self._swtpm, self._abrmd, self._dbus) if p is not None and p.poll() is None]

    # -- what a kleidi process (or PyKCS11 in this process) needs ------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """Variables for a process that loads libtpm2_pkcs11.so against this TPM."""
        return {
            "DBUS_SESSION_BUS_ADDRESS": self.dbus_address,
            "TPM2_PKCS11_TCTI": TCTI,
            "TPM2TOOLS_TCTI": TCTI,
            "TPM2_PKCS11_STORE": str(self.store_dir),
            # 0 = errors only; the library logs to stderr.
            "TPM2_PKCS11_LOG_LEVEL": "0",
            # tpm2-tss logs TCTI connection failures at ERROR; they are expected during outage tests.
            "TSS2_LOG": "all+NONE",
        }

    @contextlib.contextmanager
    def environ(self) -> Iterator[None]:
        """Temporarily put `env` into this process's environment (for PyKCS11 in the test process).

        tpm2-pkcs11 reads the variables at C_Initialize, so load the module inside this block."""
        saved = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def pkcs11_config(self, **overrides: object) -> dict[str, object]:
        """The `pkcs11:` section of a kleidi config for this token (mechanism aes-cbc-hmac)."""
        section: dict[str, object] = {
            "module": self.module,
            "token_label": self.token_label,
            "pin_file": str(self.pin_file),
            "key_label": self.aes_key_label,
            "hmac_key_label": self.hmac_key_label,
            "mechanism": "aes-cbc-hmac",
        }
        section.update(overrides)
        return section

    # -- keys ----------------------------------------------------------------------------------------

    def add_aes_key(self, label: str) -> None:
        """Generate another AES-256 key in the TPM and store it in the token (for rotation tests)."""
        self._addkey(label, "aes256")

    def add_hmac_key(self, label: str) -> None:
        """Generate another HMAC-SHA256 key in the TPM and store it in the token."""
        self._addkey(label, "hmac:sha256")

    def import_aes_key(self, label: str, material: bytes) -> None:
        """Import existing AES-256 key material (the multi-node pattern): `tpm2_import` under the token's
        primary object, then `tpm2_ptool link`. tpm2_ptool's own `import` takes only RSA, EC and HMAC keys."""
        if len(material) != 32:
            raise ValueError("AES-256 key material is 32 bytes")
        with self._secret_file(material) as key_file:
            pub, priv = key_file.with_suffix(".pub"), key_file.with_suffix(".priv")
            try:
                self._run(
                    "tpm2_import", "-C", self.primary_handle(), "-G", "aes", "-i", str(key_file),
                    "-u", str(pub), "-r", str(priv),
                )  # fmt: skip
                self._ptool("link", f"--label={self.token_label}", f"--key-label={label}", f"--userpin={self.pin}",
                            str(pub), str(priv))  # fmt: skip
            finally:
                pub.unlink(missing_ok=True)
                priv.unlink(missing_ok=True)

    def import_hmac_key(self, label: str, material: bytes) -> None:
        """Import existing HMAC-SHA256 key material with `tpm2_ptool import --algorithm=hmac:sha256`."""
        with self._secret_file(material) as key_file:
            self._ptool(
                "import", f"--label={self.token_label}", f"--key-label={label}", f"--userpin={self.pin}",
                "--algorithm=hmac:sha256", f"--privkey={key_file}",
            )  # fmt: skip

    def primary_handle(self) -> str:
        """The persistent handle of the token's primary object (the parent of its keys), e.g. 0x81000001."""
        out = self._ptool("listprimaries")
        match = re.search(r"esys-tr:\s*([0-9a-f]{8})", out)
        if not match:
            raise TPMFixtureError("tpm2_ptool listprimaries shows no persistent primary object")
        return "0x" + match.group(1)

    def lockout_counter(self) -> int:
        """The TPM's dictionary-attack counter: every wrong PIN given to tpm2-pkcs11 increments it. swtpm locks
        all DA-protected objects (every token's keys) after 3 failures, for 1000 s."""
        out = self._run("tpm2_getcap", "properties-variable")
        match = re.search(r"TPM2_PT_LOCKOUT_COUNTER:\s*(0x[0-9a-fA-F]+)", out)
        if not match:
            raise TPMFixtureError("tpm2_getcap shows no TPM2_PT_LOCKOUT_COUNTER")
        return int(match.group(1), 16)

    def clear_lockout(self) -> None:
        """Reset the dictionary-attack counter (lockout auth is empty on a fresh swtpm)."""
        self._run("tpm2_dictionarylockout", "--clear-lockout")

    def list_objects(self) -> str:
        return self._ptool("listobjects", "--label", self.token_label)

    # -- internals -----------------------------------------------------------------------------------

    def _log(self, name: str) -> IO[bytes]:
        handle = open(self.log_dir / name, "ab")  # noqa: SIM115 - closed in close()
        self._logs.append(handle)
        return handle

    def _tool_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        return env

    def _start_dbus(self) -> None:
        if self._dbus is not None:
            return
        # A unix socket path must fit in 108 bytes; a deep base_dir gets a short private directory instead.
        if len(str(self.dir)) > 60:
            self._bus_dir = Path(tempfile.mkdtemp(prefix="kleidi-bus-"))
        bus_dir = self._bus_dir or self.dir
        self._dbus = subprocess.Popen(
            [
                "dbus-daemon",
                "--session",
                "--nofork",
                "--nopidfile",
                "--print-address=1",
                f"--address=unix:dir={bus_dir}",
            ],
            preexec_fn=die_with_parent,  # noqa: PLW1509 - only calls prctl
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log("dbus.log"),
        )
        assert self._dbus.stdout is not None
        line = self._dbus.stdout.readline().decode().strip()
        if not line:
            raise TPMFixtureError(f"dbus-daemon did not print its address; see {self.log_dir / 'dbus.log'}")
        self.dbus_address = line

    def _start_swtpm(self) -> None:
        last_error = ""
        for attempt in range(6):
            # A restart tries the old ports first (abrmd is restarted too, so new ones are fine after that).
            port = self.port if self.port and attempt < 3 else free_port_pair()
            proc = subprocess.Popen(
                [
                    "swtpm",
                    "socket",
                    "--tpm2",
                    "--tpmstate",
                    f"dir={self.state_dir}",
                    "--server",
                    f"type=tcp,port={port},bindaddr=127.0.0.1",
                    "--ctrl",
                    f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                    "--flags",
                    "not-need-init,startup-clear",
                ],
                preexec_fn=die_with_parent,  # noqa: PLW1509 - only calls prctl
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._log("swtpm.log"),
            )
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        pass
                    with socket.create_connection(("127.0.0.1", port + 1), timeout=0.5):
                        pass
                except OSError:
                    time.sleep(0.05)
                    continue
                self._swtpm = proc
                self.port = port
                return
            stop_process(proc, STOP_TIMEOUT)
            last_error = f"swtpm did not listen on {port}/{port + 1} (exit {proc.returncode})"
            if port == self.port:
                # The old listening socket may linger briefly after a stop: wait, then retry.
                time.sleep(0.5)
        raise TPMFixtureError(f"{last_error}; see {self.log_dir / 'swtpm.log'}")

    def _start_abrmd(self) -> None:
        self._abrmd = subprocess.Popen(
            [
                "tpm2-abrmd",
                "--session",
                "--allow-root",
                "--flush-all",
                f"--tcti=swtpm:host=127.0.0.1,port={self.port}",
            ],
            preexec_fn=die_with_parent,  # noqa: PLW1509 - only calls prctl
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log("abrmd.log"),
            env=self._tool_env(),
        )
        # Ready when a TPM command goes through abrmd; tpm2_getrandom is the cheapest one.
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._abrmd.poll() is not None:
                raise TPMFixtureError(
                    f"tpm2-abrmd exited with {self._abrmd.returncode}; see {self.log_dir / 'abrmd.log'}"
                )
            probe = subprocess.run(
                ["tpm2_getrandom", "8"],
                env=self._tool_env(),
                capture_output=True,
                check=False,
                timeout=10,
            )
            if probe.returncode == 0:
                return
            time.sleep(0.1)
        raise TPMFixtureError(f"tpm2-abrmd did not answer within {START_TIMEOUT}s; see {self.log_dir / 'abrmd.log'}")

    @contextlib.contextmanager
    def _secret_file(self, material: bytes) -> Iterator[Path]:
        fd, name = tempfile.mkstemp(dir=self.dir, suffix=".key")
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(material)
            yield path
        finally:
            path.unlink(missing_ok=True)

    def _run(self, *command: str) -> str:
        result = subprocess.run(command, env=self._tool_env(), capture_output=True, check=False, timeout=60)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise TPMFixtureError(f"{command[0]} failed ({result.returncode}): {output.strip()[-2000:]}")
        return result.stdout.decode(errors="replace")

    def _ptool(self, *args: str) -> str:
        command = ["tpm2_ptool", *args, f"--path={self.store_dir}"]
        result = subprocess.run(command, env=self._tool_env(), capture_output=True, check=False, timeout=120)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            for secret in (self.pin, self._so_pin):
                output = output.replace(secret, "<redacted>")
            raise TPMFixtureError(f"tpm2_ptool {args[0]} failed ({result.returncode}): {output.strip()[-2000:]}")
        return result.stdout.decode(errors="replace")

    def _provision(self) -> None:
        out = self._ptool("init")
        match = re.search(r"id:\s*(\d+)", out)
        if not match:
            raise TPMFixtureError(f"tpm2_ptool init printed no primary object id: {out.strip()}")
        self.primary_id = match.group(1)
        self._ptool(
            "addtoken",
            f"--pid={self.primary_id}",
            f"--label={self.token_label}",
            f"--userpin={self.pin}",
            f"--sopin={self._so_pin}",
        )
        self.add_aes_key(self.aes_key_label)
        self.add_hmac_key(self.hmac_key_label)

    def _addkey(self, label: str, algorithm: str) -> None:
        self._ptool(
            "addkey",
            f"--label={self.token_label}",
            f"--key-label={label}",
            f"--userpin={self.pin}",
            f"--algorithm={algorithm}",
        )


def software_tpm_env(tpm: SoftwareTPM, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) plus the TPM variables."""
    env = dict(os.environ if base is None else base)
    env.update(tpm.env)
    return env
