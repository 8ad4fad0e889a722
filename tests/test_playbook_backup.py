"""playbooks/backup.yml and playbooks/restore.yml, run for real on simulated control-plane nodes (one node root each
under a temp dir) whose SoftHSM2 token the kleidi_softhsm role made and copied, each with a real `kleidi serve` on
its socket, kept running the way the kubelet keeps a static pod (started again whenever it exits).

The backup is encrypted on the node: its bytes hold none of the token's files and no secret, and it opens with
standard AES-256-GCM and scrypt. A node whose token directory is deleted is restored from it, its plugin restarted,
and it decrypts data written before; a second restore changes nothing; a wrong passphrase, a tampered file and a
healthy store that differs are refused with a clear message and nothing written. After a rotation, the backup taken
before it (which lacks the KEK in force) is refused, in check mode too, with nothing written; a backup taken since
restores, and kleidi_backup_restore_allow_older lets the older one through with a warning. No secret is in any
process's arguments, in the playbooks' commands, or in a -vvv run's output."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import struct
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.ansible_run import PlayResult, local_inventory, run_playbook
from tests.plugin import REPO, KleidiProcess
from tests.test_role_tpm2 import CmdlineWatch

pytestmark = pytest.mark.integration

PIN = "pin-" + secrets.token_hex(8)
SO_PIN = "so-" + secrets.token_hex(8)
PASSPHRASE = "backup-" + secrets.token_hex(12)
SECRETS = (PIN, SO_PIN, PASSPHRASE)
TOKENS = "var/lib/kleidi/softhsm/tokens"
SOCKET = "/run/kleidi/kleidi.sock"


class Kubelet:
    """Keeps one plugin running as the kubelet keeps a static pod with restartPolicy Always: when the process exits
    (as restore.yml makes it, to open the restored store), a new one is started on the same config."""

    def __init__(self, plugin: KleidiProcess) -> None:
        self.plugin = plugin
        self.starts = 0
        self.pid_before = 0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> Kubelet:
        self.plugin.start()
        self.starts = 1
        self._thread.start()
        return self

    @property
    def pid(self) -> int:
        assert self.plugin.proc is not None
        return self.plugin.proc.pid

    def _watch(self) -> None:
        while not self._done.wait(0.2):
            with self._lock:
                proc = self.plugin.proc
                if proc is not None and proc.poll() is not None and not self._done.is_set():
                    self.plugin.start(wait=False)
                    self.starts += 1

    def wait_serving(self, timeout: float = 30) -> None:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            try:
                with self.plugin.client(timeout=1.0) as kms:
                    if kms.status().healthz == "ok":
                        return
            except grpc.RpcError:  # a plugin being restarted refuses connections for a moment
                pass
            time.sleep(0.2)
        raise AssertionError(f"the plugin did not come back healthy:\n{self.plugin.log()[-3000:]}")

    def stop(self) -> None:
        self._done.set()
        self._thread.join(5)
        with self._lock:
            self.plugin.stop()


def says(result: PlayResult, text: str) -> None:
    """The play's output says text, however the callback wrapped and quoted its YAML lines."""
    assert text in " ".join(result.output.replace("''", "'").split()), f"not said: {text}\n{result.output[-5000:]}"


def listing(root: Path) -> list[str]:
    """Every path under root with owner, mode and a digest of its content, for before/after comparisons. Left out:
    lock files, which SoftHSM2 makes beside the objects whoever reads the token opens, and token.object's content,
    where SoftHSM2 counts each login (the role logs in to list the keys, as the plugin does whenever it starts)."""
    found = []
    for path in sorted([root, *root.rglob("*")]) if root.exists() else []:
        if path.suffix == ".lock":
            continue
        info = path.lstat()
        read = path.is_file() and path.name != "token.object"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if read else "-"
        found.append(f"{path} {info.st_uid}:{info.st_gid} {info.st_mode:o} {digest}")
    return found


def open_backup(blob: bytes, passphrase: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Decrypt a backup file with nothing but its documented format: scrypt from hashlib, AES-256-GCM from the
    cryptography package (not the role's own code). Returns the header and the tar's files."""
    assert blob[:8] == b"KLDIBAK1"
    (size,) = struct.unpack(">I", blob[8:12])
    header = json.loads(blob[12 : 12 + size])
    kdf = header["kdf"]
    assert (header["cipher"], kdf["name"]) == ("aes-256-gcm", "scrypt")
    derived = hashlib.scrypt(
        passphrase.encode(),
        salt=base64.b64decode(kdf["salt"]),
        n=kdf["n"],
        r=kdf["r"],
        p=kdf["p"],
        maxmem=256 << 20,
        dklen=64,
    )
    plain = AESGCM(derived[:32]).decrypt(base64.b64decode(header["nonce"]), blob[12 + size :], blob[: 12 + size])
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    return header, files


@dataclass
class Cluster:
    """Simulated control-plane nodes, the inventories that name them, and their plugins."""

    base: Path
    kubelets: dict[str, Kubelet] = field(default_factory=dict)

    def root(self, host: str) -> Path:
        return self.base / host

    def inventory(self, *hosts: str) -> Path:
        per_host = {}
        for host in hosts:
            (self.root(host) / "etc").mkdir(parents=True, exist_ok=True)  # a node always has /etc
            per_host[host] = {
                "ansible_python_interpreter": "/usr/bin/python3",
                "kleidi_node_root": str(self.root(host)),
            }
        return local_inventory(self.base / ("hosts-" + "-".join(hosts) + ".yml"), per_host)

    def run(
        self, playbook: str, *hosts: str, args: tuple[str, ...] = ("-v",), passphrase: str = PASSPHRASE
    ) -> PlayResult:
        extra = {"kleidi_softhsm_pin": PIN, "kleidi_softhsm_so_pin": SO_PIN, "kleidi_backup_passphrase": passphrase}
        result = run_playbook(playbook, self.inventory(*hosts), *args, extra_vars=extra, env={"TMPDIR": str(self.tmp)})
        for secret in SECRETS:
            assert secret not in result.output, "a secret shows in ansible-playbook's output"
        return result

    @property
    def tmp(self) -> Path:
        """The nodes' temp directory (TMPDIR): the playbooks' private copies go here, not to the /tmp that other
        tests' backups share at the same time."""
        return self.base / "tmp"

    @property
    def backups(self) -> Path:
        return self.base / ".kleidi-state" / "backups"

    def token_dir(self, host: str) -> Path:
        [found] = [p for p in (self.root(host) / TOKENS).iterdir() if p.is_dir()]
        return found

    def install_plugin(self, host: str) -> Kubelet:
        """What site.yml leaves for the plugin on the node: kleidi.yaml naming the socket, the kleidi command in
        the node's /opt/kleidi (the test's own, as a link), and a plugin serving the node's socket."""
        root = self.root(host)
        settings = {
            "module": "/usr/lib/softhsm/libsofthsm2.so",
            "token_label": "kleidi",
            "pin_file": "/etc/kleidi/pin",
            "key_label": "kleidi-kek-1",
            "mechanism": "aes-gcm",
        }
        node_config = {"listen": "unix://" + SOCKET, "provider": "pkcs11", "pkcs11": settings}
        (root / "etc/kleidi/kleidi.yaml").write_text(yaml.safe_dump(node_config))
        venv_bin = root / "opt/kleidi/bin"
        venv_bin.mkdir(parents=True, exist_ok=True)
        (venv_bin / "kleidi").symlink_to(Path(sys.executable).with_name("kleidi"))
        (root / "run/kleidi").mkdir(parents=True, exist_ok=True)
        config = {
            "provider": "pkcs11",
            "health_interval": "1s",
            "listen": f"unix://{root}{SOCKET}",
            "pkcs11": {**settings, "pin_file": f"{root}/etc/kleidi/pin"},
        }
        env = {**os.environ, "SOFTHSM2_CONF": f"{root}/etc/kleidi/softhsm2.host.conf"}
        plugin = KleidiProcess(self.base / f"plugin-{host}", config, env=env)
        plugin.socket = f"{root}{SOCKET}"
        self.kubelets[host] = Kubelet(plugin).start()
        return self.kubelets[host]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Two nodes after the kleidi_softhsm role (one token, copied), each with its plugin serving. The node roots
    are open to every user on the way down, as /var/lib is on a node: the role reads a token as the plugin's user."""
    base = Path(tempfile.mkdtemp(prefix="kbtest-"))
    base.chmod(0o755)
    nodes = Cluster(base)
    nodes.tmp.mkdir(mode=0o1777)
    nodes.tmp.chmod(0o1777)  # as /tmp: the plugin's user makes its own private directories there too
    extra = {"kleidi_softhsm_pin": PIN, "kleidi_softhsm_so_pin": SO_PIN}
    run_playbook("tests/playbooks/kleidi_softhsm.yml", nodes.inventory("cp-1", "cp-2"), extra_vars=extra).assert_ok()
    try:
        for host in ("cp-1", "cp-2"):
            nodes.install_plugin(host)
        yield nodes
    finally:
        for kubelet in nodes.kubelets.values():
            kubelet.stop()
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Backup:
    result: PlayResult
    file: Path
    manifest: dict[str, Any]
    leaks: list[str]
    wrapped: Any  # data encrypted through cp-1's plugin before the backup


@pytest.fixture(scope="module")
def backup(cluster: Cluster) -> Backup:
    """backup.yml under -vvv, while every process's command line is watched for a secret."""
    with cluster.kubelets["cp-1"].plugin.client() as kms:
        wrapped = kms.encrypt(b"data-key-seed-written-before-the-backup", uid="before-backup")
    watch = CmdlineWatch(*SECRETS)
    watch.start()
    try:
        result = cluster.run("playbooks/backup.yml", "cp-1", "cp-2", args=("-vvv",))
    finally:
        watch.stop()
    result.assert_ok()
    [file] = sorted(cluster.backups.glob("*-softhsm.tar.enc"))
    manifest = json.loads(file.with_name(file.name.removesuffix(".tar.enc") + ".json").read_text())
    return Backup(result, file, manifest, watch.leaks, wrapped)


def test_the_backup_is_ciphertext_with_no_token_content_and_no_secret(cluster: Cluster, backup: Backup) -> None:
    blob = backup.file.read_bytes()
    token_files = [p for p in cluster.token_dir("cp-1").iterdir() if p.suffix == ".object"]
    assert token_files, "the token has no object files"
    for path in token_files:
        content = path.read_bytes()
        windows = {content[i : i + 24] for i in range(0, max(len(content) - 24, 1))}
        assert not any(window in blob for window in windows), f"{path.name} shows in the backup in clear"
    for secret in SECRETS:
        assert secret.encode() not in blob
    assert b"ustar" not in blob, "a tar header shows: the archive is not encrypted"


def test_the_backup_opens_with_standard_aes_gcm_and_scrypt_and_holds_the_token(
    cluster: Cluster, backup: Backup
) -> None:
    header, files = open_backup(backup.file.read_bytes(), PASSPHRASE)
    token = cluster.token_dir("cp-1")
    expected = {
        f"{token.name}/{p.name}": p.read_bytes() for p in token.iterdir() if p.is_file() and p.suffix != ".lock"
    }
    assert files == expected
    assert header["kdf"]["n"] >= 1 << 16
    assert header["meta"]["identity"] == {"serial": backup.manifest["meta"]["identity"]["serial"]}
    with pytest.raises(InvalidTag):
        open_backup(backup.file.read_bytes(), PASSPHRASE + "x")


def test_the_manifest_says_what_and_from_where_and_nothing_secret(cluster: Cluster, backup: Backup) -> None:
    manifest = backup.manifest
    serial = manifest["meta"]["identity"]["serial"]
    assert manifest["node"] == "cp-1" and manifest["nodes_in_agreement"] == ["cp-1", "cp-2"]
    assert manifest["meta"]["labels"] == ["kleidi-kek-1"]
    assert cluster.token_dir("cp-1").name.replace("-", "").endswith(serial)
    assert manifest["sha256"] == hashlib.sha256(backup.file.read_bytes()).hexdigest()
    assert re.fullmatch(r"\d{8}T\d{6}Z-softhsm\.tar\.enc", backup.file.name) and manifest["file"] == backup.file.name
    text = json.dumps(manifest)
    for secret in SECRETS:
        assert secret not in text
    says(backup.result, "Backed up cp-1's softhsm store")
    for path, mode in (
        (cluster.backups, 0o700),
        (backup.file, 0o600),
        (backup.file.with_suffix("").with_suffix(".json"), 0o600),
    ):
        assert path.stat().st_mode & 0o777 == mode, path
    assert f"{cluster.tmp}/kleidi-backup-" in backup.result.output, "the node's private copy was not where TMPDIR says"
    assert not list(cluster.tmp.glob("kleidi-backup-*")), "the node's private copy was left behind"


def test_no_secret_is_in_any_process_arguments(backup: Backup) -> None:
    assert not backup.leaks, "\n".join(backup.leaks[:10])


def test_secrets_reach_the_nodes_only_as_no_log_module_arguments() -> None:
    """Structure: a task of the role that names a secret passes it as one of the role's modules' no_log arguments,
    never in a command line, standard input, environment, vars or message; only a no_log assert may test it. Each
    of those modules declares the argument no_log, and gives pkcs11-tool the PIN by environment variable name."""
    role = REPO / "roles" / "kleidi_backup"
    secret_vars = ("kleidi_backup_passphrase", "kleidi_softhsm_pin", "kleidi_softhsm_so_pin", "kleidi_tpm2_pin")
    allowed = {("kleidi_backup_archive", "passphrase"), ("kleidi_backup_softhsm", "pin")}
    seen = set()

    def templated(value: object) -> bool:
        return any(re.search(r"\{\{[^}]*\b" + var + r"\b", json.dumps(value)) for var in secret_vars)

    def named(value: object) -> bool:
        return any(re.search(r"\b" + var + r"\b", json.dumps(value)) for var in secret_vars)

    def tasks(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for task in items:
            yield task
            for key in ("block", "rescue", "always"):
                yield from tasks(task.get(key) or [])

    for path in sorted((role / "tasks").glob("*.yml")):
        for task in tasks(yaml.safe_load(path.read_text()) or []):
            where = (path.name, task["name"])
            for key, value in task.items():
                if key in ("name", "block", "rescue", "always"):
                    continue
                if key in ("when", "failed_when", "changed_when", "until"):
                    assert not named(value), where
                elif isinstance(value, dict) and key not in ("vars", "environment"):
                    for param, arg in value.items():
                        if key == "ansible.builtin.assert" and param == "that":
                            assert not named(arg) or task.get("no_log") is True, where
                        elif templated(arg):
                            assert (key, param) in allowed, where
                            seen.add((key, param))
                else:
                    assert not templated(value), where
    assert seen == allowed, "the check saw none of the tasks it is about"
    for module, param in allowed:
        source = (role / "library" / f"{module}.py").read_text()
        assert re.search(rf'"{param}": \{{[^}}]*"no_log": True', source), (module, param)
    softhsm = (role / "library" / "kleidi_backup_softhsm.py").read_text()
    assert '"--pin",\n            "env:KLEIDI_SOFTHSM_PIN"' in softhsm


def test_check_mode_writes_nothing(cluster: Cluster, backup: Backup) -> None:
    before = listing(cluster.backups)
    cluster.run("playbooks/backup.yml", "cp-1", "cp-2", args=("--check",)).assert_ok()
    assert listing(cluster.backups) == before


@pytest.fixture(scope="module")
def restored(cluster: Cluster, backup: Backup) -> PlayResult:
    """cp-2 loses its whole token directory (its plugin keeps running on what it had); restore.yml --limit cp-2."""
    shutil.rmtree(cluster.root("cp-2") / TOKENS)
    cluster.kubelets["cp-2"].pid_before = cluster.kubelets["cp-2"].pid
    return cluster.run("playbooks/restore.yml", "cp-1", "cp-2", args=("--limit", "cp-2"))


def test_a_lost_token_directory_is_restored_and_decrypts_data_written_before(
    cluster: Cluster, backup: Backup, restored: PlayResult
) -> None:
    restored.assert_ok()
    says(restored, "cp-2: restored from " + backup.file.name)
    says(restored, "every control-plane node uses key_id pkcs11:aes-gcm:kleidi-kek-1:")
    kubelet = cluster.kubelets["cp-2"]
    assert kubelet.pid != kubelet.pid_before, "the plugin was not restarted on the restored token"
    tokens = cluster.root("cp-2") / TOKENS
    assert cluster.token_dir("cp-2").name == cluster.token_dir("cp-1").name
    # Lock files are made by whoever opens the token afterwards: here the test's plugin, which runs as root.
    for path in [tokens, *(p for p in tokens.rglob("*") if p.suffix != ".lock")]:
        info = path.stat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (10001, 10001, 0o700 if path.is_dir() else 0o600)
    kubelet.wait_serving()
    wrapped = backup.wrapped
    with kubelet.plugin.client() as kms:
        assert kms.decrypt(wrapped.ciphertext, wrapped.key_id, wrapped.annotations) == (
            b"data-key-seed-written-before-the-backup"
        )


def test_a_second_restore_changes_nothing(cluster: Cluster, backup: Backup, restored: PlayResult) -> None:
    pids = {host: kubelet.pid for host, kubelet in cluster.kubelets.items()}
    before = listing(cluster.root("cp-2") / TOKENS)
    result = cluster.run("playbooks/restore.yml", "cp-1", "cp-2").assert_unchanged()
    for host in ("cp-1", "cp-2"):
        says(result, f"{host}: its store already matches {backup.file.name}: left alone")
    assert {host: kubelet.pid for host, kubelet in cluster.kubelets.items()} == pids
    assert listing(cluster.root("cp-2") / TOKENS) == before


@pytest.fixture(scope="module")
def damaged(cluster: Cluster, restored: PlayResult) -> Path:
    """cp-2's token loses its token.object: the token no longer opens. Returns the token's directory."""
    restored.assert_ok()
    token = cluster.token_dir("cp-2")
    (token / "token.object").unlink()
    return token


def test_check_mode_shows_the_restore_and_writes_nothing(cluster: Cluster, damaged: Path) -> None:
    before = listing(cluster.root("cp-2"))
    result = cluster.run("playbooks/restore.yml", "cp-1", "cp-2", args=("--check", "--limit", "cp-2")).assert_ok()
    assert result.changed()["cp-2"] == 1
    says(result, "cp-2: would be restored from")
    assert listing(cluster.root("cp-2")) == before


def test_a_wrong_passphrase_fails_clearly_and_writes_nothing(cluster: Cluster, damaged: Path) -> None:
    before = listing(cluster.root("cp-2"))
    result = cluster.run("playbooks/restore.yml", "cp-1", "cp-2", args=("--limit", "cp-2"), passphrase="x" * 20)
    assert result.returncode != 0
    says(result, "kleidi_backup_passphrase does not open this backup")
    assert listing(cluster.root("cp-2")) == before


def test_a_tampered_backup_fails_its_integrity_check_and_writes_nothing(
    cluster: Cluster, backup: Backup, damaged: Path
) -> None:
    before = listing(cluster.root("cp-2"))
    blob = bytearray(backup.file.read_bytes())
    blob[-40] ^= 0x01  # a bit of the ciphertext
    tampered = cluster.base / "tampered" / backup.file.name
    tampered.parent.mkdir(exist_ok=True)
    tampered.write_bytes(bytes(blob))
    manifest = {**backup.manifest, "sha256": hashlib.sha256(blob).hexdigest()}
    tampered.with_name(backup.manifest["file"].removesuffix(".tar.enc") + ".json").write_text(json.dumps(manifest))
    result = cluster.run(
        "playbooks/restore.yml",
        "cp-1",
        "cp-2",
        args=("--limit", "cp-2", "-e", f"kleidi_backup_restore_file={tampered}"),
    )
    assert result.returncode != 0
    says(result, "the backup failed its integrity check (AES-256-GCM tag)")
    # With its original manifest, the controller already sees the change.
    shutil.copy(
        backup.file.with_name(backup.manifest["file"].removesuffix(".tar.enc") + ".json"),
        tampered.with_suffix("").with_suffix(".json"),
    )
    result = cluster.run(
        "playbooks/restore.yml",
        "cp-1",
        "cp-2",
        args=("--limit", "cp-2", "-e", f"kleidi_backup_restore_file={tampered}"),
    )
    assert result.returncode != 0
    says(result, "is not the file its manifest describes (its sha256 differs)")
    assert listing(cluster.root("cp-2")) == before


def test_a_damaged_token_is_replaced_and_kept_aside(cluster: Cluster, backup: Backup, damaged: Path) -> None:
    """Runs after the refused attempts above, on the same damaged token."""
    left = sorted(p.name for p in damaged.iterdir())
    result = cluster.run("playbooks/restore.yml", "cp-1", "cp-2", args=("--limit", "cp-2")).assert_ok()
    says(result, "cp-2: restored from")
    says(result, "what it replaced is kept at")
    [kept] = (cluster.root("cp-2") / "var/backups/kleidi/.replaced-stores").glob(f"*/{TOKENS}/{damaged.name}")
    assert sorted(p.name for p in kept.iterdir()) == left
    assert (damaged / "token.object").is_file()
    cluster.kubelets["cp-2"].wait_serving()
    with cluster.kubelets["cp-2"].plugin.client() as kms:
        wrapped = backup.wrapped
        assert kms.decrypt(wrapped.ciphertext, wrapped.key_id, wrapped.annotations)


def test_a_healthy_store_that_differs_is_refused(cluster: Cluster, backup: Backup, restored: PlayResult) -> None:
    """cp-3 gets a token of its own (the softhsm role run with cp-3 alone makes a new one): restore refuses to
    replace it, and backup refuses nodes that disagree."""
    extra = {"kleidi_softhsm_pin": PIN, "kleidi_softhsm_so_pin": SO_PIN}
    run_playbook("tests/playbooks/kleidi_softhsm.yml", cluster.inventory("cp-3"), extra_vars=extra).assert_ok()
    before = listing(cluster.root("cp-3"))
    result = cluster.run("playbooks/restore.yml", "cp-1", "cp-2", "cp-3", args=("--limit", "cp-3"))
    assert result.returncode != 0
    says(result, "Nothing was restored. cp-3: its healthy store is another one than the backup's")
    refused = cluster.run("playbooks/backup.yml", "cp-1", "cp-2", "cp-3")
    assert refused.returncode != 0
    says(refused, "No backup was taken: The nodes hold different stores")
    assert listing(cluster.root("cp-3")) == before
    assert len(list(cluster.backups.glob("*.tar.enc"))) == 1


@pytest.fixture(scope="module")
def rotated(cluster: Cluster, backup: Backup, damaged: Path) -> Path:
    """After the tests above: a rotation as rotate.yml leaves the backend, with no backup taken since. kleidi-kek-2
    is added to the shared token (the kleidi_softhsm role as rotate.yml runs it) and both nodes' kleidi.yaml name
    it; the test's plugins keep their own config (kleidi-kek-1), so the health gate stays about the store. Then cp-2
    loses its token directory. Returns the backup file taken before the rotation."""
    extra = {
        "kleidi_softhsm_pin": PIN,
        "kleidi_softhsm_so_pin": SO_PIN,
        "kleidi_softhsm_key_label": "kleidi-kek-2",
        "kleidi_softhsm_add_key": True,
    }
    run_playbook("tests/playbooks/kleidi_softhsm.yml", cluster.inventory("cp-1", "cp-2"), extra_vars=extra).assert_ok()
    for host in ("cp-1", "cp-2"):
        path = cluster.root(host) / "etc/kleidi/kleidi.yaml"
        config = yaml.safe_load(path.read_text())
        config["pkcs11"]["key_label"] = "kleidi-kek-2"
        path.write_text(yaml.safe_dump(config))
    shutil.rmtree(cluster.root("cp-2") / TOKENS)
    return backup.file


def test_a_backup_taken_before_a_rotation_is_refused_and_writes_nothing(cluster: Cluster, rotated: Path) -> None:
    before = listing(cluster.root("cp-2"))
    for args in (("--check", "--limit", "cp-2"), ("--limit", "cp-2")):
        result = cluster.run("playbooks/restore.yml", "cp-1", "cp-2", args=args)
        assert result.returncode != 0
        says(
            result,
            f"Nothing was restored. {rotated.name} (taken {rotated.name[:16]} on cp-1) holds the keys kleidi-kek-1 "
            "and lacks the KEK in force: the kleidi.yaml of cp-1 names kleidi-kek-2; the kleidi.yaml of cp-2 names "
            "kleidi-kek-2.",
        )
        says(result, "cp-2 could not decrypt what was written under kleidi-kek-2 since. Restore a newer backup")
        says(result, "run again with -e kleidi_backup_restore_allow_older=true")
        assert "would be restored from" not in result.output
        assert listing(cluster.root("cp-2")) == before


def test_a_backup_taken_after_the_rotation_is_restored(cluster: Cluster, rotated: Path) -> None:
    """What the refusal says to do: a backup from the node that still holds the KEK in force, then the restore."""
    cluster.run("playbooks/backup.yml", "cp-1", "cp-2", args=("--limit", "cp-1")).assert_ok()
    newer = max(cluster.backups.glob("*-softhsm.tar.enc"))
    assert newer != rotated
    result = cluster.run("playbooks/restore.yml", "cp-1", "cp-2", args=("--limit", "cp-2")).assert_ok()
    says(result, "cp-2: restored from " + newer.name)
    assert "WARNING" not in result.output
    assert cluster.token_dir("cp-2").name == cluster.token_dir("cp-1").name


def test_kleidi_backup_restore_allow_older_restores_it_with_a_warning(cluster: Cluster, rotated: Path) -> None:
    shutil.rmtree(cluster.root("cp-2") / TOKENS)
    args = (
        "--limit",
        "cp-2",
        "-e",
        f"kleidi_backup_restore_file={rotated}",
        "-e",
        "kleidi_backup_restore_allow_older=true",
    )
    result = cluster.run("playbooks/restore.yml", "cp-1", "cp-2", args=args).assert_ok()
    says(result, f"WARNING: {rotated.name} holds kleidi-kek-1 and lacks the KEK in force")
    says(result, "cp-2: restored from " + rotated.name)
    _, files = open_backup(rotated.read_bytes(), PASSPHRASE)
    token = cluster.token_dir("cp-2")
    assert sorted(f"{token.name}/{p.name}" for p in token.iterdir() if p.suffix != ".lock") == sorted(files)


def test_vault_has_nothing_to_copy_and_points_to_the_server_snapshot(tmp_path: Path) -> None:
    inventory = local_inventory(
        tmp_path / "hosts.yml",
        {"cp-1": {"kleidi_node_root": str(tmp_path / "cp-1"), "kleidi_backend_role": "kleidi_vault"}},
    )
    for playbook in ("playbooks/backup.yml", "playbooks/restore.yml"):
        result = run_playbook(playbook, inventory).assert_ok()
        says(result, "bao operator raft snapshot save")
        assert not result.changed()["cp-1"]
    assert not (tmp_path / ".kleidi-state").exists()
