"""The chart's values schema and the values table of its README are what scripts/chart_files.py writes; the
schema's `config` part follows kleidi's config model, agrees with the model on the section the provider names,
and Helm itself refuses values the schema refuses."""

from __future__ import annotations

import copy
import json
import typing
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel

from kleidi import config as kleidi_config
from kleidi.errors import ConfigError
from scripts import chart_files
from scripts.config_model import unwrap
from scripts.values_doc import descriptions, load_values
from tests.helm import CHART, helm
from tests.role_modules import pod_filters

pod = pod_filters()
SCHEMA_ERROR = "values don't meet the specifications of the schema"


def _committed_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(chart_files.SCHEMA.read_text(encoding="utf-8"))
    return schema


@pytest.mark.unit
def test_committed_schema_is_what_the_generator_writes() -> None:
    assert chart_files.SCHEMA.read_text(encoding="utf-8") == chart_files.render_schema(), (
        "run: python -m scripts.chart_files"
    )


@pytest.mark.unit
def test_readme_values_table_is_what_the_generator_writes() -> None:
    page = chart_files.README.read_text(encoding="utf-8")
    assert page == chart_files.render_readme(page), "run: python -m scripts.chart_files"
    assert "helm install kleidi helm/kleidi -n kube-system -f my-values.yaml" in page
    assert "docs/helm.md" in page


@pytest.mark.unit
def test_readme_has_a_row_for_every_documented_leaf_value() -> None:
    page = chart_files.README.read_text(encoding="utf-8")
    table = page.split(chart_files.BEGIN)[1].split(chart_files.END)[0]
    keys = [line.split("|")[1].strip().strip("`") for line in table.strip().splitlines()[2:]]
    assert "config.pkcs11.token_label" in keys and "tolerations" in keys and "env" in keys
    assert "image" not in keys and "config" not in keys, "documented groups are expanded into their keys"
    assert "resources.requests.cpu" not in keys, "a Kubernetes object is one row with its JSON default"
    assert "| `config.pkcs11.mechanism` | `aes-gcm`, `aes-cbc-hmac` | `aes-gcm` |" in table
    assert "| `hostVolumes` | array | `[]` |" in table


def _literal_choices(annotation: Any) -> list[Any]:
    inner, _ = unwrap(annotation)
    members = typing.get_args(inner) if typing.get_origin(inner) is typing.Union else (inner,)
    return [arg for member in members if typing.get_origin(member) is typing.Literal for arg in typing.get_args(member)]


def _enums(node: dict[str, Any]) -> list[Any]:
    return [value for member in [node, *node.get("anyOf", [])] for value in member.get("enum", [])]


def _assert_section_matches(section: type[BaseModel], node: dict[str, Any], path: str) -> None:
    assert node["additionalProperties"] is False, path
    assert list(node["properties"]) == list(section.model_fields), path
    for name, field in section.model_fields.items():
        sub = node["properties"][name]
        assert sub["description"], f"{path}.{name}"
        if f"{path}.{name}" in chart_files._REFUSED:
            continue
        assert _enums(sub) == _literal_choices(field.annotation), f"{path}.{name}"
        inner, _ = unwrap(field.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            _assert_section_matches(inner, sub, f"{path}.{name}")


@pytest.mark.unit
def test_schema_config_lists_exactly_the_models_settings_with_its_choices() -> None:
    config = _committed_schema()["properties"]["config"]
    _assert_section_matches(kleidi_config.Config, config, "config")
    assert config["properties"]["provider"]["enum"] == ["pkcs11", "vault", "remote"]
    assert config["properties"]["pkcs11"]["properties"]["token_label"]["maxLength"] == 32
    endpoints = config["properties"]["remote"]["properties"]["endpoints"]
    assert (endpoints["type"], endpoints["maxItems"], endpoints["uniqueItems"]) == ("array", 8, True)
    assert config["properties"]["serve_remote"]["type"] == "null"


@pytest.mark.unit
def test_schema_describes_every_value_with_its_values_yaml_description() -> None:
    schema = _committed_schema()
    assert schema["additionalProperties"] is False
    assert list(schema["properties"]) == [*load_values(), "global"]
    for path, text in descriptions().items():
        node = schema
        for name in path.split("."):
            node = node["properties"][name]
        assert node["description"] == text, path


@pytest.mark.unit
def test_default_values_validate_against_the_schema() -> None:
    validator = jsonschema.Draft7Validator(_committed_schema())
    validator.check_schema(validator.schema)
    assert [error.message for error in validator.iter_errors(load_values())] == []


def _values_with(changes: dict[str, Any]) -> dict[str, Any]:
    """values.yaml with dotted keys set, as `helm --set` does; None removes a key, as a null in `-f` does."""
    values = load_values()
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = values
        for name in parents:
            node = node.setdefault(name, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = copy.deepcopy(value)
    return values


VAULT = {
    "config.provider": "vault",
    "config.vault.address": "https://vault.example:8200",
    "config.vault.auth.token_file": "/etc/kleidi/vault-token",
}
CBC = {"config.pkcs11.mechanism": "aes-cbc-hmac"}
REMOTE = {"config.provider": "remote", "config.remote.endpoints": ["keyserver-1.example:8443"]}
SERVE_REMOTE = {
    "listen": "0.0.0.0:8443",
    "ca_cert": "/etc/kleidi/remote/ca.pem",
    "cert": "/etc/kleidi/remote/server.pem",
    "key": "/etc/kleidi/remote/server-key.pem",
}

# (what changes in values.yaml, whether kleidi accepts the result)
CASES: list[tuple[dict[str, Any], bool]] = [
    ({}, True),
    ({"config.provider": "remote"}, False),  # values.yaml's endpoints are [], so remote needs at least one
    (REMOTE, True),
    ({**REMOTE, "config.pkcs11": None, "config.vault": None}, True),
    ({**REMOTE, "config.remote": None}, False),
    ({**REMOTE, "config.remote.endpoints": ["ks-1.example:8443", "10.0.0.2:8443", "[fd00::3]:08443"]}, True),
    ({**REMOTE, "config.remote.endpoints": ["ks-1.example:8443", "ks-1.example:8443"]}, False),
    ({**REMOTE, "config.remote.endpoints": [f"ks-{n}.example:8443" for n in range(9)]}, False),
    ({**REMOTE, "config.remote.endpoints": ["https://ks-1.example:8443"]}, False),
    ({**REMOTE, "config.remote.endpoints": ["ks-1.example"]}, False),
    ({**REMOTE, "config.remote.endpoints": ["ks-1.example:0"]}, False),
    ({**REMOTE, "config.remote.endpoints": ["ks-1.example:65536"]}, False),
    ({**REMOTE, "config.remote.endpoints": ["ks-1.example:65535"]}, True),
    ({**REMOTE, "config.remote.endpoints": ["fd00::3:8443"]}, False),  # IPv6 without brackets
    ({**REMOTE, "config.remote.endpoints": "ks-1.example:8443"}, False),
    ({**REMOTE, "config.remote.client_key": ""}, False),
    ({**REMOTE, "config.remote.ca_cert": None}, False),
    ({**REMOTE, "config.remote.timeout": "500ms"}, True),
    ({**REMOTE, "config.remote.timeout": "0s"}, False),
    ({**REMOTE, "config.remote.token": "x"}, False),
    ({**REMOTE, "config.serve_remote": SERVE_REMOTE}, False),  # a key server never forwards
    ({"config.serve_remote": None}, True),
    ({"config.remote": None}, True),
    ({"config.provider": "vault"}, False),  # values.yaml's address is "", so vault needs one
    ({**VAULT, "config.vault.auth.token_file": ""}, False),  # and so is its token file: method token needs one
    (VAULT, True),
    ({**VAULT, "config.vault.address": "vault.example:8200"}, False),
    ({**VAULT, "config.vault.ca_cert": "/etc/kleidi/ca.pem"}, True),
    # plain http: only to loopback, unless allow_http says the path is private by other means
    ({**VAULT, "config.vault.address": "http://vault.example:8200"}, False),
    ({**VAULT, "config.vault.address": "http://vault.example:8200", "config.vault.allow_http": True}, True),
    ({**VAULT, "config.vault.address": "http://10.0.0.1:8200"}, False),
    ({**VAULT, "config.vault.address": "http://127.0.0.1:8200"}, True),
    ({**VAULT, "config.vault.address": "http://localhost:8200"}, True),
    ({**VAULT, "config.vault.address": "http://[::1]:8200"}, True),
    ({**VAULT, "config.pkcs11": None}, True),
    ({"config.pkcs11": None}, False),
    ({"config.pkcs11.token_label": "x" * 33}, False),
    ({"config.pkcs11.token_label": ""}, False),
    ({"config.pkcs11.key_label": ""}, False),
    ({"config.pkcs11.pin_file": ""}, False),
    ({"config.pkcs11.pin_file": None, "config.pkcs11.pin_env": "KLEIDI_PIN"}, True),
    ({"config.pkcs11.pin_env": "KLEIDI_PIN"}, False),  # both a PIN file and a PIN variable
    (CBC, False),
    ({**CBC, "config.pkcs11.hmac_key_label": "kleidi-hmac-1"}, True),
    ({"config.pkcs11.hmac_key_label": "kleidi-hmac-1"}, False),  # only used with aes-cbc-hmac
    ({"config.pkcs11.pool_size": 0}, False),
    ({"config.pkcs11.inline_calls": "sometimes"}, False),
    ({"config.pkcs11.pin": "1234"}, False),
    ({"config.socket_mode": "0660"}, True),
    ({"config.socket_mode": 0o660}, True),
    ({"config.socket_mode": "0644"}, False),
    ({"config.socket_mode": 0o604}, False),
    ({"config.socket_mode": "0o600x"}, False),
    ({"config.health_interval": "1m"}, True),
    ({"config.health_interval": 2.5}, True),
    ({"config.health_interval": "0s"}, False),
    ({"config.health_interval": 0}, False),
    ({"config.health_interval": "soon"}, False),
    ({"config.shutdown_grace": "500ms"}, True),
    # retired: a values file that still sets it installs and upgrades (kleidi ignores it with a warning)
    ({"config.cpu_affinity": "auto"}, True),
    ({"config.cpu_affinity": 3}, True),
    ({"config.cpu_affinity": "all"}, True),
    ({"config.max_request_bytes": 100}, False),
    ({"config.workers": 257}, False),
    ({"config.log_level": "trace"}, False),
    ({"config.listen": "tcp://127.0.0.1:9000"}, False),
    ({"config.listen": "unix:///@kleidi"}, False),
    ({"config.listen": "/run/kleidi/other.sock"}, True),
    ({"config.metrics_listen": ""}, True),
    ({"config.metrics_listen": "[::1]:9000"}, True),
    ({"config.metrics_listen": "localhost"}, False),
    ({"config.unknown": 1}, False),
    ({**VAULT, "config.vault.auth.token_file": None, "config.vault.auth.token_env": "VAULT_TOKEN"}, True),
    ({**VAULT, "config.vault.auth.token_file": "", "config.vault.auth.token_env": "VAULT_TOKEN"}, True),
    ({**VAULT, "config.vault.auth.token_env": "VAULT_TOKEN"}, False),  # both a token file and a variable
    ({**VAULT, "config.vault.auth.mount": "approle-kleidi"}, True),
    ({**VAULT, "config.vault.auth.secret": "s.xyz"}, False),
]
NEEDS = {
    "approle": {"role_id_file": "/etc/kleidi/role-id", "secret_id_file": "/etc/kleidi/secret-id"},
    "kubernetes": {"role": "kleidi", "jwt_file": "/var/run/secrets/kubernetes.io/serviceaccount/token"},
    "jwt": {"role": "kleidi", "jwt_file": "/var/run/secrets/tokens/vault"},
    "cert": {"client_cert": "/etc/kleidi/client.pem", "client_key": "/etc/kleidi/client-key.pem"},
}
for _method, _needs in NEEDS.items():
    _auth = {**VAULT, "config.vault.auth.method": _method}
    CASES.append(({**_auth, **{f"config.vault.auth.{k}": v for k, v in _needs.items()}}, True))
    for _missing in _needs:
        CASES.append(({**_auth, **{f"config.vault.auth.{k}": v for k, v in _needs.items() if k != _missing}}, False))


def _model_accepts(values: dict[str, Any]) -> bool:
    try:
        kleidi_config.validate(pod.plugin_config(values))
    except ConfigError:
        return False
    return True


@pytest.mark.unit
@pytest.mark.parametrize(("changes", "accepted"), CASES, ids=[json.dumps(changes) for changes, _ in CASES])
def test_schema_and_model_agree_on_the_section_the_provider_names(changes: dict[str, Any], accepted: bool) -> None:
    values = _values_with(changes)
    assert _model_accepts(values) is accepted, "the case itself is wrong: kleidi's model disagrees"
    errors = [error.message for error in jsonschema.Draft7Validator(_committed_schema()).iter_errors(values)]
    assert (errors == []) is accepted, errors


@pytest.mark.unit
def test_a_section_the_provider_does_not_name_is_still_checked_but_may_be_left_blank() -> None:
    validator = jsonschema.Draft7Validator(_committed_schema())
    assert validator.is_valid(_values_with({"config.vault.address": ""}))
    assert not validator.is_valid(_values_with({"config.vault.address": "vault.example"}))
    assert not validator.is_valid(_values_with({"config.vault.auth.method": "ldap"}))
    assert validator.is_valid(_values_with({"config.remote.endpoints": []}))
    assert not validator.is_valid(_values_with({"config.remote.endpoints": ["https://ks-1.example:8443"]}))


@pytest.mark.unit
def test_the_chart_refuses_serve_remote_which_kleidi_accepts_on_a_key_server() -> None:
    """One kleidi.yaml on every control-plane node: serve_remote there would make each node a key server of its
    own, which is not proxy mode. kleidi itself accepts it (a key server's config), so this is the chart's rule."""
    values = _values_with({"config.serve_remote": SERVE_REMOTE})
    assert _model_accepts(values)
    errors = [error.message for error in jsonschema.Draft7Validator(_committed_schema()).iter_errors(values)]
    assert errors and all("is not of type 'null'" in message for message in errors), errors
    refused = _committed_schema()["properties"]["config"]["properties"]["serve_remote"]
    assert "kleidi_keyserver" in refused["description"]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("values", "accepted"),
    [
        ({"image.digest": "sha256:" + "a" * 64}, True),
        ({"image.digest": "latest"}, False),
        ({"image.pullPolicy": "Sometimes"}, False),
        ({"hostVolumes": [{"name": "tpm", "path": "/dev/tpmrm0", "type": "CharDevice", "readOnly": False}]}, True),
        ({"hostVolumes": [{"name": "Tpm_0", "path": "/dev/tpmrm0"}]}, False),
        ({"hostVolumes": [{"name": "tpm", "path": "dev/tpmrm0"}]}, False),
        ({"hostVolumes": [{"name": "tpm", "path": "/dev/tpmrm0", "type": "Device"}]}, False),
        ({"hostVolumes": [{"name": "tpm", "path": "/dev/tpmrm0", "mode": "rw"}]}, False),
        ({"hostVolumes": [{"path": "/dev/tpmrm0"}]}, False),
        ({"env": {"SOFTHSM2_CONF": "/etc/kleidi/softhsm2.conf"}}, True),
        ({"env": {"DEBUG": 1}}, False),
        ({"env": {"1BAD": "x"}}, False),
        ({"configDir": "etc/kleidi"}, False),
        ({"updateStrategy.rollingUpdate.maxSurge": "0%"}, True),
        ({"updateStrategy.rollingUpdate.maxSurge": 1}, False),
        ({"probes.liveness.periodSeconds": 0}, False),
        ({"probes.liveness.httpGet": {"path": "/"}}, False),
        ({"resources": {"limits": {"cpu": "1"}}}, True),
        ({"tolerations": []}, True),
        ({"softhsm.initToken": "yes"}, False),
        ({"credentials.existingSecret": "kleidi-vault-approle"}, True),
        ({"credentials.existingSecret": "Kleidi Secret"}, False),
        ({"global": {"imageRegistry": "registry.example"}}, True),
        ({"replicas": 2}, False),
    ],
)
def test_schema_checks_the_charts_own_values(values: dict[str, Any], accepted: bool) -> None:
    merged = _values_with(values)
    assert jsonschema.Draft7Validator(_committed_schema()).is_valid(merged) is accepted


def _lint(*set_values: str) -> tuple[int, str]:
    args = [arg for value in set_values for arg in ("--set", value)]
    result = helm("lint", "--strict", str(CHART), *args, check=False)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.integration
@pytest.mark.parametrize(
    ("set_values", "error"),
    [
        (["config.provider=ldap"], "at '/config/provider': value must be one of 'pkcs11', 'vault', 'remote'"),
        (["config.provider=remote"], "at '/config/remote/endpoints': minItems: got 0, want 1"),
        (["config.serve_remote.listen=0.0.0.0:8443"], "at '/config/serve_remote': got object, want null"),
        (["config.provider=vault"], "at '/config/vault/address': minLength"),
        (["replicas=2"], "additional properties 'replicas' not allowed"),
        (["updateStrategy.rollingUpdate.maxSurge=1"], "at '/updateStrategy/rollingUpdate/maxSurge'"),
        (["config.pkcs11.mechanism=aes-cbc-hmac"], "missing property 'hmac_key_label'"),
    ],
)
def test_helm_refuses_values_the_schema_refuses(set_values: list[str], error: str) -> None:
    code, output = _lint(*set_values)
    assert code != 0
    assert SCHEMA_ERROR in output and error in output, output


@pytest.mark.integration
def test_helm_accepts_global_values_a_vault_with_an_address_and_remote_with_an_endpoint() -> None:
    code, output = _lint("global.foo=bar")
    assert code == 0, output
    code, output = _lint(
        "config.provider=vault",
        "config.vault.address=https://vault.example:8200",
        "config.vault.auth.token_file=/etc/kleidi/vault-token",
    )
    assert code == 0, output
    code, output = _lint("config.provider=remote", "config.remote.endpoints={keyserver-1.example:8443}")
    assert code == 0, output
