"""The tpm2 role, run for real against a software TPM (swtpm behind tpm2-abrmd on a private session bus).

The role makes the store, the token and its AES and HMAC keys on one node; a real `kleidi serve` with the fact's
settings is healthy and round trips; a second run changes nothing; a control plane of two nodes is refused with
a pointer to proxy mode; and no PIN, nor any authorisation value tpm2_ptool derives from one, is ever in a
process's arguments or in a -vvv run's output."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ansible_run import PlayResult, local_inventory, run_playbook
from tests.backends.tpm import SoftwareTPM
from tests.plugin import KleidiProcess

pytestmark = pytest.mark.integration

PLAYBOOK = "tests/playbooks/kleidi_tpm2.yml"
PIN = "pin-" + secrets.token_hex(8)
SO_PIN = "so-" + secrets.token_hex(8)
TCTI = "tabrmd:bus_type=session"
# Where tpm2-tools take their own argument as an auth value from, rather than the value itself.
AUTH_SOURCES = (b"file:", b"session:", b"pcr:")


class CmdlineWatch(threading.Thread):
    """Reads every process's /proc/<pid>/cmdline in a loop while a play runs, and keeps what would leak: a PIN
    anywhere, or an auth value given inline to a tpm2-tools command (tpm2_ptool derives those from the PINs)."""

    def __init__(self, *secret_values: str) -> None:
        super().__init__(daemon=True)
        self.secrets = [value.encode() for value in secret_values]
        self.leaks: list[str] = []
        self.seen_ptool = 0
        self.seen_tpm2_tools = 0
        self._done = threading.Event()

    def run(self) -> None:
        own = str(os.getpid())
        while not self._done.is_set():  # one pass costs about 3 ms of CPU here
            for name in os.listdir("/proc"):
                if not name.isdigit() or name == own:
                    continue
                if not _descends_from(name, own):  # another test run on this machine is not this play
                    continue
                try:
                    with open(f"/proc/{name}/cmdline", "rb") as handle:
                        raw = handle.read()
                except OSError:
                    continue
                self._check(raw.rstrip(b"\0").split(b"\0"))
            time.sleep(0.01)

    def _check(self, argv: list[bytes]) -> None:
        if not argv or not argv[0]:
            return
        shown = b" ".join(argv)[:300].decode(errors="replace")
        if any(secret in arg for secret in self.secrets for arg in argv):
            self.leaks.append(f"a PIN in: {shown}")
        if os.path.basename(argv[0]).startswith(b"tpm2_"):
            self.seen_tpm2_tools += 1
            for option, value in itertools.pairwise(argv):
                if option in (b"-p", b"-P") and value and not value.startswith(AUTH_SOURCES):
                    self.leaks.append(f"an inline auth value in: {shown}")
        if len(argv) > 2 and argv[1] == b"-c" and b"tpm2_pkcs11.tpm2_ptool" in argv[2]:
            self.seen_ptool += 1

    def stop(self) -> None:
        self._done.set()
        self.join(10)


def _descends_from(pid: str, ancestor: str) -> bool:
    """Whether process ``pid`` is ``ancestor``'s child, grandchild, ... (the play and everything it runs)."""
    while pid not in ("0", "1"):
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            return False
        pid = stat.rsplit(b")", 1)[1].split()[1].decode()  # the field after the state: the parent pid
        if pid == ancestor:
            return True
    return False


@pytest.fixture(scope="module")
def tpm() -> Iterator[SoftwareTPM]:
    """swtpm + tpm2-abrmd; the fixture's own token in its own store shares the TPM with the role's."""
    with SoftwareTPM() as software_tpm:
        yield software_tpm


class Node:
    def __init__(self, base: Path, tpm: SoftwareTPM) -> None:
        self.base, self.tpm = base, tpm
        self.root = base / "cp-1"
        self.check_run: PlayResult | None = None
        self.check_wrote: list[str] = []
        self.first_run: PlayResult | None = None
        self.watch = CmdlineWatch(PIN, SO_PIN)

    def run(self, *hosts: str, args: tuple[str, ...] = ("-v",), facts: bool = True) -> PlayResult:
        node = {
            "ansible_python_interpreter": "/usr/bin/python3",  # the node's system Python, as on a real node
            "kleidi_tpm2_tcti": TCTI,
            "kleidi_tpm2_env": {"DBUS_SESSION_BUS_ADDRESS": self.tpm.dbus_address},
        }
        for host in hosts:
            (self.base / host / "etc").mkdir(parents=True, exist_ok=True)  # a node always has /etc
        inventory = local_inventory(
            self.base / "hosts.yml", {h: {**node, "kleidi_node_root": str(self.base / h)} for h in hosts}
        )
        extra: dict[str, Any] = {"kleidi_tpm2_pin": PIN, "kleidi_tpm2_so_pin": SO_PIN}
        if facts:
            extra["kleidi_test_fact_dir"] = str(self.base)
        result = run_playbook(PLAYBOOK, inventory, *args, extra_vars=extra)
        for secret in (PIN, SO_PIN):
            assert secret not in result.output, "a PIN shows in ansible-playbook's output"
        return result

    def fact(self) -> dict[str, Any]:
        """The kleidi_tpm2_backend fact the role set, which playbooks/site.yml hands to kleidi_plugin."""
        [(host, fact)] = json.loads((self.base / "facts.json").read_text())
        assert host == "cp-1"
        return dict(fact)

    def plugin(self) -> KleidiProcess:
        """A real `kleidi serve` for the node: the fact's settings and env with the node root added to paths."""
        fact, root = self.fact(), str(self.root)
        settings = {**fact["settings"], "pin_file": root + fact["settings"]["pin_file"]}
        env = {**os.environ, **fact["env"], "TPM2_PKCS11_STORE": root + fact["env"]["TPM2_PKCS11_STORE"]}
        env["TSS2_LOG"] = "all+NONE"
        config = {"provider": fact["provider"], "health_interval": "1s", fact["provider"]: settings}
        return KleidiProcess(self.base / "k", config, env=env)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tpm: SoftwareTPM) -> Node:
    """A fresh node after a --check run (node.check_run), then the first real run (node.first_run) under -vvv
    while every process's command line is watched (node.watch)."""
    fresh = Node(tmp_path_factory.mktemp("tpm"), tpm)
    fresh.check_run = fresh.run("cp-1", args=("--check", "-v"), facts=False)
    fresh.check_wrote = sorted(str(p) for p in fresh.root.rglob("*"))
    fresh.watch.start()
    try:
        fresh.first_run = fresh.run("cp-1", args=("-vvv",))
    finally:
        fresh.watch.stop()
    fresh.first_run.assert_ok()
    return fresh


def test_check_mode_on_a_fresh_node_writes_nothing(node: Node) -> None:
    assert node.check_run is not None
    node.check_run.assert_ok()
    assert node.check_wrote == [str(node.root / "etc")]
    assert node.check_run.changed()["cp-1"] > 0, "check mode should show the changes it would make"


def test_the_role_makes_the_token_and_both_keys(node: Node) -> None:
    store = node.root / "var/lib/kleidi/tpm2"
    assert (store / "tpm2_pkcs11.sqlite3").is_file()
    for path in [store, *store.rglob("*")]:
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (10001, 10001), path
        assert info.st_mode & 0o077 == 0, path
    pin_file = node.root / "etc/kleidi/pin"
    assert pin_file.read_text() == PIN + "\n"
    assert (pin_file.stat().st_mode & 0o777, pin_file.stat().st_uid) == (0o600, 10001)


def test_the_fact_names_node_paths_only(node: Node) -> None:
    assert node.fact() == {
        "provider": "pkcs11",
        "settings": {
            "module": "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
            "token_label": "kleidi-tpm",
            "pin_file": "/etc/kleidi/pin",
            "key_label": "kleidi-kek-1",
            "hmac_key_label": "kleidi-mac-1",
            "mechanism": "aes-cbc-hmac",
            "pool_size": 2,
        },
        "env": {
            "DBUS_SESSION_BUS_ADDRESS": node.tpm.dbus_address,
            "TPM2_PKCS11_STORE": "/var/lib/kleidi/tpm2",
            "TPM2_PKCS11_TCTI": TCTI,
        },
        # A session bus has no fixed socket to mount, and there is no device: only the store, no device group.
        "volumes": [{"name": "tpm2-store", "path": "/var/lib/kleidi/tpm2", "type": "Directory", "readOnly": False}],
        "groups": [],
    }


def test_no_pin_or_derived_auth_is_ever_in_a_process_arguments(node: Node) -> None:
    assert not node.watch.leaks, "\n".join(node.watch.leaks[:10])
    assert node.watch.seen_ptool > 0, "the watch never saw tpm2_ptool run: it proves nothing"
    # -vvv prints each module's command line and environment (checked for the PINs by Node.run); the in-process
    # tpm2_ptool is there, so the output shows how the role builds its commands.
    assert node.first_run is not None and "tpm2_pkcs11.tpm2_ptool" in node.first_run.output


def test_second_run_changes_nothing(node: Node) -> None:
    node.run("cp-1", facts=False).assert_unchanged()


def test_kleidi_serves_with_the_fact_settings(node: Node) -> None:
    with node.plugin().start() as plugin, plugin.client(timeout=10) as kms:
        plugin.wait_healthy()
        status = kms.status()
        assert status.healthz == "ok"
        assert status.key_id.startswith("pkcs11:aes-cbc-hmac:kleidi-kek-1+kleidi-mac-1:")
        data_key = secrets.token_bytes(32)
        wrapped = kms.encrypt(data_key, uid="role-test")
        assert wrapped.key_id == status.key_id
        assert kms.decrypt(wrapped.ciphertext, wrapped.key_id, wrapped.annotations) == data_key


def test_two_control_plane_nodes_are_refused(tmp_path_factory: pytest.TempPathFactory, tpm: SoftwareTPM) -> None:
    node = Node(tmp_path_factory.mktemp("tpm2n"), tpm)
    result = node.run("cp-1", "cp-2", facts=False)
    assert result.returncode != 0
    assert "proxy mode" in result.output and "docs/tpm.md" in result.output
    assert "cp-1, cp-2 would use it" in result.output.replace("\n", " ").replace("  ", " ")
    wrote = [p for host in ("cp-1", "cp-2") for p in (node.base / host).rglob("*") if p.name != "etc"]
    assert not wrote, "refused, yet it wrote to a node"
