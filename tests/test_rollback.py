"""playbooks/rollback.yml on a simulated kubeadm control-plane node with kleidi installed by site.yml (a real
SoftHSM2 token, the real plugin run from its static pod by the node agent, the apiserver stand-in waited for).

The tests run in order on one node, as an operator's day two would: a log-level change rolled back byte for byte
(and a second rollback doing nothing), a KEK change kept in force with every ciphertext still decrypting, dropping
kms refused after a completed re-encryption and without consent before, and finally the install itself rolled back
with consent, leaving the node as it was before kleidi but for the KEK store and the backend's files that open it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lifecycle_node import FileState, LifecycleNode, lifecycle_node
from tests.plugin import wait_for

pytestmark = pytest.mark.integration

KLEIDI_YAML = "/etc/kleidi/kleidi.yaml"
PLUGIN_POD = "/etc/kubernetes/manifests/kleidi.yaml"
AESCBC_CONFIG = "/etc/kubernetes/encryption/config.yaml"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LifecycleNode, dict[str, FileState]]]:
    with lifecycle_node(tmp_path_factory.mktemp("rollback"), "rollback") as made:
        yield made


@pytest.fixture(scope="module")
def install_stamp(installed: tuple[LifecycleNode, dict[str, FileState]]) -> str:
    """The install's run: the oldest backup directory (stamps sort by time)."""
    node, _ = installed
    return min(p.name for p in node.path("/var/backups/kleidi").iterdir())


def plugin_values(node: LifecycleNode, **config: Any) -> dict[str, Any]:
    """kleidi_plugin_values as the inventory has them, with some of kleidi.yaml's settings changed."""
    values = json.loads(
        json.dumps(node.vars["kleidi_plugin_values"]).replace("{{ kleidi_node_address }}", node.address)
    )
    values["config"].update(config)
    return {"kleidi_plugin_values": values}


def seal(node: LifecycleNode) -> dict[str, Any]:
    """32 bytes wrapped by the node's plugin, as the apiserver would have it for a DEK seed."""
    with node.kms() as kms:
        plaintext = b"rollback-test-" + bytes(range(18))
        answer = kms.encrypt(plaintext, uid="rollback-test")
    return {"plaintext": plaintext, "ciphertext": answer.ciphertext, "key_id": answer.key_id,
            "annotations": dict(answer.annotations)}  # fmt: skip


def unseal(node: LifecycleNode, sealed: dict[str, Any]) -> bytes:
    with node.kms() as kms:
        plain: bytes = kms.decrypt(sealed["ciphertext"], sealed["key_id"], sealed["annotations"], "rollback-test")
    return plain


def status_key_id(node: LifecycleNode) -> str:
    with node.kms() as kms:
        key_id: str = kms.status().key_id
    return key_id


def test_a_log_level_change_is_rolled_back_byte_for_byte_and_a_second_rollback_does_nothing(
    installed: tuple[LifecycleNode, dict[str, FileState]],
) -> None:
    node, _ = installed
    before = node.files()
    key_id = status_key_id(node)
    node.run("site.yml", **plugin_values(node, log_level="debug")).assert_ok()
    changed = node.files()
    assert node.config(KLEIDI_YAML)["log_level"] == "debug"
    assert {p for p in before if before[p] != changed.get(p)} == {KLEIDI_YAML, PLUGIN_POD}

    checked = node.run("rollback.yml", "--check").assert_ok()
    assert checked.changed()["cp-1"] > 0 and node.files() == changed, "--check changed files"
    result = node.run("rollback.yml").assert_ok()
    assert result.changed()["cp-1"] > 0
    assert node.files() == before, "the rollback did not restore every file byte for byte, with mode and owner"
    said = " ".join(result.output.split())
    assert "restored: /etc/kleidi/kleidi.yaml, /etc/kubernetes/manifests/kleidi.yaml" in said
    # The plugin the kubelet started from the manifest put back serves the same KEK, and the apiserver was waited for.
    assert status_key_id(node) == key_id
    assert "Wait until this node's apiserver is ready" in result.output

    again = node.run("rollback.yml").assert_unchanged()
    said = " ".join(again.output.split())
    assert "was rolled back already" in said and "nothing to do" in said
    assert node.files() == before
    # Undoing the rollback is asked for by its own stamp, and rolls the change forward again.
    (own,) = [p.name for p in node.path("/var/backups/kleidi").iterdir() if (p / ".rollback-of").exists()]
    assert f"kleidi_rollback_stamp={own}" in "".join(result.output.split())
    node.run("rollback.yml", kleidi_rollback_stamp=own).assert_ok()
    assert node.files() == changed


def test_after_a_rotation_the_new_kek_stays_in_force_and_everything_written_before_and_after_decrypts(
    installed: tuple[LifecycleNode, dict[str, FileState]],
) -> None:
    node, _ = installed
    under_old = seal(node)
    # What rotate.yml does on the token: a second KEK beside the first, then every node switched to it.
    node.pkcs11_tool("--keygen", "--key-type", "AES:32", "--label", "kleidi-kek-2", "--id", "02", "--private",
                     "--sensitive")  # fmt: skip
    store = node.path("/var/lib/kleidi/softhsm/tokens")
    for path in [store, *store.rglob("*")]:  # pkcs11-tool ran as root; the store belongs to the plugin's user
        os.chown(path, 10001, 10001)
    node.run("site.yml", kleidi_softhsm_key_label="kleidi-kek-2").assert_ok()
    assert node.config(KLEIDI_YAML)["pkcs11"]["key_label"] == "kleidi-kek-2"
    rotated = node.files()
    new_key_id = status_key_id(node)
    assert new_key_id != under_old["key_id"]
    under_new = seal(node)
    assert under_new["key_id"] == new_key_id

    result = node.run("rollback.yml").assert_ok()
    said = " ".join(result.output.split())
    assert "rotated the KEK" in said and "roll forward" in said and "Data has been written under the new KEK" in said
    assert node.files() == rotated, "a rollback after a rotation changed the files that name the KEK"
    assert status_key_id(node) == new_key_id
    assert unseal(node, under_new) == under_new["plaintext"]
    assert unseal(node, under_old) == under_old["plaintext"]


def test_dropping_kms_is_refused_after_a_completed_reencryption_and_without_consent_before(
    installed: tuple[LifecycleNode, dict[str, FileState]], install_stamp: str
) -> None:
    node, _ = installed
    before = node.files()
    state = node.inventory.parent / ".kleidi-state"
    state.mkdir(mode=0o700, exist_ok=True)
    finished = state / "reencrypt-test.json"
    finished.write_text(json.dumps({"provider": "kleidi", "finished": "2025-01-01T00:00:00Z"}))
    try:
        refused = node.run("rollback.yml", kleidi_rollback_stamp=install_stamp, kleidi_rollback_drop_kms=True)
    finally:
        finished.unlink()
    assert refused.returncode != 0
    said = " ".join(refused.output.split())
    assert "Nothing was changed on any node" in said
    assert "data is stored under kms now" in said and "run uninstall.yml" in said
    assert node.files() == before

    unasked = node.run("rollback.yml", kleidi_rollback_stamp=install_stamp)
    assert unasked.returncode != 0
    said = " ".join(unasked.output.split())
    assert "would become unreadable" in said and "kleidi_rollback_drop_kms=true" in said
    assert node.files() == before


def test_the_install_rolled_back_with_consent_leaves_the_node_as_it_was_before_kleidi(
    installed: tuple[LifecycleNode, dict[str, FileState]], install_stamp: str
) -> None:
    node, before_install = installed
    result = node.run("rollback.yml", kleidi_rollback_stamp=install_stamp, kleidi_rollback_drop_kms=True).assert_ok()
    # The backend role's files (the token's config, the PIN file) open the KEK store, which a rollback never takes
    # away: they stay, as the token does. Every other file is as it was before the install.
    backend = {"/etc/kleidi/pin", "/etc/kleidi/softhsm2.conf", "/etc/kleidi/softhsm2.host.conf"}
    after = node.files()
    assert backend <= set(after)
    assert {p: f for p, f in after.items() if p not in backend} == before_install, "not all restored, or removed"
    assert not node.path(KLEIDI_YAML).exists() and not node.path(PLUGIN_POD).exists()
    # The apiserver came back on the aescbc configuration alone: ready, without a kms provider to wait for.
    assert "kms" not in node.path(AESCBC_CONFIG).read_text()
    assert "Wait until this node's apiserver has restarted since the change" in result.output
    wait_for(lambda: "kube-system/kleidi" not in node.pods(), 30, "the agent to stop the plugin's pod", 0.5)
    assert any(node.path("/var/lib/kleidi/softhsm/tokens").iterdir())
