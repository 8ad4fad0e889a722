"""The softhsm role, run for real on simulated control-plane nodes (one node root each under a temp dir).

One KEK for the whole control plane: the first run creates the token on one node and copies its store to the
other, so a real `kleidi serve` on each node reports the same key_id and decrypts what the other encrypted. A
second run changes nothing, a node added later with --limit gets the same key, --check on fresh nodes writes
nothing, and no PIN ever shows in a -v run's output."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.ansible_run import PlayResult, local_inventory, run_playbook
from tests.plugin import KleidiProcess

pytestmark = pytest.mark.integration

PLAYBOOK = "tests/playbooks/kleidi_softhsm.yml"
PIN = "pin-" + secrets.token_hex(8)
SO_PIN = "so-" + secrets.token_hex(8)
# Global state the role must leave alone: SoftHSM2's default token directory and the real config directory.
REAL_PATHS = (Path("/var/lib/softhsm/tokens"), Path("/etc/kleidi"))


def listing(*roots: Path) -> list[str]:
    """Every path under the roots with its owner and mode, for before/after comparisons."""
    found = []
    for root in roots:
        if not root.exists():
            found.append(f"{root} absent")
            continue
        for path in sorted([root, *root.rglob("*")]):
            info = path.lstat()
            found.append(f"{path} {info.st_uid}:{info.st_gid} {info.st_mode:o}")
    return found


@dataclass
class Cluster:
    """Simulated control-plane nodes and the inventory that names them."""

    base: Path

    def root(self, host: str) -> Path:
        return self.base / host

    def inventory(self, *hosts: str) -> Path:
        for host in hosts:
            (self.root(host) / "etc").mkdir(parents=True, exist_ok=True)  # a node always has /etc
        # Modules run under the system Python, as on a real Debian node (it also starts far faster than a venv's).
        node = {"ansible_python_interpreter": "/usr/bin/python3"}
        per_host = {h: {**node, "kleidi_node_root": str(self.root(h))} for h in hosts}
        return local_inventory(self.base / "hosts.yml", per_host)

    def run(self, *hosts: str, args: tuple[str, ...] = ("-v",), facts: bool = True) -> PlayResult:
        extra: dict[str, Any] = {"kleidi_softhsm_pin": PIN, "kleidi_softhsm_so_pin": SO_PIN}
        if facts:
            (self.base / "facts").mkdir(exist_ok=True)
            extra["kleidi_test_fact_dir"] = str(self.base / "facts")
        result = run_playbook(PLAYBOOK, self.inventory(*hosts), *args, extra_vars=extra)
        for secret in (PIN, SO_PIN):
            assert secret not in result.output, "a PIN shows in ansible-playbook's output"
        return result

    def fact(self, host: str) -> dict[str, Any]:
        """The kleidi_softhsm_backend fact the role set on the host, which playbooks/site.yml hands to kleidi_plugin."""
        for name, fact in json.loads((self.base / "facts" / "facts.json").read_text()):
            if name == host:
                return dict(fact)
        raise AssertionError(f"no facts for {host}")

    def token_dirs(self, host: str) -> list[Path]:
        return sorted(p for p in (self.root(host) / "var/lib/kleidi/softhsm/tokens").iterdir() if p.is_dir())

    def plugin(self, host: str) -> KleidiProcess:
        """A real `kleidi serve` for the node: the fact's settings with the node root added to its paths, and
        SoftHSM2 pointed at the host-path config the role wrote."""
        fact, root = self.fact(host), str(self.root(host))
        settings = {**fact["settings"], "pin_file": root + fact["settings"]["pin_file"]}
        env = {**os.environ, "SOFTHSM2_CONF": root + "/etc/kleidi/softhsm2.host.conf"}
        config = {"provider": fact["provider"], "health_interval": "1s", fact["provider"]: settings}
        return KleidiProcess(self.base / f"k-{host}", config, env=env)


@pytest.fixture(scope="module")
def real_paths_before() -> list[str]:
    return listing(*REAL_PATHS)


@dataclass
class CheckRun:
    result: PlayResult
    before: list[str]
    after: list[str]


@pytest.fixture(scope="module")
def check_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Future[CheckRun]]:
    """A --check run on a fresh pair of nodes, started in the background (it shares nothing with the cluster,
    and the two plays together take less time side by side than one after the other)."""
    fresh = Cluster(tmp_path_factory.mktemp("shc"))
    roots = (fresh.root("cp-1"), fresh.root("cp-2"))

    def run() -> CheckRun:
        fresh.inventory("cp-1", "cp-2")
        before = listing(*roots)
        result = fresh.run("cp-1", "cp-2", args=("--check", "-v"), facts=False)
        return CheckRun(result, before, listing(*roots))

    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(run)


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, real_paths_before: list[str], check_run: Future[CheckRun]
) -> Cluster:
    """Two fresh nodes after the role's first run."""
    nodes = Cluster(tmp_path_factory.mktemp("sh"))
    nodes.run("cp-1", "cp-2").assert_ok()
    return nodes


@pytest.fixture(scope="module")
def plugins(cluster: Cluster) -> Iterator[dict[str, KleidiProcess]]:
    started: dict[str, KleidiProcess] = {}
    try:
        for host in ("cp-1", "cp-2"):
            started[host] = cluster.plugin(host).start()
        yield started
    finally:
        for proc in started.values():
            proc.stop()


def test_the_fact_names_node_paths_only(cluster: Cluster) -> None:
    assert cluster.fact("cp-1") == {
        "provider": "pkcs11",
        "settings": {
            "module": "/usr/lib/softhsm/libsofthsm2.so",
            "token_label": "kleidi",
            "pin_file": "/etc/kleidi/pin",
            "key_label": "kleidi-kek-1",
            "mechanism": "aes-gcm",
        },
        "env": {"SOFTHSM2_CONF": "/etc/kleidi/softhsm2.conf"},
        "volumes": [
            {"name": "softhsm-tokens", "path": "/var/lib/kleidi/softhsm/tokens", "type": "Directory", "readOnly": False}
        ],
    }
    root = cluster.root("cp-1")
    assert "directories.tokendir = /var/lib/kleidi/softhsm/tokens\n" in (root / "etc/kleidi/softhsm2.conf").read_text()
    host_conf = (root / "etc/kleidi/softhsm2.host.conf").read_text()
    assert f"directories.tokendir = {root}/var/lib/kleidi/softhsm/tokens\n" in host_conf


def test_each_node_has_its_own_copy_of_one_token_owned_by_the_plugin_user(cluster: Cluster) -> None:
    first, second = cluster.token_dirs("cp-1"), cluster.token_dirs("cp-2")
    assert len(first) == len(second) == 1
    assert first[0] != second[0] and first[0].name == second[0].name, "the same token, in each node's own root"
    for host in ("cp-1", "cp-2"):
        tokens = cluster.root(host) / "var/lib/kleidi/softhsm/tokens"
        for path in [tokens, *tokens.rglob("*")]:
            info = path.stat()
            assert (info.st_uid, info.st_gid) == (10001, 10001), path
            assert info.st_mode & 0o077 == 0, path
        pin_file = cluster.root(host) / "etc/kleidi/pin"
        assert pin_file.read_text() == PIN + "\n"
        assert (pin_file.stat().st_mode & 0o777, pin_file.stat().st_uid) == (0o600, 10001)


def test_the_kek_is_private_so_the_copied_store_never_holds_it_in_clear(cluster: Cluster) -> None:
    """Without CKA_PRIVATE, SoftHSM2 writes the key value unencrypted into its object file."""
    env = {**os.environ, "SOFTHSM2_CONF": str(cluster.root("cp-2") / "etc/kleidi/softhsm2.host.conf")}
    listed = subprocess.run(
        ["pkcs11-tool", "--module", "/usr/lib/softhsm/libsofthsm2.so", "--token-label", "kleidi", "-O"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "kleidi-kek-1" not in listed.stdout, "the KEK is visible without logging in: it is not CKA_PRIVATE"


def test_second_run_changes_nothing(cluster: Cluster) -> None:
    cluster.run("cp-1", "cp-2", facts=False).assert_unchanged()


def test_every_node_serves_the_same_kek(plugins: dict[str, KleidiProcess]) -> None:
    with plugins["cp-1"].client() as one, plugins["cp-2"].client() as two:
        status_one, status_two = one.status(), two.status()
        assert status_one.healthz == status_two.healthz == "ok"
        assert status_one.key_id == status_two.key_id
        assert status_one.key_id.startswith("pkcs11:aes-gcm:kleidi-kek-1:")
        data_key = secrets.token_bytes(32)
        wrapped = one.encrypt(data_key, uid="role-test")
        assert two.decrypt(wrapped.ciphertext, wrapped.key_id, wrapped.annotations) == data_key


def test_a_node_added_later_gets_the_same_kek(cluster: Cluster, plugins: dict[str, KleidiProcess]) -> None:
    cluster.run("cp-1", "cp-2", "cp-3", args=("--limit", "cp-3")).assert_ok()
    assert cluster.token_dirs("cp-3")[0].name == cluster.token_dirs("cp-1")[0].name
    with plugins["cp-1"].client() as one:
        key_id = one.status().key_id
        data_key = secrets.token_bytes(32)
        wrapped = one.encrypt(data_key, uid="role-test")
    with cluster.plugin("cp-3").start() as third, third.client() as three:
        assert three.status().key_id == key_id
        assert three.decrypt(wrapped.ciphertext, wrapped.key_id, wrapped.annotations) == data_key


def test_check_mode_on_fresh_nodes_writes_nothing(check_run: Future[CheckRun]) -> None:
    done = check_run.result(timeout=600)
    done.result.assert_ok()
    assert done.after == done.before
    assert done.result.changed()["cp-1"] > 0, "check mode should show the changes it would make"


def test_nothing_is_written_outside_the_node_roots(cluster: Cluster, real_paths_before: list[str]) -> None:
    assert listing(*REAL_PATHS) == real_paths_before
