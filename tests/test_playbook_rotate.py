"""playbooks/rotate.yml with SoftHSM2 on two local node roots, end to end as far as nodes without an apiserver go.

The nodes get kleidi the way site.yml's first play gives it (tests/playbooks/kleidi_install.yml: the kleidi_softhsm
and kleidi_plugin roles), and a stand-in for the kubelet's static pod handling (tests/kubelet.py) runs a real
`kleidi serve` per node from the node's kleidi.yaml, replacing it whenever the role changes the pod's manifest. Then
rotate.yml, without variables: both tokens hold the new KEK and keep the old one, both plugins serve one new key_id,
data wrapped before the rotation still unwraps on both, and a plugin that kept running on the old KEK through the
whole rotation (as a node not yet switched does) unwraps what the new KEK wraps. A second run with the same target
changes nothing, site.yml's roles afterwards keep the new KEK, and --check changes nothing. No PIN shows.

What the nodes' apiservers do is not here: these nodes' apiservers have no kms provider, so rotate.yml has none to
wait for (it says so); molecule/default's drill runs rotate.yml against the simulated apiservers."""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ansible_run import PlayResult, run_playbook
from tests.kleidi_nodes import bare_kubeadm_node, nodes_inventory
from tests.kubelet import StaticPods, node_config, softhsm_env
from tests.plugin import REPO, KleidiProcess

pytestmark = pytest.mark.integration

INSTALL = REPO / "tests" / "playbooks" / "kleidi_install.yml"
ROTATE = REPO / "playbooks" / "rotate.yml"
PIN = "pin-" + secrets.token_hex(8)
SO_PIN = "so-" + secrets.token_hex(8)
HOSTS = ("cp-1", "cp-2")
MODULE = "/usr/lib/softhsm/libsofthsm2.so"


@dataclass
class Nodes:
    base: Path
    outputs: list[str] = field(default_factory=list)

    def root(self, host: str) -> Path:
        return self.base / "nodes" / host

    @property
    def roots(self) -> list[Path]:
        return [self.root(host) for host in HOSTS]

    @property
    def state_dir(self) -> Path:
        return self.base / "inventory" / ".kleidi-state"

    def prepare(self) -> None:
        """What a kubeadm control-plane node has before kleidi: /etc, the apiserver's manifest; plus the kleidi
        command where the kleidi_plugin role puts its virtualenv (this test's own, so no wheel is built)."""
        for root in self.roots:
            bare_kubeadm_node(root)

    def play(self, playbook: Path, *args: str, **extra: Any) -> PlayResult:
        inventory = nodes_inventory(self.base, {host: {"kleidi_node_root": str(self.root(host))} for host in HOSTS})
        variables = {"kleidi_softhsm_pin": PIN, "kleidi_softhsm_so_pin": SO_PIN, "kleidi_plugin_health_timeout": 30}
        result = run_playbook(playbook, inventory, *args, extra_vars={**variables, **extra})
        self.outputs.append(result.output)
        for secret in (PIN, SO_PIN):
            assert secret not in result.output, "a PIN shows in ansible-playbook's output"
        return result

    def key_labels(self, host: str) -> list[str]:
        """The labels of the secret keys on the node's token, read with pkcs11-tool logged in."""
        env = {**softhsm_env(self.root(host)), "TEST_PIN": PIN}
        listed = subprocess.run(
            ["pkcs11-tool", "--module", MODULE, "--token-label", "kleidi", "--login", "--pin", "env:TEST_PIN",
             "--list-objects", "--type", "secrkey"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return sorted(line.split("label:", 1)[1].strip() for line in listed.splitlines() if "label:" in line)

    def kleidi_yaml(self, host: str) -> dict[str, Any]:
        return dict(yaml.safe_load((self.root(host) / "etc/kleidi/kleidi.yaml").read_text()))


def files_of(*roots: Path) -> dict[str, str]:
    """Every file under the roots with a hash of its content, for before/after comparisons. Left out: what SoftHSM2
    itself writes when a token is only opened, its lock files and token.object (a login rewrites it)."""
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if (
                path.is_file()
                and not path.is_symlink()
                and not path.name.endswith(".lock")
                and path.name != "token.object"
            ):
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@dataclass
class Rotated:
    nodes: Nodes
    pods: StaticPods
    bystander: KleidiProcess
    old_key_id: str
    wrapped_before: Any
    data_key: bytes
    install: PlayResult
    rotate: PlayResult


@pytest.fixture(scope="module")
def rotated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rotated]:
    nodes = Nodes(tmp_path_factory.mktemp("rotate"))
    nodes.prepare()
    with StaticPods(nodes.base / "pods", nodes.roots, softhsm_env) as pods:
        install = nodes.play(INSTALL).assert_ok()
        assert not pods.errors, pods.errors
        one = pods.plugin(nodes.root("cp-1"))
        with one.client() as kms:
            old_key_id = kms.status().key_id
            data_key = secrets.token_bytes(32)
            wrapped_before = kms.encrypt(data_key, uid="before-rotation")
        # A plugin on cp-2's token that the rotation never restarts: what a node still on the old KEK runs while
        # the nodes before it switch.
        root = nodes.root("cp-2")
        bystander = KleidiProcess(
            nodes.base / "bystander", node_config(root, nodes.kleidi_yaml("cp-2")), softhsm_env(root)
        )
        bystander.config["listen"] = f"unix://{nodes.base}/bystander.sock"
        bystander.socket = f"{nodes.base}/bystander.sock"
        bystander.start()
        try:
            rotate = nodes.play(ROTATE, "-v")
            yield Rotated(nodes, pods, bystander, old_key_id, wrapped_before, data_key, install, rotate)
        finally:
            bystander.stop()


def said(result: PlayResult) -> str:
    """The play's output with its line wrapping undone."""
    return " ".join(result.output.split())


def test_the_rotation_runs_and_says_what_it_did(rotated: Rotated) -> None:
    rotated.rotate.assert_ok()
    assert not rotated.pods.errors, rotated.pods.errors
    with rotated.pods.plugin(rotated.nodes.root("cp-1")).client() as kms:
        new_key_id = kms.status().key_id
    output = said(rotated.rotate)
    assert f"old key_id: {rotated.old_key_id}" in output
    assert f"new key_id: {new_key_id}" in output
    assert "The old KEK (kleidi-kek-1) is kept on every token" in output
    assert "Never delete it while data in etcd, or any etcd snapshot, may still be under it" in output
    assert "playbooks/backup.yml" in output
    assert "Re-encryption pending" in output and "playbooks/reencrypt.yml" in output
    assert "has no kleidi kms provider, nothing to wait for" in output


def test_every_token_holds_the_new_kek_and_keeps_the_old_one(rotated: Rotated) -> None:
    for host in HOSTS:
        assert rotated.nodes.key_labels(host) == ["kleidi-kek-1", "kleidi-kek-2"], host
    first, second = (
        sorted(p.name for p in (r / "var/lib/kleidi/softhsm/tokens").iterdir()) for r in rotated.nodes.roots
    )
    assert first == second, "one token, the same on both nodes"
    # The new key is private like the first: without logging in, no key is visible at all.
    env = softhsm_env(rotated.nodes.root("cp-2"))
    public = subprocess.run(
        ["pkcs11-tool", "--module", MODULE, "--token-label", "kleidi", "--list-objects"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "kleidi-kek" not in public


def test_both_plugins_serve_one_new_key_id_and_data_from_before_still_unwraps(rotated: Rotated) -> None:
    pods = rotated.pods
    with (
        pods.plugin(rotated.nodes.root("cp-1")).client() as one,
        pods.plugin(rotated.nodes.root("cp-2")).client() as two,
    ):
        key_id = one.status().key_id
        assert two.status().key_id == key_id
        assert key_id.startswith("pkcs11:aes-gcm:kleidi-kek-2:") and key_id != rotated.old_key_id
        before = rotated.wrapped_before
        for kms in (one, two):
            assert kms.decrypt(before.ciphertext, before.key_id, before.annotations) == rotated.data_key
        fresh = secrets.token_bytes(32)
        wrapped = two.encrypt(fresh, uid="after-rotation")
        assert wrapped.key_id == key_id
        assert one.decrypt(wrapped.ciphertext, wrapped.key_id, wrapped.annotations) == fresh
    # The plugin that stayed on the old KEK all along (as a node not yet switched) reads what the new KEK wrote.
    with rotated.bystander.client() as old:
        assert old.status().key_id == rotated.old_key_id
        assert old.decrypt(wrapped.ciphertext, wrapped.key_id, wrapped.annotations) == fresh


def test_kleidi_yaml_names_the_new_kek_and_the_old_file_is_backed_up(rotated: Rotated) -> None:
    for root in rotated.nodes.roots:
        assert yaml.safe_load((root / "etc/kleidi/kleidi.yaml").read_text())["pkcs11"]["key_label"] == "kleidi-kek-2"
        backups = list((root / "var/backups/kleidi").glob("*/etc/kleidi/kleidi.yaml"))
        assert [yaml.safe_load(b.read_text())["pkcs11"]["key_label"] for b in backups] == ["kleidi-kek-1"]
        assert rotated.pods.starts[root] == 2, "the kubelet replaced the pod once, for the new kleidi.yaml"


def test_the_controller_records_the_rotation_and_the_pending_re_encryption(rotated: Rotated) -> None:
    state = rotated.nodes.state_dir
    assert state.stat().st_mode & 0o777 == 0o700
    record = json.loads((state / "rotation.json").read_text())
    with rotated.pods.plugin(rotated.nodes.root("cp-1")).client() as kms:
        new_key_id = kms.status().key_id
    assert record["phase"] == "done"
    assert (record["target"], record["old_key_id"], record["new_key_id"]) == (
        "kleidi-kek-2",
        rotated.old_key_id,
        new_key_id,
    )
    pending = json.loads((state / "pending-reencryption.json").read_text())
    assert (pending["key_id"], pending["old_key_id"]) == (new_key_id, rotated.old_key_id)
    assert pending["since"]


def test_a_second_run_with_the_same_target_changes_nothing(rotated: Rotated) -> None:
    before = files_of(*rotated.nodes.roots, rotated.nodes.state_dir)
    rotated.nodes.play(ROTATE, kleidi_rotate_target="kleidi-kek-2").assert_unchanged()
    assert files_of(*rotated.nodes.roots, rotated.nodes.state_dir) == before
    assert all(starts == 2 for starts in rotated.pods.starts.values()), "no plugin was restarted"


def test_site_yml_afterwards_keeps_the_new_kek(rotated: Rotated) -> None:
    rotated.nodes.play(INSTALL).assert_unchanged()
    for host in HOSTS:
        assert rotated.nodes.kleidi_yaml(host)["pkcs11"]["key_label"] == "kleidi-kek-2"


def test_check_mode_says_where_it_would_go_and_changes_nothing(rotated: Rotated) -> None:
    before = files_of(*rotated.nodes.roots, rotated.nodes.state_dir)
    result = rotated.nodes.play(ROTATE, "--check").assert_ok()
    assert "Check mode: would rotate kleidi_softhsm from kleidi-kek-2 to kleidi-kek-3" in said(result)
    assert files_of(*rotated.nodes.roots, rotated.nodes.state_dir) == before
    for host in HOSTS:
        assert rotated.nodes.key_labels(host) == ["kleidi-kek-1", "kleidi-kek-2"]


def test_a_label_pinned_in_the_inventory_is_refused_before_anything_changes(rotated: Rotated) -> None:
    before = files_of(*rotated.nodes.roots)
    result = rotated.nodes.play(ROTATE, kleidi_softhsm_key_label="kleidi-kek-2")
    assert result.returncode != 0
    assert "kleidi_softhsm_key_label=kleidi-kek-2 set in the inventory" in said(result)
    assert "Nothing was changed" in said(result)
    assert files_of(*rotated.nodes.roots) == before
