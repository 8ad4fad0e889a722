"""playbooks/uninstall.yml on a simulated kubeadm control-plane node with kleidi installed by site.yml (a real
SoftHSM2 token, the real plugin run from its static pod by the node agent, the apiserver stand-in waited for).

In order, on one node: without a kubeconfig the uninstall moves kms last and stops, removing nothing, with every
ciphertext still decrypting; rollback.yml cancels that; and the last step (run alone: the stand-in stores no
objects to re-encrypt) takes kms, the socket mount and the plugin out, keeps the KEK store, and is never rolled back."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.lifecycle_node import FileState, LifecycleNode, lifecycle_node
from tests.plugin import REPO, wait_for

pytestmark = pytest.mark.integration

CONFIG = "/etc/kubernetes/encryption/config.yaml"
APISERVER = "/etc/kubernetes/manifests/kube-apiserver.yaml"
PATCH = "/etc/kubernetes/patches/kube-apiserver0+json.yaml"
REMOVE = REPO / "tests" / "playbooks" / "kleidi_uninstall_remove.yml"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LifecycleNode, dict[str, FileState]]]:
    with lifecycle_node(tmp_path_factory.mktemp("uninstall"), "uninstall") as made:
        yield made


def providers(node: LifecycleNode) -> list[str]:
    """The secrets entry's providers, in order (kms providers by name)."""
    (entry,) = [e for e in node.config(CONFIG)["resources"] if "secrets" in e["resources"]]
    return [f"kms:{p['kms']['name']}" if "kms" in p else next(iter(p)) for p in entry["providers"]]


def apiserver(node: LifecycleNode, path: str) -> tuple[int, str]:
    """GET on the node's own apiserver with the node-local client certificate, as kleidi_apiserver's wait does."""
    context = ssl.create_default_context(cafile=str(node.path("/etc/kubernetes/pki/ca.crt")))
    context.load_cert_chain(
        str(node.path("/etc/kubernetes/pki/apiserver-kubelet-client.crt")),
        str(node.path("/etc/kubernetes/pki/apiserver-kubelet-client.key")),
    )
    try:
        with urllib.request.urlopen(f"https://{node.address}:6443{path}", context=context, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def seal(node: LifecycleNode) -> dict[str, Any]:
    with node.kms() as kms:
        answer = kms.encrypt(b"uninstall-test-seed-0123456789ab", uid="uninstall-test")
    return {"ciphertext": answer.ciphertext, "key_id": answer.key_id, "annotations": dict(answer.annotations)}


def unseal(node: LifecycleNode, sealed: dict[str, Any]) -> bytes:
    with node.kms() as kms:
        plain: bytes = kms.decrypt(sealed["ciphertext"], sealed["key_id"], sealed["annotations"], "uninstall-test")
    return plain


def test_without_a_kubeconfig_it_moves_kms_last_stops_and_everything_stays_readable(
    installed: tuple[LifecycleNode, dict[str, FileState]],
) -> None:
    node, _ = installed
    assert providers(node) == ["kms:kleidi", "aescbc", "identity"]
    sealed = seal(node)
    before = node.files()
    checked = node.run("uninstall.yml", "--check")
    assert checked.changed()["cp-1"] > 0 and node.files() == before, "--check changed files"
    result = node.run("uninstall.yml")
    assert result.returncode != 0
    said = " ".join(result.output.split())
    assert "Stopped before removing anything" in said and "set kleidi_kubeconfig" in said
    assert "it still decrypts everything stored under it" in said
    # New writes go to aescbc again; kms stays, last, for what it wrote; the apiserver reloaded it and is ready.
    assert providers(node) == ["aescbc", "identity", "kms:kleidi"]
    assert apiserver(node, "/healthz/kms-providers") == (200, "ok")
    assert apiserver(node, "/readyz")[0] == 200
    # Nothing was removed: the plugin serves and decrypts what was written before.
    for kept in ("/etc/kubernetes/manifests/kleidi.yaml", "/etc/kleidi/kleidi.yaml", "/etc/kleidi/pin",
                 "/opt/kleidi/bin/kleidi", PATCH):  # fmt: skip
        assert node.path(kept).exists(), f"{kept} was removed"
    assert unseal(node, sealed) == b"uninstall-test-seed-0123456789ab"
    assert node.pods()["kube-system/kleidi"]["state"] == "Running"

    again = node.run("uninstall.yml")
    assert again.returncode != 0 and "Stopped before removing anything" in " ".join(again.output.split())
    assert again.changed()["cp-1"] == 0


def test_rollback_cancels_an_uninstall_that_stopped(installed: tuple[LifecycleNode, dict[str, FileState]]) -> None:
    node, _ = installed
    node.run("rollback.yml").assert_ok()
    assert providers(node) == ["kms:kleidi", "aescbc", "identity"]
    assert apiserver(node, "/healthz/kms-providers") == (200, "ok")


def test_the_last_step_takes_kleidi_out_keeps_the_kek_store_and_is_never_rolled_back(
    installed: tuple[LifecycleNode, dict[str, FileState]],
) -> None:
    node, before_install = installed
    assert node.run("uninstall.yml").returncode != 0  # step 1 again, then the stop
    result = node.run_playbook(REMOVE).assert_ok()
    said = " ".join(result.output.split())
    # The configuration that was there before kleidi keeps its flag and its aescbc provider; kms is gone.
    assert node.config(CONFIG) == yaml.safe_load(before_install[CONFIG][0])
    assert node.files()[CONFIG][1:] == before_install[CONFIG][1:]
    pod = node.config(APISERVER)
    (container,) = pod["spec"]["containers"]
    assert "kleidi-socket" not in {v["name"] for v in pod["spec"]["volumes"]}
    assert "kleidi-socket" not in {m["name"] for m in container["volumeMounts"]}
    assert f"--encryption-provider-config={CONFIG}" in container["command"]
    assert "kleidi-socket" not in node.path(PATCH).read_text()
    assert apiserver(node, "/readyz")[0] == 200
    # The plugin and its files are gone; the token and its KEKs stay, and the message says where and why.
    wait_for(lambda: "kube-system/kleidi" not in node.pods(), 30, "the agent to stop the plugin's pod", 0.5)
    for gone in ("/etc/kubernetes/manifests/kleidi.yaml", "/etc/kleidi", "/opt/kleidi", "/etc/tmpfiles.d/kleidi.conf"):
        assert not node.path(gone).exists(), f"{gone} is still there"
    assert any(node.path("/var/lib/kleidi/softhsm/tokens").iterdir())
    assert "The KEK stays: the SoftHSM2 token directory /var/lib/kleidi/softhsm/tokens" in said
    assert "etcd snapshots" in said
    # Copies of what was removed, but never of the PIN.
    (stamp,) = [p for p in node.path("/var/backups/kleidi").iterdir() if (p / ".uninstall").exists()]
    assert (stamp / "etc/kleidi/kleidi.yaml").exists() and not (stamp / "etc/kleidi/pin").exists()
    assert node.vars["kleidi_softhsm_pin"] not in "".join(
        p.read_text(errors="replace") for p in stamp.rglob("*") if p.is_file()
    )

    node.run_playbook(REMOVE).assert_unchanged()
    refused = node.run("rollback.yml")
    assert refused.returncode != 0
    assert "run site.yml to install kleidi again" in " ".join(refused.output.split())
