"""playbooks/verify.yml (role kleidi_verify): a read-only report per node, failing with each node's value when the
nodes disagree. Two local nodes as site.yml leaves them (tests/kleidi_nodes.py), each with a real plugin."""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from tests.ansible_run import PlayResult, local_inventory, run_playbook
from tests.backends.softhsm import SoftHsm
from tests.kleidi_nodes import CONFIG, kms_provider, serve_plugin, wired_node
from tests.plugin import REPO
from tests.test_role_kleidi_apiserver import AESCBC_CONFIG, files

pytestmark = pytest.mark.integration

PLAYBOOK = REPO / "playbooks" / "verify.yml"
AESCBC = AESCBC_CONFIG["resources"][0]["providers"][0]


def kleidi_node(root: Path, key_label: str = "kek-1") -> None:
    """Node files after site.yml: the wired apiserver and the kleidi command, kleidi.yaml, two backup runs."""
    wired_node(root)
    (root / "etc/kleidi").mkdir(parents=True)
    kleidi_yaml = {
        "listen": "unix:///run/kleidi/kleidi.sock",
        "provider": "pkcs11",
        "pkcs11": {"module": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "kleidi", "key_label": key_label},
    }
    (root / "etc/kleidi/kleidi.yaml").write_text(yaml.safe_dump(kleidi_yaml))
    for stamp in ("20250101T000000Z", "20250301T120000Z"):
        (root / "var/backups/kleidi" / stamp / "etc").mkdir(parents=True)


@pytest.fixture
def roots(tmp_path: Path) -> list[Path]:
    nodes = [tmp_path / "cp-1", tmp_path / "cp-2"]
    for root in nodes:
        kleidi_node(root)
    return nodes


def verify(tmp_path: Path, roots: list[Path], *args: str) -> tuple[PlayResult, str]:
    inventory = local_inventory(tmp_path / "hosts.yml", {root.name: {"kleidi_node_root": str(root)} for root in roots})
    result = run_playbook(PLAYBOOK, inventory, *args)
    return result, " ".join(result.output.split())


def key_id_of(plugin: object) -> str:
    with plugin.client() as kms:  # type: ignore[attr-defined]
        return str(kms.status().key_id)


def test_nodes_that_agree_pass_with_a_report_per_node_and_change_nothing(tmp_path: Path, roots: list[Path]) -> None:
    hsm = SoftHsm(tmp_path / "hsm")
    hsm.keygen("kek-1")
    with ExitStack() as stack:
        plugins = [serve_plugin(stack, root, hsm) for root in roots]
        key_id = key_id_of(plugins[0])
        before = {root.name: files(root / "etc") for root in roots}
        result, text = verify(tmp_path, roots, "--check")
        result.assert_unchanged()
        checked = text
        result, text = verify(tmp_path, roots)
        result.assert_unchanged()
    assert {root.name: files(root / "etc") for root in roots} == before
    for report in (checked, text):
        assert f"plugin: healthy, key_id {key_id}" in report
        assert "KEK in kleidi.yaml: pkcs11 key_label kek-1" in report
        assert f"EncryptionConfiguration in force: {CONFIG}: secrets: kms:kleidi > aescbc" in report
        assert "kms provider: kleidi at unix:///run/kleidi/kleidi.sock, v2, timeout 3s; writes secrets" in report
        assert f"--encryption-provider-config={CONFIG}, --encryption-provider-config-automatic-reload=true" in report
        assert (
            "apiserver mounts: configuration directory /etc/kubernetes/encryption mounted; socket directory "
            "/run/kleidi mounted"
        ) in report
        assert "backups: 2 runs under /var/backups/kleidi, latest 20250301T120000Z, 20250101T000000Z" in report
        assert f"re-encryption: PENDING for key_id {key_id}: no finished run of playbooks/reencrypt.yml" in report
        assert "Every control-plane node (cp-1, cp-2) agrees: key_id" in report
        assert "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=" not in report, "the aescbc key was printed"
    assert text.count("plugin: healthy") == 2


def test_a_finished_re_encryption_and_a_pending_record_are_reported(tmp_path: Path, roots: list[Path]) -> None:
    hsm = SoftHsm(tmp_path / "hsm")
    hsm.keygen("kek-1")
    state = tmp_path / ".kleidi-state"
    state.mkdir(mode=0o700)
    with ExitStack() as stack:
        plugins = [serve_plugin(stack, root, hsm) for root in roots]
        key_id = key_id_of(plugins[0])
        run = {"run_id": "r1", "key_id": key_id, "direction": "into", "finished": "2025-03-01T12:00:00Z"}
        (state / "reencrypt-r1.json").write_text(json.dumps(run))
        (state / "reencrypt-r0.json").write_text(json.dumps({**run, "run_id": "r0", "key_id": "old", "finished": None}))
        (state / "pending-reencryption.json").write_text(
            json.dumps({"reason": "rotation", "key_id": key_id, "since": "2025-02-01T00:00:00Z"})
        )
        result, text = verify(tmp_path, roots)
        result.assert_ok()
        assert f"re-encryption: done for key_id {key_id} (run r1, finished 2025-03-01T12:00:00Z)" in text
        assert f"recorded as pending by rotation for key_id {key_id} since 2025-02-01T00:00:00Z" in text
        assert "unfinished run (run playbooks/reencrypt.yml to resume it): r0" in text

        (state / "reencrypt-r1.json").unlink()
        result, text = verify(tmp_path, roots, "-e", "kleidi_verify_fail_on_pending=true")
        assert result.returncode != 0
        assert "re-encryption is pending, which kleidi_verify_fail_on_pending makes a failure" in text


def test_nodes_with_different_key_ids_fail_naming_both(tmp_path: Path, roots: list[Path]) -> None:
    with ExitStack() as stack:
        key_ids = {}
        for root in roots:
            hsm = SoftHsm(tmp_path / f"hsm-{root.name}")
            hsm.keygen("kek-1")
            key_ids[root.name] = key_id_of(serve_plugin(stack, root, hsm))
        result, text = verify(tmp_path, roots)
    assert key_ids["cp-1"] != key_ids["cp-2"]
    assert result.returncode != 0
    assert f"key_id (kleidi check) differs: cp-1: {key_ids['cp-1']} cp-2: {key_ids['cp-2']}" in text
    # Everything else is the same, so nothing else is named as differing.
    for label in ("KEK in kleidi.yaml", "EncryptionConfiguration in force", "kms provider", "apiserver"):
        assert f"{label} differs" not in text
    assert "WARNING" not in text


def test_nodes_with_different_encryption_configurations_fail_naming_both(tmp_path: Path, roots: list[Path]) -> None:
    config = roots[1] / CONFIG.lstrip("/")
    changed = yaml.safe_load(config.read_text())
    changed["resources"][0]["resources"].append("configmaps")
    config.write_text(yaml.safe_dump(changed, sort_keys=False))
    hsm = SoftHsm(tmp_path / "hsm")
    hsm.keygen("kek-1")
    with ExitStack() as stack:
        for root in roots:
            serve_plugin(stack, root, hsm)
        result, text = verify(tmp_path, roots)
    assert result.returncode != 0
    assert "EncryptionConfiguration in force differs:" in text
    assert f"cp-1: {CONFIG}: secrets: kms:kleidi > aescbc" in text
    assert f"cp-2: {CONFIG}: secrets,configmaps: kms:kleidi > aescbc" in text
    assert (
        "kms provider differs: cp-1: kleidi at unix:///run/kleidi/kleidi.sock, v2, timeout 3s; writes secrets" in text
    )
    assert "key_id (kleidi check) differs" not in text


def test_a_node_without_a_plugin_or_a_mount_is_a_problem(tmp_path: Path, roots: list[Path]) -> None:
    manifest = roots[1] / "etc/kubernetes/manifests/kube-apiserver.yaml"
    pod = yaml.safe_load(manifest.read_text())
    container = pod["spec"]["containers"][0]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "kleidi-socket"]
    manifest.write_text(yaml.safe_dump(pod))
    hsm = SoftHsm(tmp_path / "hsm")
    hsm.keygen("kek-1")
    with ExitStack() as stack:
        serve_plugin(stack, roots[0], hsm)
        result, text = verify(tmp_path, roots)
    assert result.returncode != 0
    assert "cp-2: no healthy plugin: kleidi check failed on /run/kleidi/kleidi.sock" in text
    assert "cp-2: the apiserver does not mount the socket directory /run/kleidi" in text
    assert "plugin: NOT healthy" in text
    assert "cp-1: no healthy plugin" not in text and "cp-1: the apiserver does not mount" not in text


def rke2_node(root: Path) -> None:
    """An RKE2 server after site.yml: kleidi's EncryptionConfiguration and the drop-in pointing the apiserver at it."""
    kleidi_node(root)
    shutil.rmtree(root / "etc/kubernetes")
    config = root / "etc/rancher/rke2/kleidi/encryption-config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "apiserver.config.k8s.io/v1",
                "kind": "EncryptionConfiguration",
                "resources": [{"resources": ["secrets"], "providers": [{"kms": kms_provider()}, AESCBC]}],
            }
        )
    )
    dropin = root / "etc/rancher/rke2/config.yaml.d/50-kleidi.yaml"
    dropin.parent.mkdir(parents=True)
    dropin.write_text(
        "kube-apiserver-arg+:\n"
        "  - encryption-provider-config=/etc/rancher/rke2/kleidi/encryption-config.yaml\n"
        "  - encryption-provider-config-automatic-reload=true\n"
        "kube-apiserver-extra-mount+:\n"
        "  - /etc/rancher/rke2/kleidi:/etc/rancher/rke2/kleidi:ro\n"
        "  - /run/kleidi:/run/kleidi\n"
    )


def test_rke2_nodes_are_read_from_kleidi_s_drop_in(tmp_path: Path) -> None:
    roots = [tmp_path / "cp-1"]
    rke2_node(roots[0])
    hsm = SoftHsm(tmp_path / "hsm")
    hsm.keygen("kek-1")
    inventory = local_inventory(
        tmp_path / "hosts.yml", {"cp-1": {"kleidi_node_root": str(roots[0]), "kleidi_distribution": "rke2"}}
    )
    with ExitStack() as stack:
        serve_plugin(stack, roots[0], hsm)
        result = run_playbook(PLAYBOOK, inventory).assert_unchanged()
        text = " ".join(result.output.split())
        assert (
            "EncryptionConfiguration in force: /etc/rancher/rke2/kleidi/encryption-config.yaml: secrets: kms:kleidi > "
            "aescbc"
        ) in text
        assert "apiserver (rke2): --encryption-provider-config=/etc/rancher/rke2/kleidi/encryption-config.yaml" in text
        assert (
            "apiserver mounts: configuration directory /etc/rancher/rke2/kleidi mounted; socket directory /run/kleidi "
            "mounted"
        ) in text
        dropin = roots[0] / "etc/rancher/rke2/config.yaml.d/50-kleidi.yaml"
        dropin.write_text(dropin.read_text().replace("  - /run/kleidi:/run/kleidi\n", ""))
        result = run_playbook(PLAYBOOK, inventory)
    assert result.returncode != 0
    assert "cp-1: the apiserver does not mount the socket directory /run/kleidi" in " ".join(result.output.split())
