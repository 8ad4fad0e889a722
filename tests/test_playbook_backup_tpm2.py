"""playbooks/backup.yml and playbooks/restore.yml with the TPM2 backend, against a software TPM (swtpm behind
tpm2-abrmd on a private session bus): the kleidi_tpm2 role's tpm2-pkcs11 store is backed up encrypted, lost,
restored onto the same TPM, and the restarted plugin decrypts data written before; a second restore changes
nothing; a restore onto another TPM is refused before anything is written."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ansible_run import PlayResult, local_inventory, run_playbook
from tests.backends.tpm import SoftwareTPM
from tests.plugin import KleidiProcess
from tests.test_playbook_backup import Kubelet, listing, open_backup, says

pytestmark = pytest.mark.integration

PIN = "pin-" + secrets.token_hex(8)
SO_PIN = "so-" + secrets.token_hex(8)
PASSPHRASE = "backup-" + secrets.token_hex(12)
TCTI = "tabrmd:bus_type=session"
STORE = "var/lib/kleidi/tpm2"
SOCKET = "/run/kleidi/kleidi.sock"
MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so"


@dataclass
class Node:
    base: Path
    tpm: SoftwareTPM
    kubelet: Kubelet | None = None
    wrapped: list[Any] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.base / "cp-1"

    def inventory(self, tpm: SoftwareTPM | None = None) -> Path:
        (self.root / "etc").mkdir(parents=True, exist_ok=True)
        node = {
            "ansible_python_interpreter": "/usr/bin/python3",
            "kleidi_node_root": str(self.root),
            "kleidi_backend_role": "kleidi_tpm2",
            "kleidi_tpm2_tcti": TCTI,
            "kleidi_tpm2_env": {"DBUS_SESSION_BUS_ADDRESS": (tpm or self.tpm).dbus_address},
        }
        return local_inventory(self.base / "hosts.yml", {"cp-1": node})

    def run(self, playbook: str, *args: str, tpm: SoftwareTPM | None = None) -> PlayResult:
        extra = {"kleidi_tpm2_pin": PIN, "kleidi_tpm2_so_pin": SO_PIN, "kleidi_backup_passphrase": PASSPHRASE}
        result = run_playbook(playbook, self.inventory(tpm), "-v", *args, extra_vars=extra)
        for secret in (PIN, SO_PIN, PASSPHRASE):
            assert secret not in result.output, "a secret shows in ansible-playbook's output"
        return result

    def install_plugin(self) -> Kubelet:
        """kleidi.yaml naming the socket, the kleidi command in the node's /opt/kleidi, a plugin on the socket."""
        settings = {
            "module": MODULE,
            "token_label": "kleidi-tpm",
            "pin_file": "/etc/kleidi/pin",
            "key_label": "kleidi-kek-1",
            "hmac_key_label": "kleidi-mac-1",
            "mechanism": "aes-cbc-hmac",
            "pool_size": 2,
        }
        node_config = {"listen": "unix://" + SOCKET, "provider": "pkcs11", "pkcs11": settings}
        (self.root / "etc/kleidi/kleidi.yaml").write_text(yaml.safe_dump(node_config))
        venv_bin = self.root / "opt/kleidi/bin"
        venv_bin.mkdir(parents=True, exist_ok=True)
        (venv_bin / "kleidi").symlink_to(Path(sys.executable).with_name("kleidi"))
        (self.root / "run/kleidi").mkdir(parents=True, exist_ok=True)
        config = {
            "provider": "pkcs11",
            "health_interval": "1s",
            "listen": f"unix://{self.root}{SOCKET}",
            "pkcs11": {**settings, "pin_file": f"{self.root}/etc/kleidi/pin"},
        }
        env = {
            **os.environ,
            "DBUS_SESSION_BUS_ADDRESS": self.tpm.dbus_address,
            "TPM2_PKCS11_TCTI": TCTI,
            "TPM2_PKCS11_STORE": f"{self.root}/{STORE}",
            "TSS2_LOG": "all+NONE",
        }
        plugin = KleidiProcess(self.base / "plugin", config, env=env)
        plugin.socket = f"{self.root}{SOCKET}"
        self.kubelet = Kubelet(plugin).start()
        return self.kubelet


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    """cp-1 after the kleidi_tpm2 role, with its plugin serving, and data encrypted through it."""
    base = Path(tempfile.mkdtemp(prefix="kbtpm-"))
    base.chmod(0o755)
    with SoftwareTPM() as tpm:
        made = Node(base, tpm)
        try:
            made.run("tests/playbooks/kleidi_tpm2.yml").assert_ok()
            kubelet = made.install_plugin()
            kubelet.wait_serving()
            with kubelet.plugin.client() as kms:
                made.wrapped.append(kms.encrypt(b"seed-written-before-the-tpm2-backup", uid="before"))
            yield made
        finally:
            if made.kubelet is not None:
                made.kubelet.stop()
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def backup(node: Node) -> tuple[PlayResult, Path]:
    result = node.run("playbooks/backup.yml").assert_ok()
    [file] = sorted((node.base / ".kleidi-state" / "backups").glob("*-tpm2.tar.enc"))
    return result, file


def test_the_store_is_backed_up_encrypted(node: Node, backup: tuple[PlayResult, Path]) -> None:
    result, file = backup
    blob = file.read_bytes()
    assert b"SQLite format 3" not in blob and b"kleidi-mac-1\x00" not in blob
    header, files = open_backup(blob, PASSPHRASE)
    assert list(files) == ["tpm2_pkcs11.sqlite3"]
    restored_db = node.base / "opened.sqlite3"
    restored_db.write_bytes(files["tpm2_pkcs11.sqlite3"])
    with sqlite3.connect(restored_db) as db:
        assert db.execute("select count(*) from tobjects").fetchone()[0] >= 2
    manifest = json.loads(file.with_name(file.name.removesuffix(".tar.enc") + ".json").read_text())
    assert manifest["meta"]["identity"]["primary_handle"].startswith("0x81")
    assert manifest["meta"]["identity"] == header["meta"]["identity"]
    assert manifest["meta"]["labels"] == ["kleidi-kek-1", "kleidi-mac-1"]
    assert manifest["node"] == "cp-1" and manifest["backend"] == "tpm2"
    says(result, "Backed up cp-1's tpm2 store")


@pytest.fixture(scope="module")
def restored(node: Node, backup: tuple[PlayResult, Path]) -> PlayResult:
    """The node loses its store's database (its plugin keeps running on what it had); restore.yml."""
    (node.root / STORE / "tpm2_pkcs11.sqlite3").unlink()
    assert node.kubelet is not None
    node.kubelet.pid_before = node.kubelet.pid
    return node.run("playbooks/restore.yml")


def test_a_lost_store_is_restored_onto_its_tpm_and_decrypts_data_written_before(
    node: Node, backup: tuple[PlayResult, Path], restored: PlayResult
) -> None:
    restored.assert_ok()
    says(restored, "cp-1: restored from " + backup[1].name)
    says(restored, "every control-plane node uses key_id pkcs11:aes-cbc-hmac:kleidi-kek-1")
    assert node.kubelet is not None
    assert node.kubelet.pid != node.kubelet.pid_before, "the plugin was not restarted on the restored store"
    database = node.root / STORE / "tpm2_pkcs11.sqlite3"
    assert (database.stat().st_uid, database.stat().st_mode & 0o777) == (10001, 0o600)
    node.kubelet.wait_serving()
    wrapped = node.wrapped[0]
    with node.kubelet.plugin.client(timeout=10) as kms:
        assert kms.decrypt(wrapped.ciphertext, wrapped.key_id, wrapped.annotations) == (
            b"seed-written-before-the-tpm2-backup"
        )


def test_a_second_restore_changes_nothing(node: Node, restored: PlayResult) -> None:
    before = listing(node.root / STORE)
    result = node.run("playbooks/restore.yml").assert_unchanged()
    says(result, "cp-1: its store already matches")
    assert listing(node.root / STORE) == before


def test_a_restore_onto_another_tpm_is_refused_and_writes_nothing(node: Node, restored: PlayResult) -> None:
    store = node.root / STORE
    moved = node.base / "kept.sqlite3"
    shutil.move(store / "tpm2_pkcs11.sqlite3", moved)
    try:
        before = listing(store)
        with SoftwareTPM() as other:
            result = node.run("playbooks/restore.yml", tpm=other)
        assert result.returncode != 0
        says(result, "a tpm2-pkcs11 store restores only onto the TPM it was made in")
        assert listing(store) == before
    finally:
        shutil.move(moved, store / "tpm2_pkcs11.sqlite3")
