"""The kleidi_apiserver role's structured edits: EncryptionConfiguration merge and manifest changes."""

from __future__ import annotations

import copy

import pytest

from tests.role_modules import apiserver_module

pytestmark = pytest.mark.unit

enc = apiserver_module("kleidi_encryption_config")
manifest = apiserver_module("kleidi_apiserver_manifest")

KMS = {"apiVersion": "v2", "name": "kleidi", "endpoint": "unix:///run/kleidi/kleidi.sock", "timeout": "3s"}
AESCBC = {"aescbc": {"keys": [{"name": "key1", "secret": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTEyMzQ="}]}}


def config(*entries: dict[str, object]) -> dict[str, object]:
    return {"apiVersion": enc.API_VERSION, "kind": enc.KIND, "resources": list(entries)}


def test_no_configuration_yet_means_kms_then_identity_for_the_plaintext_already_stored() -> None:
    merged = enc.merge(None, ["secrets"], KMS)
    assert merged["resources"] == [{"resources": ["secrets"], "providers": [{"kms": KMS}, {"identity": {}}]}]


def test_an_aescbc_configuration_keeps_its_provider_and_keys_after_kms() -> None:
    merged = enc.merge(config({"resources": ["secrets"], "providers": [AESCBC, {"identity": {}}]}), ["secrets"], KMS)
    assert merged["resources"][0]["providers"] == [{"kms": KMS}, AESCBC, {"identity": {}}]


def test_identity_is_added_only_where_plaintext_may_exist() -> None:
    merged = enc.merge(config({"resources": ["secrets"], "providers": [AESCBC]}), ["secrets"], KMS)
    assert merged["resources"][0]["providers"] == [{"kms": KMS}, AESCBC]


def test_merging_twice_changes_nothing() -> None:
    once = enc.merge(config({"resources": ["secrets"], "providers": [AESCBC, {"identity": {}}]}), ["secrets"], KMS)
    assert enc.merge(copy.deepcopy(once), ["secrets"], KMS) == once


def test_an_old_kleidi_provider_is_replaced_not_duplicated() -> None:
    old = {**KMS, "timeout": "10s"}
    merged = enc.merge(config({"resources": ["secrets"], "providers": [{"kms": old}, AESCBC]}), ["secrets"], KMS)
    assert merged["resources"][0]["providers"] == [{"kms": KMS}, AESCBC]


def test_a_shared_entry_is_split_so_other_resources_keep_exactly_their_providers() -> None:
    existing = config(
        {"resources": ["secrets", "configmaps"], "providers": [AESCBC, {"identity": {}}]},
        {"resources": ["*.*"], "providers": [{"identity": {}}]},
    )
    merged = enc.merge(existing, ["secrets"], KMS)
    assert merged["resources"] == [
        {"resources": ["secrets"], "providers": [{"kms": KMS}, AESCBC, {"identity": {}}]},
        {"resources": ["configmaps"], "providers": [AESCBC, {"identity": {}}]},
        {"resources": ["*.*"], "providers": [{"identity": {}}]},
    ]


def test_a_resource_under_a_wildcard_keeps_the_wildcards_providers_after_kms() -> None:
    existing = config({"resources": ["*.*"], "providers": [AESCBC]})
    merged = enc.merge(existing, ["secrets"], KMS)
    assert merged["resources"] == [
        {"resources": ["secrets"], "providers": [{"kms": KMS}, AESCBC]},
        {"resources": ["*.*"], "providers": [AESCBC]},
    ]


def test_core_and_group_wildcards_apply_only_to_their_group() -> None:
    existing = config(
        {"resources": ["*."], "providers": [AESCBC, {"identity": {}}]},
        {"resources": ["*.apps"], "providers": [{"identity": {}}]},
    )
    merged = enc.merge(existing, ["secrets", "deployments.apps", "widgets.example.com"], KMS)
    assert merged["resources"][:3] == [
        {"resources": ["secrets"], "providers": [{"kms": KMS}, AESCBC, {"identity": {}}]},
        {"resources": ["deployments.apps", "widgets.example.com"], "providers": [{"kms": KMS}, {"identity": {}}]},
        {"resources": ["*."], "providers": [AESCBC, {"identity": {}}]},
    ]


def test_a_resource_never_configured_goes_ahead_of_every_entry() -> None:
    existing = config({"resources": ["configmaps"], "providers": [AESCBC]})
    merged = enc.merge(existing, ["secrets"], KMS)
    assert merged["resources"][0] == {"resources": ["secrets"], "providers": [{"kms": KMS}, {"identity": {}}]}


def test_the_returned_configuration_never_shows_a_key() -> None:
    text = enc._redact_text("- aescbc:\n    keys:\n    - name: key1\n      secret: c2VjcmV0\n")
    assert "c2VjcmV0" not in text and "secret: <redacted>" in text


def apiserver_pod(command: list[str], mounts: list[dict[str, object]], volumes: list[dict[str, object]]) -> dict:
    container = {"name": "kube-apiserver", "image": "registry.k8s.io/kube-apiserver:v1.31.4", "command": command}
    container["volumeMounts"] = mounts
    return {"apiVersion": "v1", "kind": "Pod", "spec": {"containers": [container], "volumes": volumes}}


MOUNTS = [
    {"name": "kleidi-encryption-config", "path": "/etc/kubernetes/enc", "read_only": True},
    {"name": "kleidi-socket", "path": "/run/kleidi"},
]
FLAGS = {
    "encryption-provider-config": "/etc/kubernetes/enc/config.yaml",
    "encryption-provider-config-automatic-reload": "true",
}


def test_flags_are_set_once_and_mounts_added_with_their_volumes() -> None:
    pod = apiserver_pod(["kube-apiserver", "--encryption-provider-config=/old.yaml", "--secure-port=6443"], [], [])
    changed = manifest.apply(pod, "kube-apiserver", FLAGS, MOUNTS, "kube-apiserver.yaml")
    command = changed["spec"]["containers"][0]["command"]
    assert command == [
        "kube-apiserver",
        "--encryption-provider-config=/etc/kubernetes/enc/config.yaml",
        "--secure-port=6443",
        "--encryption-provider-config-automatic-reload=true",
    ]
    assert changed["spec"]["containers"][0]["volumeMounts"] == [
        {"name": "kleidi-encryption-config", "mountPath": "/etc/kubernetes/enc", "readOnly": True},
        {"name": "kleidi-socket", "mountPath": "/run/kleidi"},
    ]
    assert {v["name"]: v["hostPath"]["path"] for v in changed["spec"]["volumes"]} == {
        "kleidi-encryption-config": "/etc/kubernetes/enc",
        "kleidi-socket": "/run/kleidi",
    }
    again = manifest.apply(copy.deepcopy(changed), "kube-apiserver", FLAGS, MOUNTS, "kube-apiserver.yaml")
    assert again == changed


def test_a_path_the_pod_already_sees_from_the_same_host_path_is_not_mounted_twice() -> None:
    pod = apiserver_pod(
        ["kube-apiserver"],
        [{"name": "k8s", "mountPath": "/etc/kubernetes", "readOnly": True}],
        [{"name": "k8s", "hostPath": {"path": "/etc/kubernetes", "type": "DirectoryOrCreate"}}],
    )
    changed = manifest.apply(pod, "kube-apiserver", FLAGS, MOUNTS, "kube-apiserver.yaml")
    assert [m["name"] for m in changed["spec"]["containers"][0]["volumeMounts"]] == ["k8s", "kleidi-socket"]


def test_something_else_mounted_at_the_socket_directory_is_refused() -> None:
    pod = apiserver_pod(
        ["kube-apiserver"],
        [{"name": "other", "mountPath": "/run/kleidi"}],
        [{"name": "other", "hostPath": {"path": "/srv/elsewhere"}}],
    )
    with pytest.raises(ValueError, match="already mounts something else at /run/kleidi"):
        manifest.apply(pod, "kube-apiserver", FLAGS, MOUNTS, "kube-apiserver.yaml")


def test_the_kubeadm_patch_appends_the_flags_and_only_kleidis_own_volumes() -> None:
    pod = apiserver_pod(
        ["kube-apiserver"],
        [{"name": "k8s", "mountPath": "/etc/kubernetes", "readOnly": True}],
        [{"name": "k8s", "hostPath": {"path": "/etc/kubernetes"}}],
    )
    changed = manifest.apply(pod, "kube-apiserver", FLAGS, MOUNTS, "kube-apiserver.yaml")
    ops = manifest.kubeadm_patch(changed, "kube-apiserver", FLAGS, MOUNTS, "kube-apiserver.yaml")
    assert [op["path"] for op in ops] == [
        "/spec/containers/0/command/-",
        "/spec/containers/0/command/-",
        "/spec/containers/0/volumeMounts/-",
        "/spec/volumes/-",
    ]
    assert all(op["op"] == "add" for op in ops)
    assert ops[2]["value"]["name"] == "kleidi-socket"


def test_the_kubernetes_version_comes_from_the_image_tag() -> None:
    pod = apiserver_pod([], [], [])
    assert manifest.kubernetes_version(pod["spec"]["containers"][0]) == "1.31"
    assert manifest.kubernetes_version({"image": "rancher/hardened-kubernetes:v1.28.9-rke2r1-build2024"}) == "1.28"
