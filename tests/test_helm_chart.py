"""The Helm chart, through the real Helm CLI: lint, render, Kubernetes schemas, and what the rendered objects do.

The static pod agreement test renders the DaemonSet and the Ansible static pod from the same values and requires
the same container: command, env, mounts, probes, resources, security context and image."""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import kleidi
from kleidi import config as kleidi_config
from scripts.values_doc import load_values
from tests.helm import CHART, helm, render
from tests.plugin import KleidiProcess
from tests.role_modules import pod_filters

pytestmark = pytest.mark.integration

pod = pod_filters()
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBERNETES_VERSIONS = ("1.29", "1.31", "1.33")


def merged_values(values_file: Path | None) -> dict[str, Any]:
    """values.yaml with a values file over it, merged as Helm merges: maps key by key, anything else replaced."""

    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            out = dict(base)
            for key, value in over.items():
                out[key] = merge(base.get(key), value) if key in base else value
            return out
        return copy.deepcopy(over)

    values = load_values()
    return merge(values, yaml.safe_load(values_file.read_text())) if values_file else values


def kinds(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}


def daemonset(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [obj for obj in objects if obj["kind"] == "DaemonSet"]
    return found


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = daemonset(objects)["spec"]["template"]["spec"]
    return spec


def plugin_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = pod_spec(objects)["containers"]
    return container


def config_map_text(objects: list[dict[str, Any]]) -> str:
    (found,) = [obj for obj in objects if obj["kind"] == "ConfigMap" and "kleidi.yaml" in obj["data"]]
    text: str = found["data"]["kleidi.yaml"]
    return text


@pytest.fixture(scope="module")
def default_objects() -> list[dict[str, Any]]:
    return render()


@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_helm_lint_strict_passes(values_file: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values_file)] if values_file else [])
    assert "0 chart(s) failed" in helm(*args).stdout


@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_every_rendered_object_is_valid_for_every_supported_kubernetes(values_file: Path | None) -> None:
    objects = render(*([values_file] if values_file else []))
    assert {obj["kind"] for obj in objects} >= {"DaemonSet", "ConfigMap", "ServiceAccount", "Pod"}
    for obj in objects:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_the_daemonset_and_the_static_pod_run_the_same_container(values_file: Path) -> None:
    values = merged_values(values_file)
    static = pod.static_pod(values, kleidi.__version__, "x")
    (static_container,) = static["spec"]["containers"]
    assert plugin_container(render(values_file)) == static_container
    # Same host paths behind the mounts the two share (the config and credentials sources differ by design).
    chart_volumes = {v["name"]: v for v in pod_spec(render(values_file))["volumes"]}
    for volume in static["spec"]["volumes"]:
        if volume["name"] not in ("config", "credentials"):
            assert chart_volumes[volume["name"]] == volume


def test_the_chart_runs_the_kleidi_version_the_ansible_role_installs() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == chart["version"] == kleidi.__version__


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_the_config_map_is_a_kleidi_yaml_that_kleidis_loader_accepts(values_file: Path, tmp_path: Path) -> None:
    text = config_map_text(render(values_file))
    assert yaml.safe_load(text) == pod.plugin_config(merged_values(values_file))
    path = tmp_path / "kleidi.yaml"
    path.write_text(text)
    loaded = kleidi_config.load(path)
    assert loaded.provider == merged_values(values_file)["config"]["provider"]


def test_the_daemonset_runs_on_control_plane_nodes_of_kubeadm_and_rke2(default_objects: list[dict[str, Any]]) -> None:
    spec = pod_spec(default_objects)
    (term,) = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    # Exists: kubeadm sets the label to "" and RKE2 to "true".
    assert term["matchExpressions"] == [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]
    tolerated = {(t["key"], t.get("effect")) for t in spec["tolerations"] if t["operator"] == "Exists"}
    assert ("node-role.kubernetes.io/control-plane", "NoSchedule") in tolerated  # kubeadm and RKE2
    assert ("node-role.kubernetes.io/etcd", "NoExecute") in tolerated  # RKE2 etcd nodes
    assert ("CriticalAddonsOnly", None) in tolerated  # RKE2's control-plane-only taint
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["hostNetwork"] is True
    # The node's resolver: cluster DNS cannot answer before the apiservers can read Secrets (cold start).
    assert spec["dnsPolicy"] == "Default"


def test_placement_is_overridable() -> None:
    objects = render(set_values={"nodeSelector.kleidi": "yes", "tolerations": "null"})
    spec = pod_spec(objects)
    assert spec["nodeSelector"] == {"kleidi": "yes"}
    assert "tolerations" not in spec


def test_an_update_never_runs_two_plugins_on_one_node(default_objects: list[dict[str, Any]]) -> None:
    strategy = daemonset(default_objects)["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxSurge"] == 0


def test_helm_uninstall_leaves_the_plugin_and_what_it_mounts(default_objects: list[dict[str, Any]]) -> None:
    for obj in default_objects:
        if obj["kind"] in ("DaemonSet", "ConfigMap", "ServiceAccount"):
            assert obj["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep", obj["metadata"]["name"]


def test_probes_reach_the_plugin_where_it_listens(default_objects: list[dict[str, Any]]) -> None:
    container = plugin_container(default_objects)
    assert container["livenessProbe"]["httpGet"] == {
        "path": "/livez",
        "port": 8095,
        "scheme": "HTTP",
        "host": "127.0.0.1",
    }
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Without hostNetwork the kubelet probes the pod's address, which a wildcard listener answers.
    own_network = render(set_values={"hostNetwork": "false", "config.metrics_listen": "0.0.0.0:8095"})
    assert "host" not in plugin_container(own_network)["livenessProbe"]["httpGet"]


def test_a_loopback_listener_without_host_network_is_refused() -> None:
    done = helm("template", str(CHART), "--set", "hostNetwork=false", check=False)
    assert done.returncode != 0 and "0.0.0.0:<port>" in done.stderr


def test_every_container_runs_confined(default_objects: list[dict[str, Any]]) -> None:
    spec = pod_spec(default_objects)
    test_pod = next(obj for obj in default_objects if obj["kind"] == "Pod")
    for container in spec["initContainers"] + spec["containers"] + test_pod["spec"]["containers"]:
        security = container["securityContext"]
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, container["name"]
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
        # The guard chowns a socket directory the kubelet made for root; nothing else keeps a capability.
        assert security["capabilities"] == (
            {"drop": ["ALL"], "add": ["CHOWN"]} if container["name"] == "guard" else {"drop": ["ALL"]}
        )
        assert "resources" in container
    plugin = plugin_container(default_objects)["securityContext"]
    assert plugin["runAsNonRoot"] is True and plugin["runAsUser"] == 10001
    assert spec["automountServiceAccountToken"] is False


def test_kleidi_yaml_comes_from_the_config_map_and_credentials_from_the_host(
    default_objects: list[dict[str, Any]],
) -> None:
    volumes = {v["name"]: v for v in pod_spec(default_objects)["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "kleidi"
    assert volumes["credentials"]["hostPath"] == {"path": "/etc/kleidi", "type": "Directory"}
    assert volumes["socket"]["hostPath"] == {"path": "/run/kleidi", "type": "DirectoryOrCreate"}
    command = plugin_container(default_objects)["command"]
    assert command == ["kleidi", "serve", "--config", "/etc/kleidi-config/kleidi.yaml"]


def test_a_changed_kleidi_yaml_rolls_the_pods(default_objects: list[dict[str, Any]]) -> None:
    def checksum(objects: list[dict[str, Any]]) -> str:
        value: str = daemonset(objects)["spec"]["template"]["metadata"]["annotations"]["kleidi.io/config-checksum"]
        return value

    changed = render(set_values={"config.log_level": "debug"})
    assert checksum(changed) != checksum(default_objects)
    assert checksum(render(set_values={"podLabels.team": "platform"})) == checksum(default_objects)


def test_credentials_from_an_existing_secret_are_opt_in_and_readable_by_the_plugin() -> None:
    (secret_values,) = [p for p in CI_VALUES if p.name == "vault-secret-values.yaml"]
    spec = pod_spec(render(secret_values))
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["credentials"]["secret"] == {"secretName": "kleidi-vault-approle", "defaultMode": 0o440}
    assert spec["securityContext"]["fsGroup"] == 10001  # Secret files are root's without it


def test_only_vault_kubernetes_and_jwt_auth_get_the_service_account_token() -> None:
    (vault_values,) = [p for p in CI_VALUES if p.name == "vault-values.yaml"]
    assert pod_spec(render(vault_values))["automountServiceAccountToken"] is True
    jwt = render(vault_values, set_values={"config.vault.auth.method": "jwt"})
    assert pod_spec(jwt)["automountServiceAccountToken"] is True
    for values_file in CI_VALUES:
        if values_file != vault_values:
            assert pod_spec(render(values_file))["automountServiceAccountToken"] is False, values_file.name


def test_proxy_mode_gets_only_its_remote_section_and_its_certificates_from_the_credentials_mount() -> None:
    (remote_values,) = [p for p in CI_VALUES if p.name == "remote-values.yaml"]
    objects = render(remote_values)
    config = yaml.safe_load(config_map_text(objects))
    assert config["provider"] == "remote" and "pkcs11" not in config and "vault" not in config
    assert "serve_remote" not in config
    config_dir = merged_values(remote_values)["configDir"]
    for setting in ("ca_cert", "client_cert", "client_key"):
        assert config["remote"][setting].startswith(f"{config_dir}/"), setting
    mounts = {m["mountPath"]: m for m in plugin_container(objects)["volumeMounts"]}
    assert mounts[config_dir] == {"name": "credentials", "mountPath": config_dir, "readOnly": True}
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert volumes["credentials"]["hostPath"] == {"path": config_dir, "type": "Directory"}
    # The endpoints resolve through the node's resolver: cluster DNS needs the apiservers, which need this plugin.
    assert pod_spec(objects)["dnsPolicy"] == "Default" and pod_spec(objects)["hostNetwork"] is True
    # A key server's settings never reach a control-plane plugin, whatever the values say.
    refused = helm("template", str(CHART), "-f", str(remote_values), "--set", "config.serve_remote.listen=0.0.0.0:8443",
                   check=False)  # fmt: skip
    assert refused.returncode != 0 and "/config/serve_remote" in refused.stderr


def test_the_softhsm_init_container_is_opt_in_and_mounts_the_token_store() -> None:
    (softhsm_values,) = [p for p in CI_VALUES if p.name == "softhsm-values.yaml"]
    assert [c["name"] for c in pod_spec(render())["initContainers"]] == ["guard"]
    spec = pod_spec(render(softhsm_values))
    guard, init = spec["initContainers"]
    assert (guard["name"], init["name"]) == ("guard", "softhsm-init")
    env = {e["name"]: e["value"] for e in init["env"]}
    assert env["SOFTHSM2_CONF"] == "/etc/kleidi/softhsm2.conf"
    assert env["KLEIDI_TOKEN_DIR"] == "/var/lib/kleidi/softhsm/tokens"
    assert not any("PIN" in e["name"] and "FILE" not in e["name"] for e in init["env"]), "a PIN in the pod spec"
    mounts = {m["mountPath"]: m.get("readOnly", False) for m in init["volumeMounts"]}
    assert mounts["/var/lib/kleidi/softhsm/tokens"] is False and mounts["/etc/kleidi"] is True


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"softhsm.initToken": "true"}, "writable hostVolumes entry for the token directory"),
        ({"softhsm.initToken": "true", "config.provider": "vault", "config.vault.address": "https://v:8200",
          "config.vault.auth.token_file": "/etc/kleidi/vault-token"}, "needs config.provider pkcs11"),
        ({"hostVolumes[0].name": "socket", "hostVolumes[0].path": "/x"}, "the chart's own"),
    ],
)  # fmt: skip
def test_values_the_schema_cannot_judge_are_refused_with_a_reason(sets: dict[str, str], message: str) -> None:
    args = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    done = helm("template", str(CHART), *args, check=False)
    assert done.returncode != 0 and message in done.stderr, done.stderr


def test_helm_test_runs_kleidi_check_on_a_control_plane_node(default_objects: list[dict[str, Any]]) -> None:
    (test_pod,) = [obj for obj in default_objects if obj["kind"] == "Pod"]
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = test_pod["spec"]["containers"]
    assert container["command"] == ["kleidi", "check", "--socket", "/run/kleidi/kleidi.sock"]
    assert (
        container["securityContext"]["runAsUser"] == plugin_container(default_objects)["securityContext"]["runAsUser"]
    )
    assert test_pod["spec"]["affinity"] == pod_spec(default_objects)["affinity"]
    assert test_pod["spec"]["tolerations"] == pod_spec(default_objects)["tolerations"]
    assert test_pod["spec"]["volumes"] == [{"name": "socket", "hostPath": {"path": "/run/kleidi", "type": "Directory"}}]
    assert not any(obj["kind"] == "Pod" for obj in render(set_values={"tests.enabled": "false"}))


def _run_init_script(container: dict[str, Any], script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a chart script the way its init container does: its env, remapped to this test's paths."""
    assert container["command"] == ["/bin/sh", f"/opt/kleidi-chart/{script}"]
    return subprocess.run(
        ["/bin/sh", str(CHART / "files" / script)],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_guard_refuses_a_node_running_the_ansible_static_pod(
    default_objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    guard = pod_spec(default_objects)["initContainers"][0]
    static_pods = {v["name"]: v for v in pod_spec(default_objects)["volumes"]}["static-pods"]
    assert static_pods["hostPath"] == {"path": "/etc/kubernetes/manifests", "type": "Directory"}
    env = {e["name"]: e["value"] for e in guard["env"]}
    assert env["KLEIDI_STATIC_POD"] == "/host-static-pods/kleidi.yaml"
    manifests, socket_dir = tmp_path / "manifests", tmp_path / "run-kleidi"
    manifests.mkdir()
    socket_dir.mkdir()
    (manifests / "kube-apiserver.yaml").write_text("{}")
    env |= {"KLEIDI_STATIC_POD": str(manifests / "kleidi.yaml"), "KLEIDI_SOCKET_DIR": str(socket_dir)}
    assert _run_init_script(guard, "guard.sh", env).returncode == 0
    (manifests / "kleidi.yaml").write_text("{}")
    refused = _run_init_script(guard, "guard.sh", env)
    assert refused.returncode == 1 and "Ansible static pod" in refused.stderr


def test_the_guard_hands_a_socket_directory_made_for_root_to_the_plugins_user(
    default_objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    guard = pod_spec(default_objects)["initContainers"][0]
    env = {e["name"]: e["value"] for e in guard["env"]}
    assert env["KLEIDI_SOCKET_DIR"] == "/run/kleidi" and (env["KLEIDI_UID"], env["KLEIDI_GID"]) == ("10001", "10001")
    (tmp_path / "manifests").mkdir()
    socket_dir = tmp_path / "run-kleidi"
    socket_dir.mkdir(mode=0o755)  # what the kubelet makes for a missing DirectoryOrCreate hostPath
    inode = socket_dir.stat().st_ino
    env |= {"KLEIDI_STATIC_POD": str(tmp_path / "manifests" / "kleidi.yaml"), "KLEIDI_SOCKET_DIR": str(socket_dir)}
    assert _run_init_script(guard, "guard.sh", env).returncode == 0
    st = socket_dir.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777, st.st_ino) == (10001, 10001, 0o750, inode)
    assert _run_init_script(guard, "guard.sh", env).returncode == 0  # the plugin's already: left alone
    os.chown(socket_dir, 4242, 4242)
    refused = _run_init_script(guard, "guard.sh", env)
    assert refused.returncode == 1 and "belongs to uid 4242" in refused.stderr


def test_the_notes_give_the_encryption_configuration_and_the_cold_start_loops() -> None:
    done = helm("install", "kleidi", str(CHART), "-n", "kube-system", "--dry-run=client")
    notes = done.stdout.split("NOTES:", 1)[1]
    assert "endpoint: unix:///run/kleidi/kleidi.sock" in notes and "apiVersion: v2" in notes
    assert "--encryption-provider-config=" in notes and "--encryption-provider-config-automatic-reload=true" in notes
    for loop in ("/readyz", "kube-controller-manager", "imagePullSecrets", "helm upgrade"):
        assert loop in notes, loop
    (softhsm_values,) = [p for p in CI_VALUES if p.name == "softhsm-values.yaml"]
    warned = helm("install", "kleidi", str(CHART), "-n", "kube-system", "--dry-run=client", "-f", str(softhsm_values))
    assert "its own KEK" in warned.stdout.split("NOTES:", 1)[1]
    (remote_values,) = [p for p in CI_VALUES if p.name == "remote-values.yaml"]
    remote = helm("install", "kleidi", str(CHART), "-n", "kube-system", "--dry-run=client", "-f", str(remote_values))
    notes = remote.stdout.split("NOTES:", 1)[1]
    endpoints = "keyserver-1.example:8443, keyserver-2.example:8443, keyserver-3.example:8443"
    assert f"forwards to {endpoints} over mutual TLS" in notes
    assert "/etc/kleidi/remote/client-key.pem" in notes and "Proxy mode" not in warned.stdout


def test_the_softhsm_init_container_creates_a_usable_token_once_and_never_touches_it_again(tmp_path: Path) -> None:
    (softhsm_values,) = [p for p in CI_VALUES if p.name == "softhsm-values.yaml"]
    init = pod_spec(render(softhsm_values))["initContainers"][1]
    env = {e["name"]: e["value"] for e in init["env"]}
    # The node's paths, moved under this test's directory.
    tokens, conf = tmp_path / "tokens", tmp_path / "softhsm2.conf"
    tokens.mkdir(mode=0o700)
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    pin, so_pin = tmp_path / "pin", tmp_path / "so-pin"
    pin.write_text("1234-user-pin\n")
    so_pin.write_text("5678-so-pin\n")
    moved = {env["SOFTHSM2_CONF"]: str(conf), env["KLEIDI_TOKEN_DIR"]: str(tokens),
             env["KLEIDI_PIN_FILE"]: str(pin), env["KLEIDI_SO_PIN_FILE"]: str(so_pin)}  # fmt: skip
    run_env = {name: moved.get(value, value) for name, value in env.items()}

    created = _run_init_script(init, "softhsm-init.sh", run_env)
    assert created.returncode == 0, created.stderr
    assert "created token kleidi with KEK kleidi-kek-1" in created.stdout
    assert "1234" not in created.stdout + created.stderr
    store = sorted(str(p.relative_to(tokens)) for p in tokens.rglob("*"))

    again = _run_init_script(init, "softhsm-init.sh", run_env)
    assert again.returncode == 0 and "leaving it as it is" in again.stdout
    assert sorted(str(p.relative_to(tokens)) for p in tokens.rglob("*")) == store

    config = pod.plugin_config(merged_values(softhsm_values))
    config["pkcs11"]["pin_file"] = str(pin)
    del config["listen"], config["metrics_listen"]  # the test's own socket and port
    with KleidiProcess(tmp_path / "kleidi", config, env={**os.environ, "SOFTHSM2_CONF": str(conf)}) as plugin:
        plugin.start()
        with plugin.client() as kms:
            assert kms.status().key_id.startswith("pkcs11:aes-gcm:kleidi-kek-1:")
            answer = kms.encrypt(b"seed" * 8)
            assert kms.decrypt(answer.ciphertext, answer.key_id) == b"seed" * 8


def test_the_softhsm_init_container_refuses_a_store_the_plugin_user_cannot_write(tmp_path: Path) -> None:
    (softhsm_values,) = [p for p in CI_VALUES if p.name == "softhsm-values.yaml"]
    init = pod_spec(render(softhsm_values))["initContainers"][1]
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    env = {e["name"]: e["value"] for e in init["env"]} | {"KLEIDI_TOKEN_DIR": str(tokens)}
    as_plugin_user = ["setpriv", "--reuid=10001", "--regid=10001", "--clear-groups"]
    done = subprocess.run(
        [*as_plugin_user, "/bin/sh", str(CHART / "files/softhsm-init.sh")],
        env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 1 and "not writable by uid 10001" in done.stderr
