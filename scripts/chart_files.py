"""Writes the chart's values schema (helm/kleidi/values.schema.json) and the values table of its README.

The schema's `config` part is generated from kleidi's config model (kleidi.config.Config): names, types, Literal
choices, length and range limits; the rules the model checks in code (which section a provider needs, which
credentials an auth method needs) are written here as if/then rules. The model stays the authority: kleidi
validates its configuration again when it starts. The other values are described by hand below. Helm enforces
the schema in `helm lint`, `helm template`, `helm install` and `helm upgrade`.

Run `python -m scripts.chart_files` after changing kleidi/config.py or helm/kleidi/values.yaml;
tests/test_chart_files.py fails while the committed files differ from what this writes."""

from __future__ import annotations

import copy
import json
import sys
import types
import typing
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from kleidi import config as model
from scripts.config_model import description, parser
from scripts.values_doc import REPO, descriptions, load_values

CHART = REPO / "helm" / "kleidi"
SCHEMA = CHART / "values.schema.json"
README = CHART / "README.md"
BEGIN, END = "<!-- values:begin -->", "<!-- values:end -->"

# Settings kleidi parses itself (a BeforeValidator in the model), by their parser.
_PARSED: dict[Any, dict[str, Any]] = {
    model.parse_duration: {
        "anyOf": [
            {
                "type": "string",
                "pattern": model._DURATION.pattern,
                "not": {"pattern": r"^\s*0+(\.0+)?\s*(ms|s|m|h)?\s*$"},
            },
            {"type": "number", "exclusiveMinimum": 0},
        ]
    },
    # Octal digits, never granting access to others (the last digit 0); YAML reads an unquoted 0600 as 384.
    model._file_mode: {
        "anyOf": [
            {"type": "string", "pattern": "^0*[0-7]{0,2}0$"},
            {"type": "integer", "minimum": 0, "maximum": 0o777, "multipleOf": 8},
        ]
    },
}

# A TCP port, 1 to 65535, leading zeros allowed (kleidi.config._endpoint reads it with int()).
_PORT = "0*([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"

# Checks the model makes in field validators: the ones the chart's templates rely on (the socket directory they
# mount, the port the probes ask), and the shape of a key server endpoint (kleidi.config._endpoint: host:port, an
# IPv6 address in brackets, no scheme, none repeated). An item of a list is named by the list's path plus "[]".
_FIELD_CHECKS: dict[str, dict[str, Any]] = {
    "config.listen": {"pattern": "^(unix://)?/([^@].*)?$"},
    "config.metrics_listen": {"pattern": "^(.*:[0-9]{1,5})?$"},
    "config.remote.endpoints": {"uniqueItems": True},
    "config.remote.endpoints[]": {"pattern": rf"^(\[[^\]]*\]|[^:\[\]]+):{_PORT}$"},
}

# Settings of the model the chart refuses, with the reason (their schema only admits null, which kleidi reads as
# "not set"). The chart deploys the control-plane plugins: one config on every node, serving the apiserver's
# socket. A key server is another host, installed by the kleidi_keyserver Ansible role.
_REFUSED: dict[str, str] = {
    "config.serve_remote": "Not in the chart: a key server (serve_remote) is not a control-plane plugin, and a "
    "DaemonSet would make every control-plane node one. Run key servers on their own hosts (the Ansible "
    "kleidi_keyserver role, docs/remote.md) and point the chart's plugins at them with provider remote.",
}

# The loopback addresses a plain http:// vault.address may name without allow_http (kleidi.config._loopback).
_LOOPBACK_HTTP = r"^http://(localhost|127(\.[0-9]{1,3}){3}|\[::1\])(:[0-9]+)?(/.*)?$"

_CONSTRAINTS = {
    annotated_types.Ge: ("minimum", "ge"),
    annotated_types.Le: ("maximum", "le"),
    annotated_types.Gt: ("exclusiveMinimum", "gt"),
    annotated_types.Lt: ("exclusiveMaximum", "lt"),
    annotated_types.MinLen: ("minLength", "min_length"),
    annotated_types.MaxLen: ("maxLength", "max_length"),
}
# The same length limits on a list count its items.
_ITEMS = {"minLength": "minItems", "maxLength": "maxItems"}


def _constraints(metadata: list[Any], path: str, array: bool = False) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for meta in metadata:
        if type(meta) in _CONSTRAINTS:
            keyword, attribute = _CONSTRAINTS[type(meta)]
            found[_ITEMS.get(keyword, keyword) if array else keyword] = getattr(meta, attribute)
        elif getattr(meta, "pattern", None) is not None:  # pydantic's Field(pattern=...)
            found["pattern"] = meta.pattern
        else:
            raise TypeError(f"{path}: no JSON schema for the constraint {meta!r}")
    return found


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if isinstance(schema.get("type"), str) and "enum" not in schema:
        return {**schema, "type": [schema["type"], "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _schema(annotation: Any, metadata: list[Any], path: str, docs: dict[str, str], conditional: bool) -> dict[str, Any]:
    """The JSON schema of one setting's type; `conditional`: inside a section only its provider uses."""
    func = parser(metadata)
    if func is not None:
        if func not in _PARSED:
            raise TypeError(f"{path}: no JSON schema for settings parsed by {func.__name__}")
        return copy.deepcopy(_PARSED[func])
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        inner = [meta for arg in args[1:] for meta in (arg.metadata if isinstance(arg, FieldInfo) else [arg])]
        return _schema(args[0], [*inner, *metadata], path, docs, conditional)
    if origin in (typing.Union, types.UnionType):
        members = [arg for arg in args if arg is not type(None)]
        if len(members) == 1:
            # An optional section is a provider's: its rules apply only when the provider names it.
            schema = _schema(members[0], metadata, path, docs, conditional or _is_section(members[0]))
        else:
            schema = {"anyOf": [_schema(arg, metadata, path, docs, conditional) for arg in members]}
        return _nullable(schema) if len(members) < len(args) else schema
    if _is_section(annotation):
        return _section(annotation, path, docs, conditional)
    if origin is list:
        items = _schema(args[0], [], f"{path}[]", docs, conditional)
        return {
            "type": "array",
            "items": items,
            **_constraints(metadata, path, array=True),
            **_FIELD_CHECKS.get(path, {}),
        }
    if origin is typing.Literal:
        kinds = {type(arg) for arg in args}
        return {"type": "string", "enum": list(args)} if kinds == {str} else {"enum": list(args)}
    kind = {str: "string", int: "integer", float: "number", bool: "boolean"}.get(annotation)
    if kind is None:
        raise TypeError(f"{path}: no JSON schema for {annotation!r}")
    return {"type": kind, **_constraints(metadata, path), **_FIELD_CHECKS.get(path, {})}


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _placeholder(schema: dict[str, Any]) -> dict[str, Any]:
    """A required setting of a provider's section may be "" (or [] for a list) while another provider is in use
    (values.yaml's vault.address and remote.endpoints are): its limits then apply only when the provider names the
    section (_provider_rules)."""
    relaxed = {key: value for key, value in schema.items() if key not in ("minLength", "minItems")}
    if "pattern" in relaxed:
        relaxed["pattern"] = f"^$|(?:{relaxed['pattern']})"
    return relaxed


def _section(section: type[BaseModel], path: str, docs: dict[str, str], conditional: bool) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for name, field in section.model_fields.items():
        if field.deprecated:  # a retired setting: kleidi accepts any value and warns, and so does the chart
            properties[name] = {
                "description": f"Retired, ignored with a warning: {field.deprecated}.",
                "deprecated": True,
            }
            continue
        if f"{path}.{name}" in _REFUSED:
            properties[name] = {"description": _REFUSED[f"{path}.{name}"], "type": "null"}
            continue
        schema = _schema(field.annotation, field.metadata, f"{path}.{name}", docs, conditional)
        if conditional and field.is_required() and schema.get("type") in ("string", "array"):
            schema = _placeholder(schema)
        properties[name] = {"description": description(f"{path}.{name}", docs), **schema}
    schema = {"type": "object", "additionalProperties": False, "properties": properties}
    required = [name for name, field in section.model_fields.items() if field.is_required()]
    if required and not conditional:
        schema["required"] = required
    return schema


def _non_empty(*names: str) -> dict[str, Any]:
    return {"required": list(names), "properties": {name: {"type": "string", "minLength": 1} for name in names}}


def _when(section: type[BaseModel], name: str, value: str) -> dict[str, Any]:
    """`if` the setting has this value; a setting left out has the model's default."""
    condition: dict[str, Any] = {"properties": {name: {"const": value}}}
    if section.model_fields[name].default != value:
        condition["required"] = [name]
    return condition


def _exactly_one(*names: str) -> dict[str, Any]:
    return {"oneOf": [_non_empty(name) for name in names]}


# What the model's validators check in code (Pkcs11Config._check, VaultAuthConfig._check), for the section the
# provider names. tests/test_chart_files.py holds these to the model case by case.
_VAULT_AUTH_NEEDS = {
    "approle": ("role_id_file", "secret_id_file"),
    "kubernetes": ("role", "jwt_file"),
    "jwt": ("role", "jwt_file"),
    "cert": ("client_cert", "client_key"),
}


def _section_rules() -> dict[str, dict[str, Any]]:
    auth = model.VaultAuthConfig
    methods = typing.get_args(auth.model_fields["method"].annotation)
    assert set(methods) == {"token", *_VAULT_AUTH_NEEDS}, "a new vault auth method needs its rule here"
    auth_rules = [{"if": _when(auth, "method", "token"), "then": _exactly_one("token_file", "token_env")}]
    auth_rules += [
        {"if": _when(auth, "method", method), "then": _non_empty(*needs)} for method, needs in _VAULT_AUTH_NEEDS.items()
    ]
    return {
        "pkcs11": {
            "allOf": [
                _exactly_one("pin_file", "pin_env"),
                {
                    "if": _when(model.Pkcs11Config, "mechanism", "aes-cbc-hmac"),
                    "then": _non_empty("hmac_key_label"),
                    "else": {"properties": {"hmac_key_label": {"type": "null"}}},
                },
            ]
        },
        "vault": {
            "properties": {"auth": {"allOf": auth_rules}},
            # VaultConfig._check: plain http only to loopback, unless allow_http (RE2 has no lookahead: if/not).
            "if": {
                "required": ["address"],
                "properties": {"address": {"pattern": "^http://", "not": {"pattern": _LOOPBACK_HTTP}}},
            },
            "then": {"required": ["allow_http"], "properties": {"allow_http": {"const": True}}},
        },
    }


def _filled(section: type[BaseModel], name: str) -> dict[str, Any]:
    """What a required setting must hold once its provider is named: a non-empty string, or as many items as the
    model asks of a list."""
    field = section.model_fields[name]
    if field.annotation is str:
        return {"minLength": 1}
    if typing.get_origin(field.annotation) is list:
        least = [meta.min_length for meta in field.metadata if isinstance(meta, annotated_types.MinLen)]
        return {"minItems": max(least, default=1)}
    return {}


def _provider_rules() -> list[dict[str, Any]]:
    """The section named by `provider` must be there, with its required settings set and its rules met."""
    rules = []
    extra = _section_rules()
    for provider in typing.get_args(model.Config.model_fields["provider"].annotation):
        field = model.Config.model_fields[provider]
        section = typing.get_args(field.annotation)[0]
        required = [name for name, info in section.model_fields.items() if info.is_required()]
        then: dict[str, Any] = {"type": "object", "required": required}
        then["properties"] = {name: rule for name in required if (rule := _filled(section, name))}
        rule = extra.get(provider, {})
        then["properties"].update(rule.get("properties", {}))
        then.update({key: value for key, value in rule.items() if key != "properties"})
        rules.append(
            {
                "if": {"properties": {"provider": {"const": provider}}, "required": ["provider"]},
                "then": {"required": [provider], "properties": {provider: then}},
            }
        )
    return rules


def config_schema(docs: dict[str, str]) -> dict[str, Any]:
    schema = _section(model.Config, "config", docs, conditional=False)
    schema["allOf"] = _provider_rules()
    return schema


# The values besides `config`. Kubernetes objects the templates render verbatim are only typed; kleidi's own
# keys are checked as the templates and the static pod (roles/kleidi_plugin) use them.
_ABSOLUTE_PATH = {"type": "string", "pattern": "^/"}
_DNS_LABEL = {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
_DNS_SUBDOMAIN_OR_EMPTY = {
    "type": "string",
    "pattern": r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)?$",
    "maxLength": 253,
}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_HOST_PATH_TYPES = ["", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice", "BlockDevice"]
_PROBE_TIMING = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "initialDelaySeconds": {"type": "integer", "minimum": 0},
        "periodSeconds": {"type": "integer", "minimum": 1},
        "timeoutSeconds": {"type": "integer", "minimum": 1},
        "successThreshold": {"type": "integer", "minimum": 1},
        "failureThreshold": {"type": "integer", "minimum": 1},
        "terminationGracePeriodSeconds": {"type": "integer", "minimum": 1},
    },
}


def _object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


_VALUES: dict[str, Any] = {
    "image": _object(
        {
            "repository": {"type": "string", "minLength": 1},
            "tag": {"type": "string", "pattern": r"^([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$"},
            "digest": {"type": "string", "pattern": "^(sha256:[a-f0-9]{64})?$"},
            "pullPolicy": {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]},
        },
        ("repository",),
    ),
    "imagePullSecrets": {"type": "array", "items": {"type": "object", "required": ["name"]}},
    "config": None,  # generated from the model
    "configDir": _ABSOLUTE_PATH,
    "credentials": _object({"existingSecret": _DNS_SUBDOMAIN_OR_EMPTY}),
    "env": {**_STRING_MAP, "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}},
    "hostVolumes": {
        "type": "array",
        "items": _object(
            {
                "name": _DNS_LABEL,
                "path": _ABSOLUTE_PATH,
                "type": {"type": "string", "enum": _HOST_PATH_TYPES},
                "readOnly": {"type": "boolean"},
            },
            ("name", "path"),
        ),
    },
    "hostNetwork": {"type": "boolean"},
    "priorityClassName": {"type": "string"},
    "resources": {"type": "object"},
    # The chart runs its own containers (the test pod, the SoftHSM2 init container) as the plugin's user.
    "securityContext": {
        "type": "object",
        "required": ["runAsUser", "runAsGroup"],
        "properties": {"runAsUser": {"type": "integer", "minimum": 0}, "runAsGroup": {"type": "integer", "minimum": 0}},
    },
    "podSecurityContext": {"type": "object"},
    "probes": _object({"liveness": _PROBE_TIMING, "readiness": _PROBE_TIMING}),
    "affinity": {"type": "object"},
    "nodeSelector": _STRING_MAP,
    "tolerations": {"type": "array", "items": {"type": "object"}},
    "updateStrategy": _object(
        {
            "type": {"type": "string", "enum": ["RollingUpdate", "OnDelete"]},
            "rollingUpdate": _object(
                {
                    "maxUnavailable": {
                        "anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": "^[0-9]+%$"}]
                    },
                    # Two plugins cannot serve one socket: the old pod must stop before the new one starts.
                    "maxSurge": {"enum": [0, "0%"]},
                }
            ),
        }
    ),
    "podAnnotations": _STRING_MAP,
    "podLabels": _STRING_MAP,
    "serviceAccount": _object({"create": {"type": "boolean"}, "name": _DNS_SUBDOMAIN_OR_EMPTY}),
    "staticPodDir": _ABSOLUTE_PATH,
    "softhsm": _object({"initToken": {"type": "boolean"}, "tokenDir": _ABSOLUTE_PATH, "soPinFile": _ABSOLUTE_PATH}),
    "tests": _object({"enabled": {"type": "boolean"}}),
}


def _described(schema: dict[str, Any], path: str, docs: dict[str, str]) -> dict[str, Any]:
    """The schema with each property's `# --` description from values.yaml, description first."""
    out: dict[str, Any] = {"description": docs[path]} if path in docs else {}
    out.update(copy.deepcopy(schema))
    if "properties" in out:
        out["properties"] = {name: _described(sub, f"{path}.{name}", docs) for name, sub in out["properties"].items()}
    return out


def schema() -> dict[str, Any]:
    docs = descriptions()
    unknown = set(load_values()) ^ set(_VALUES)
    assert not unknown, f"values.yaml and scripts/chart_files.py disagree on the top-level keys: {sorted(unknown)}"
    properties = {
        key: config_schema(docs) if key == "config" else _described(_VALUES[key], key, docs) for key in load_values()
    }
    properties["config"] = {"description": docs["config"], **properties["config"]}
    properties["global"] = {"description": "Helm's global values, passed to every subchart; unused.", "type": "object"}
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Values of the kleidi chart",
        "description": "Generated by scripts/chart_files.py from kleidi's config model and values.yaml; "
        "do not edit by hand.",
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }


def render_schema() -> str:
    return json.dumps(schema(), indent=2, ensure_ascii=False) + "\n"


# The README's values table.


def _node(root: dict[str, Any], path: str) -> dict[str, Any]:
    node = root
    for name in path.split("."):
        node = node["properties"][name]
    return node


def _type(node: dict[str, Any]) -> str:
    if "enum" in node:
        return ", ".join(f"`{value}`" for value in node["enum"] if value is not None)
    if "anyOf" in node:
        kinds = [_type(member) for member in node["anyOf"]]
        return " or ".join(dict.fromkeys(kind for kind in kinds if kind))
    kind = node.get("type", "")
    kinds = kind if isinstance(kind, list) else [kind]
    return " or ".join(kind for kind in kinds if kind != "null")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _default(value: Any) -> str:
    if value == "":
        return '`""`'
    return f"`{_cell(value if isinstance(value, str) else json.dumps(value))}`"


def _rows(values: dict[str, Any], prefix: str, docs: dict[str, str], root: dict[str, Any]) -> list[str]:
    rows = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        # A mapping whose keys are documented one by one is expanded; any other value is one row.
        if isinstance(value, dict) and any(f"{path}.{sub}" in docs for sub in value):
            rows += _rows(value, f"{path}.", docs, root)
        else:
            node = _node(root, path)
            rows.append(f"| `{path}` | {_cell(_type(node))} | {_default(value)} | {_cell(docs.get(path, ''))} |")
    return rows


def render_table() -> str:
    lines = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    lines += _rows(load_values(), "", descriptions(), schema())
    return "\n".join(lines)


def render_readme(page: str) -> str:
    head, begin, rest = page.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"{README.relative_to(REPO)} needs the markers {BEGIN} and {END}")
    return f"{head}{BEGIN}\n{render_table()}\n{END}{tail}"


def main() -> int:
    SCHEMA.write_text(render_schema(), encoding="utf-8")
    README.write_text(render_readme(README.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {SCHEMA.relative_to(REPO)} and {README.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
