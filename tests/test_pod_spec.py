"""One pod spec and one set of plugin defaults: helm/kleidi/values.yaml feeds the Ansible static pod, its `config`
agrees with kleidi's config model, and the kleidi role's argument_specs are generated from that model."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kleidi import config as kleidi_config
from scripts import argument_specs
from scripts.values_doc import load_values
from tests.plugin import REPO
from tests.role_modules import pod_filters

pytestmark = pytest.mark.unit

pod = pod_filters()


def test_argument_specs_are_what_the_generator_writes_from_the_config_model() -> None:
    committed = (REPO / "roles" / "kleidi_plugin" / "meta" / "argument_specs.yml").read_text()
    assert committed == argument_specs.render(), "run: python -m scripts.argument_specs"


def test_every_plugin_setting_is_in_the_role_spec_with_the_models_choices() -> None:
    spec = yaml.safe_load(argument_specs.render())["argument_specs"]["main"]["options"]
    config_spec = spec["kleidi_plugin_values"]["options"]["config"]["options"]
    assert set(config_spec) == set(kleidi_config.Config.model_fields)
    assert config_spec["log_level"]["choices"] == ["debug", "info", "warning", "error"]
    assert set(config_spec["pkcs11"]["options"]) == set(kleidi_config.Pkcs11Config.model_fields)
    assert set(config_spec["vault"]["options"]["auth"]["options"]) == set(kleidi_config.VaultAuthConfig.model_fields)


def _model_default(model: type[Any], name: str) -> Any:
    field = model.model_fields[name]
    return field.get_default(call_default_factory=True)


def test_values_hold_every_top_level_plugin_setting_with_the_models_default() -> None:
    values = load_values()["config"]
    parsed = kleidi_config.validate(pod.plugin_config(load_values()))
    for name, field in kleidi_config.Config.model_fields.items():
        if name in ("pkcs11", "vault", "remote", "provider"):
            continue
        if name == "serve_remote":  # a key server's setting, which the chart refuses (scripts/chart_files.py)
            assert name not in values
            continue
        if field.deprecated:  # retired: accepted from old values files, never offered in the chart's own
            assert name not in values, f"helm/kleidi/values.yaml still offers the retired {name}"
            continue
        assert name in values, f"helm/kleidi/values.yaml config lacks {name}"
        assert getattr(parsed, name) == _model_default(kleidi_config.Config, name), name


def test_values_pkcs11_defaults_are_the_models() -> None:
    parsed = kleidi_config.validate(pod.plugin_config(load_values()))
    assert parsed.pkcs11 is not None
    for name in load_values()["config"]["pkcs11"]:
        field = kleidi_config.Pkcs11Config.model_fields[name]
        # Required settings and those the model leaves unset (pin_file) get the chart's own choice.
        if not field.is_required() and field.default is not None:
            assert getattr(parsed.pkcs11, name) == _model_default(kleidi_config.Pkcs11Config, name), name


def test_the_vault_section_of_the_values_is_a_valid_vault_config_once_given_an_address() -> None:
    values = load_values()
    values["config"]["provider"] = "vault"
    # Required, and left empty by the values.
    values["config"]["vault"]["address"] = "https://vault.example:8200"
    values["config"]["vault"]["auth"]["token_file"] = "/etc/kleidi/vault-token"
    rendered = pod.plugin_config(values)
    assert "pkcs11" not in rendered
    kleidi_config.validate(rendered)


def test_the_remote_section_of_the_values_is_a_valid_remote_config_once_given_an_endpoint() -> None:
    values = load_values()
    values["config"]["provider"] = "remote"
    values["config"]["remote"]["endpoints"] = ["keyserver-1.example:8443"]  # required, and left empty by the values
    rendered = pod.plugin_config(values)
    assert "pkcs11" not in rendered and "vault" not in rendered
    parsed = kleidi_config.validate(rendered)
    assert parsed.remote is not None
    assert parsed.remote.timeout == _model_default(kleidi_config.RemoteConfig, "timeout")
    assert "remote" not in pod.plugin_config(load_values()), "only the provider's own section reaches kleidi.yaml"


def test_the_plugin_user_is_the_same_in_the_values_and_the_ansible_roles() -> None:
    common = yaml.safe_load((REPO / "roles" / "kleidi" / "defaults" / "main.yml").read_text())
    security = load_values()["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (common["kleidi_user"], common["kleidi_group"])


def test_the_static_pod_container_is_made_from_the_values() -> None:
    values = load_values()
    values["env"] = {"SOFTHSM2_CONF": "/etc/kleidi/softhsm2.conf"}
    values["hostVolumes"] = [{"name": "softhsm-tokens", "path": "/var/lib/kleidi/softhsm/tokens", "type": "Directory"}]
    manifest = pod.static_pod(copy.deepcopy(values), "0.1.0", "abc")
    spec = manifest["spec"]
    (container,) = spec["containers"]
    assert container["image"] == f"{values['image']['repository']}:0.1.0"
    assert container["command"] == ["kleidi", "serve", "--config", "/etc/kleidi-config/kleidi.yaml"]
    assert container["env"] == [{"name": "SOFTHSM2_CONF", "value": "/etc/kleidi/softhsm2.conf"}]
    assert container["securityContext"] == values["securityContext"]
    assert container["resources"] == values["resources"]
    mounts = {m["mountPath"]: m.get("readOnly", False) for m in container["volumeMounts"]}
    assert mounts == {
        "/etc/kleidi-config": True,
        "/etc/kleidi": True,
        "/run/kleidi": False,
        "/var/lib/kleidi/softhsm/tokens": False,
    }
    paths = {v["name"]: (v["hostPath"]["path"], v["hostPath"]["type"]) for v in spec["volumes"]}
    # The host's configDir holds kleidi.yaml (read at the config mount) and the credentials (at their own path).
    assert paths["config"] == paths["credentials"] == ("/etc/kleidi", "Directory")
    assert paths["socket"] == ("/run/kleidi", "DirectoryOrCreate")
    assert paths["softhsm-tokens"] == ("/var/lib/kleidi/softhsm/tokens", "Directory")
    assert spec["hostNetwork"] is True and spec["priorityClassName"] == "system-node-critical"
    assert manifest["metadata"]["annotations"][pod.CHECKSUM_ANNOTATION] == "abc"


def test_probes_name_the_loopback_host_the_plugin_listens_on() -> None:
    (container,) = pod.static_pod(load_values(), "0.1.0", "x")["spec"]["containers"]
    liveness = {"path": "/livez", "port": 8095, "scheme": "HTTP", "host": "127.0.0.1"}
    assert container["livenessProbe"]["httpGet"] == liveness
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["failureThreshold"] == load_values()["probes"]["liveness"]["failureThreshold"]


def test_a_listener_without_a_host_is_probed_on_loopback_where_kleidi_listens() -> None:
    values = load_values()
    values["config"]["metrics_listen"] = ":9000"
    (container,) = pod.static_pod(values, "0.1.0", "x")["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["host"] == "127.0.0.1"
    assert kleidi_config.validate(pod.plugin_config(values)).metrics_address == ("127.0.0.1", 9000)


def test_the_pod_security_context_reaches_the_static_pod_only_when_set() -> None:
    values = load_values()
    assert "securityContext" not in pod.static_pod(values, "0.1.0", "x")["spec"]
    values["podSecurityContext"] = {"supplementalGroups": [113]}
    assert pod.static_pod(values, "0.1.0", "x")["spec"]["securityContext"] == {"supplementalGroups": [113]}


def test_a_wildcard_listener_is_probed_on_the_node_address() -> None:
    values = load_values()
    values["config"]["metrics_listen"] = "0.0.0.0:9000"
    (container,) = pod.static_pod(values, "0.1.0", "x")["spec"]["containers"]
    assert "host" not in container["livenessProbe"]["httpGet"]


def test_no_endpoint_means_no_probes() -> None:
    values = load_values()
    values["config"]["metrics_listen"] = ""
    (container,) = pod.static_pod(values, "0.1.0", "x")["spec"]["containers"]
    assert "livenessProbe" not in container and "readinessProbe" not in container


def test_a_digest_pins_the_image() -> None:
    values = load_values()
    values["image"]["digest"] = "sha256:" + "ab" * 32
    assert pod.image_ref(values, "0.1.0").endswith("@sha256:" + "ab" * 32)


def test_the_static_pod_is_a_valid_pod_for_every_supported_kubernetes() -> None:
    values = load_values()
    values["env"] = {"SOFTHSM2_CONF": "/etc/kleidi/softhsm2.conf"}
    values["hostVolumes"] = [{"name": "tpm", "path": "/dev/tpmrm0", "type": "CharDevice", "readOnly": False}]
    manifest = pod.static_pod(values, "0.1.0", "x")
    for version in ("1.29", "1.31", "1.33"):
        kubernetes_validate.validate(manifest, version, strict=True)
