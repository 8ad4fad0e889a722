"""The structured edits behind rollback.yml and uninstall.yml, as pure functions on real files: which run a rollback
undoes and on which nodes, what it restores, keeps and refuses on a node, and the EncryptionConfiguration and
manifest steps of a safe removal."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.role_modules import ROLES, apiserver_module, load

pytestmark = pytest.mark.unit

enc = apiserver_module("kleidi_encryption_config")
manifest = apiserver_module("kleidi_apiserver_manifest")
files = load(ROLES / "kleidi" / "module_utils" / "kleidi_files.py", "ansible.module_utils.kleidi_files")
rollback = load(ROLES / "kleidi_rollback" / "library" / "kleidi_rollback.py", "kleidi_role_rollback")
choose = load(ROLES / "kleidi_rollback" / "filter_plugins" / "kleidi_rollback.py", "kleidi_role_rollback_filters")

KMS = {"apiVersion": "v2", "name": "kleidi", "endpoint": "unix:///run/kleidi/kleidi.sock", "timeout": "3s"}
OTHER_KMS = {"apiVersion": "v2", "name": "vendor", "endpoint": "unix:///run/vendor.sock"}
AESCBC = {"aescbc": {"keys": [{"name": "key1", "secret": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTEyMzQ="}]}}
IDENTITY: dict[str, Any] = {"identity": {}}


def config(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": enc.API_VERSION, "kind": enc.KIND, "resources": list(entries)}


# --- uninstall: kms last, then out ------------------------------------------------------------------------------


def test_demoting_puts_the_provider_kleidi_found_first_again_and_kms_last() -> None:
    merged = enc.merge(config({"resources": ["secrets"], "providers": [AESCBC]}), ["secrets"], KMS)
    demoted = enc.demote(merged, "kleidi")
    assert demoted["resources"][0]["providers"] == [AESCBC, {"kms": KMS}]
    assert enc.demote(copy.deepcopy(demoted), "kleidi") == demoted


def test_demoting_a_resource_kleidi_was_the_only_encryption_of_writes_plaintext_and_still_reads_kms() -> None:
    merged = enc.merge(None, ["secrets"], KMS)  # kms, identity
    assert enc.demote(merged, "kleidi")["resources"][0]["providers"] == [IDENTITY, {"kms": KMS}]
    alone = config({"resources": ["secrets"], "providers": [{"kms": KMS}]})
    assert enc.demote(alone, "kleidi")["resources"][0]["providers"] == [IDENTITY, {"kms": KMS}]


def test_demoting_and_removing_leave_every_other_entry_and_provider_alone() -> None:
    existing = config(
        {"resources": ["secrets"], "providers": [{"kms": KMS}, {"kms": OTHER_KMS}, AESCBC, IDENTITY]},
        {"resources": ["configmaps"], "providers": [{"kms": OTHER_KMS}, IDENTITY]},
    )
    demoted = enc.demote(existing, "kleidi")
    assert demoted["resources"] == [
        {"resources": ["secrets"], "providers": [{"kms": OTHER_KMS}, AESCBC, IDENTITY, {"kms": KMS}]},
        existing["resources"][1],
    ]
    assert enc.decrypting(demoted, "kleidi") == ["secrets"]
    removed = enc.remove(demoted, "kleidi")
    assert removed["resources"] == [
        {"resources": ["secrets"], "providers": [{"kms": OTHER_KMS}, AESCBC, IDENTITY]},
        existing["resources"][1],
    ]
    assert enc.decrypting(removed, "kleidi") == []
    assert not enc.identity_only(removed)


def test_removing_kms_from_a_resource_it_alone_encrypted_leaves_identity() -> None:
    demoted = enc.demote(enc.merge(None, ["secrets"], KMS), "kleidi")
    removed = enc.remove(demoted, "kleidi")
    assert removed["resources"] == [{"resources": ["secrets"], "providers": [IDENTITY]}]
    assert enc.identity_only(removed)


def test_the_manifest_loses_only_the_flags_and_volumes_it_is_told_to_remove() -> None:
    pod = {
        "spec": {
            "containers": [
                {
                    "name": "kube-apiserver",
                    "command": [
                        "kube-apiserver",
                        "--advertise-address=10.0.0.1",
                        "--encryption-provider-config=/etc/kubernetes/enc/encryption-config.yaml",
                        "--encryption-provider-config-automatic-reload=true",
                    ],
                    "volumeMounts": [
                        {"name": "k8s-certs", "mountPath": "/etc/kubernetes/pki"},
                        {"name": "kleidi-socket", "mountPath": "/run/kleidi"},
                    ],
                }
            ],
            "volumes": [
                {"name": "k8s-certs", "hostPath": {"path": "/etc/kubernetes/pki"}},
                {"name": "kleidi-socket", "hostPath": {"path": "/run/kleidi"}},
            ],
        }
    }
    stripped = manifest.strip(copy.deepcopy(pod), "kube-apiserver", set(), {"kleidi-socket"}, "m")
    container = stripped["spec"]["containers"][0]
    assert container["command"] == pod["spec"]["containers"][0]["command"]
    assert [m["name"] for m in container["volumeMounts"]] == ["k8s-certs"]
    assert [v["name"] for v in stripped["spec"]["volumes"]] == ["k8s-certs"]
    flags = {"encryption-provider-config", "encryption-provider-config-automatic-reload"}
    both = manifest.strip(copy.deepcopy(pod), "kube-apiserver", flags, {"kleidi-socket"}, "m")
    assert both["spec"]["containers"][0]["command"] == ["kube-apiserver", "--advertise-address=10.0.0.1"]


# --- rollback: which run --------------------------------------------------------------------------------------


def run(stamp: str, rollback_of: str | None = None, rolled_back_by: str | None = None) -> dict[str, Any]:
    return {"stamp": stamp, "rollback_of": rollback_of, "rolled_back_by": rolled_back_by, "uninstall": False}


def test_the_last_changing_run_is_rolled_back_on_the_nodes_it_changed() -> None:
    chosen = choose.kleidi_rollback_choose(
        {"cp-1": [run("20250101T000000Z"), run("20250102T000000Z")], "cp-2": [run("20250101T000000Z")], "cp-3": []}
    )
    assert (chosen["stamp"], chosen["hosts"], chosen["done"], chosen["error"]) == (
        "20250102T000000Z",
        ["cp-1"],
        False,
        "",
    )


def test_a_second_rollback_does_nothing_and_says_how_to_go_further_or_undo() -> None:
    runs = {
        host: [run("20250101T000000Z"), run("20250102T000000Z", rolled_back_by="20250103T000000Z"),
               run("20250103T000000Z", rollback_of="20250102T000000Z")]
        for host in ("cp-1", "cp-2")
    }  # fmt: skip
    chosen = choose.kleidi_rollback_choose(runs)
    assert chosen["done"] and chosen["hosts"] == []
    assert "kleidi_rollback_stamp=20250101T000000Z" in chosen["message"]
    assert "kleidi_rollback_stamp=20250103T000000Z" in chosen["message"]
    undo = choose.kleidi_rollback_choose(runs, "20250103T000000Z")
    assert (undo["stamp"], undo["hosts"], undo["done"]) == ("20250103T000000Z", ["cp-1", "cp-2"], False)


def test_a_rollback_that_stopped_halfway_resumes_on_the_nodes_left() -> None:
    done = [run("20250102T000000Z", rolled_back_by="20250103T000000Z"), run("20250103T000000Z", "20250102T000000Z")]
    chosen = choose.kleidi_rollback_choose(
        {"cp-1": done, "cp-2": [run("20250102T000000Z"), run("20250103T000000Z", "20250102T000000Z")],
         "cp-3": [run("20250102T000000Z")]}
    )  # fmt: skip
    assert (chosen["stamp"], chosen["hosts"]) == ("20250102T000000Z", ["cp-2", "cp-3"])


def test_an_older_run_is_never_rolled_back_underneath_a_newer_one_still_in_force() -> None:
    runs = {"cp-1": [run("20250101T000000Z"), run("20250102T000000Z")]}
    assert "roll it back first" in choose.kleidi_rollback_choose(runs, "20250101T000000Z")["error"]
    assert "no node holds backups of run 2024" in choose.kleidi_rollback_choose(runs, "20240101T000000Z")["error"]
    assert choose.kleidi_rollback_choose({"cp-1": []})["done"]


def test_only_the_last_finished_reencryption_under_kleidi_counts(tmp_path: Path) -> None:
    assert not choose.kleidi_rollback_reencrypted(str(tmp_path / "missing"), "kleidi")
    (tmp_path / "reencrypt-a.json").write_text('{"provider": "kleidi", "finished": null}')
    (tmp_path / "reencrypt-b.json").write_text('{"provider": "vendor", "finished": "2025-01-01T00:00:00Z"}')
    (tmp_path / "rotate.json").write_text('{"provider": "kleidi", "finished": "2025-01-01T00:00:00Z"}')
    assert not choose.kleidi_rollback_reencrypted(str(tmp_path), "kleidi")
    (tmp_path / "reencrypt-c.json").write_text('{"provider": "kleidi", "finished": "2025-01-02T00:00:00Z"}')
    assert choose.kleidi_rollback_reencrypted(str(tmp_path), "kleidi")
    # uninstall.yml's re-encryption away from kms, finished later, takes everything out from under it again.
    away = '{"provider": "kleidi", "direction": "away", "finished": "2025-01-03T00:00:00Z"}'
    (tmp_path / "reencrypt-d.json").write_text(away)
    assert not choose.kleidi_rollback_reencrypted(str(tmp_path), "kleidi")
    (tmp_path / "reencrypt-e.json").write_text('{"provider": "kleidi", "direction": "into", "finished": "2025-01-04"}')
    assert choose.kleidi_rollback_reencrypted(str(tmp_path), "kleidi")


# --- rollback: what, on one node --------------------------------------------------------------------------------

STAMP = "20250102T030405Z"
APISERVER = "/etc/kubernetes/manifests/kube-apiserver.yaml"
ENC = "/etc/kubernetes/enc/encryption-config.yaml"
KLEIDI_YAML = "/etc/kleidi/kleidi.yaml"
PLUGIN_POD = "/etc/kubernetes/manifests/kleidi.yaml"


class Node:
    """A node root with a run's backup directory, as kleidi_file leaves them."""

    def __init__(self, base: Path) -> None:
        self.root = base / "node"
        self.backups = self.root / "var/backups/kleidi"

    def write(self, path: str, data: Any, mode: int = 0o600, uid: int = 0) -> Path:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        target.chmod(mode)
        os.chown(target, uid, uid)
        return target

    def change(self, path: str, data: Any) -> None:
        """What a kleidi run does: the old file copied (or the new one listed), then written."""
        files.backup_file(None, str(self.root) + path, str(self.backups), STAMP, str(self.root))
        target = self.root / path.lstrip("/")
        existed = target.exists()
        info = target.stat() if existed else None
        self.write(path, data, info.st_mode & 0o777 if info else 0o600, info.st_uid if info else 0)

    def plan(self, **params: Any) -> Any:
        return rollback.Plan(
            {
                "root": str(self.root),
                "backup_dir": str(self.backups),
                "stamp": STAMP,
                "kms_name": "kleidi",
                "distribution": "kubeadm",
                "apiserver_files": {"manifest": APISERVER, "kubeadm_patch": "/etc/kubernetes/patches/p.yaml"},
                "plugin_files": {"config": KLEIDI_YAML, "manifest": PLUGIN_POD, "unit": "/etc/systemd/kleidi.service"},
                **params,
            }
        )


def apiserver_pod(config_path: str | None) -> dict[str, Any]:
    flags = [f"--encryption-provider-config={config_path}"] if config_path else []
    return {"spec": {"containers": [{"name": "kube-apiserver", "command": ["kube-apiserver", *flags]}]}}


def kleidi_yaml(label: str, log_level: str = "info") -> dict[str, Any]:
    return {"provider": "pkcs11", "log_level": log_level, "pkcs11": {"token_label": "kleidi", "key_label": label}}


@pytest.fixture
def node(tmp_path: Path) -> Node:
    made = Node(tmp_path)
    made.write(APISERVER, apiserver_pod(ENC))
    made.write(ENC, config({"resources": ["secrets"], "providers": [{"kms": KMS}, AESCBC]}))
    made.write(KLEIDI_YAML, kleidi_yaml("kleidi-kek-1"), uid=10001)
    made.write(PLUGIN_POD, {"metadata": {"annotations": {"checksum": "1"}}})
    return made


def test_a_log_level_change_is_restored_and_the_apiserver_left_alone(node: Node) -> None:
    node.change(KLEIDI_YAML, kleidi_yaml("kleidi-kek-1", "debug"))
    node.change(PLUGIN_POD, {"metadata": {"annotations": {"checksum": "2"}}})
    plan = node.plan()
    report = plan.report()
    assert report["restore"] == [KLEIDI_YAML, PLUGIN_POD]
    assert report["remove"] == [] and report["keep"] == [] and report["rotation"] is None
    assert report["to_change"] == {"plugin": [KLEIDI_YAML, PLUGIN_POD], "apiserver": [], "cleanup": []}
    assert (report["expect"], report["kms_now"], report["kms_after"]) == ("none", ["secrets"], ["secrets"])
    assert plan.refusals(False, True, False) == []


def test_a_kek_change_keeps_kleidi_yaml_and_the_plugin_pod_of_that_run(node: Node) -> None:
    node.change(KLEIDI_YAML, kleidi_yaml("kleidi-kek-2"))
    node.change(PLUGIN_POD, {"metadata": {"annotations": {"checksum": "2"}}})
    node.change("/etc/tmpfiles.d/kleidi.conf", "d /run/kleidi 0750 10001 10001 -\n")
    report = node.plan().report()
    assert report["rotation"] == {
        "before": {"provider": "pkcs11", "token_label": "kleidi", "key_label": "kleidi-kek-1"},
        "after": {"provider": "pkcs11", "token_label": "kleidi", "key_label": "kleidi-kek-2"},
    }
    assert [k["path"] for k in report["keep"]] == [KLEIDI_YAML, PLUGIN_POD]
    assert "roll forward" in report["keep"][0]["why"]
    assert report["restore"] == [] and report["remove"] == ["/etc/tmpfiles.d/kleidi.conf"]


def test_restoring_a_configuration_without_kms_is_refused_after_a_reencryption_and_needs_consent_before(
    node: Node,
) -> None:
    node.write(ENC, config({"resources": ["secrets"], "providers": [AESCBC]}))
    node.change(ENC, config({"resources": ["secrets"], "providers": [{"kms": KMS}, AESCBC]}))  # a site.yml run
    plan = node.plan()
    assert (plan.kms_now, plan.kms_after, plan.dropped) == (["secrets"], [], ["secrets"])
    assert plan.expect() == "reload"
    hard = plan.refusals(True, True, False)
    assert [r["hard"] for r in hard] == [True] and "run uninstall.yml" in hard[0]["msg"]
    soft = plan.refusals(False, False, False)
    assert [r["hard"] for r in soft] == [False] and "kleidi_rollback_drop_kms=true" in soft[0]["msg"]
    assert plan.refusals(True, False, False) == []


def test_an_install_rolled_back_drops_kms_with_the_flag_and_removes_what_it_created(node: Node) -> None:
    # The state before the install: no flag, no configuration, no plugin.
    for path in (ENC, KLEIDI_YAML, PLUGIN_POD):
        (node.root / path.lstrip("/")).unlink()
    node.write(APISERVER, apiserver_pod(None))
    node.change(ENC, config({"resources": ["secrets"], "providers": [{"kms": KMS}, IDENTITY]}))
    node.change(KLEIDI_YAML, kleidi_yaml("kleidi-kek-1"))
    node.change(PLUGIN_POD, {"kind": "Pod"})
    node.change(APISERVER, apiserver_pod(ENC))
    plan = node.plan()
    report = plan.report()
    assert report["restore"] == [APISERVER]
    assert report["remove"] == [ENC, KLEIDI_YAML, PLUGIN_POD]
    assert report["to_change"] == {"plugin": [], "apiserver": [APISERVER, ENC], "cleanup": [KLEIDI_YAML, PLUGIN_POD]}
    assert (report["config_now"], report["config_after"], report["expect"]) == (ENC, None, "restart")
    assert (report["dropped"], report["wait_for_kms"]) == (["secrets"], False)
    assert [r["hard"] for r in plan.refusals(False, False, False)] == [False]
    assert plan.refusals(True, False, False) == []


def test_the_plugin_is_never_removed_while_the_apiserver_still_reads_kms(node: Node) -> None:
    (node.root / PLUGIN_POD.lstrip("/")).unlink()
    node.change(PLUGIN_POD, {"kind": "Pod"})  # created by the run; the configuration with kms was there before
    refusals = node.plan().refusals(True, False, False)
    assert [r["hard"] for r in refusals] == [True] and "still reads" in refusals[0]["msg"]


def test_a_run_that_removed_kleidi_is_not_rolled_back(node: Node) -> None:
    assert node.plan().refusals(True, False, True)[0]["hard"]


def test_a_restored_file_gets_its_bytes_mode_and_owner_back_and_what_it_replaces_is_kept(node: Node) -> None:
    node.change(KLEIDI_YAML, kleidi_yaml("kleidi-kek-1", "debug"))
    before = node.backups / STAMP / KLEIDI_YAML.lstrip("/")
    target = node.root / KLEIDI_YAML.lstrip("/")
    os.chown(target, 0, 0)
    target.chmod(0o644)
    saved = rollback.restore_file(None, str(before), str(target), str(node.backups), "OWN", str(node.root))
    assert target.read_bytes() == before.read_bytes()
    info = target.stat()
    assert (info.st_mode & 0o7777, info.st_uid, info.st_gid) == (0o600, 10001, 10001)
    assert yaml.safe_load(Path(saved).read_text())["log_level"] == "debug"
    assert rollback.backed_up(str(node.backups / STAMP)) == [KLEIDI_YAML]
