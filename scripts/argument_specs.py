"""Writes roles/kleidi_plugin/meta/argument_specs.yml: the role's own variables, and under
`kleidi_plugin_values.config` every plugin setting generated from kleidi's config model (names, types, choices)
with the Helm values' descriptions.

Run `python -m scripts.argument_specs` after changing kleidi/config.py or helm/kleidi/values.yaml;
tests/test_pod_spec.py fails while the committed file differs from what this writes."""

from __future__ import annotations

import sys
import typing
from typing import Any

import yaml
from pydantic import BaseModel

from kleidi.config import Config
from scripts.config_model import description, parsed, unwrap
from scripts.values_doc import REPO, descriptions

TARGET = REPO / "roles" / "kleidi_plugin" / "meta" / "argument_specs.yml"

_ROLE_OPTIONS: dict[str, dict[str, Any]] = {
    "kleidi_plugin_backend": {
        "type": "dict",
        "required": True,
        "description": "What the backend role that ran first (kleidi_softhsm, kleidi_tpm2, kleidi_vault or "
        "kleidi_remote) reports: provider, settings (the provider section of kleidi.yaml), env and volumes the plugin "
        "needs.",
    },
    "kleidi_plugin_values_file": {
        "type": "path",
        "default": "{{ role_path }}/../../helm/kleidi/values.yaml",
        "description": "The Helm chart's values file, the single source of plugin defaults.",
    },
    "kleidi_plugin_manifests_dir": {
        "type": "path",
        "default": "/etc/kubernetes/manifests (kubeadm), /var/lib/rancher/rke2/agent/pod-manifests (rke2)",
        "description": "The kubelet's static pod directory.",
    },
    "kleidi_plugin_venv": {
        "type": "path",
        "default": "/opt/kleidi",
        "description": "Virtualenv on the node holding the kleidi command (run by the systemd unit, and by the "
        "health check in both modes).",
    },
    "kleidi_plugin_python": {
        "type": "path",
        "default": "/usr/bin/python3",
        "description": "The node's Python that makes the virtualenv.",
    },
    "kleidi_plugin_source_dir": {
        "type": "path",
        "default": "{{ role_path }}/../..",
        "description": "The kleidi source tree on the controller; built into the wheel the nodes install.",
    },
    "kleidi_plugin_pip_extra_args": {
        "type": "str",
        "default": "",
        "description": "Extra pip arguments on the nodes, e.g. --index-url of a mirror.",
    },
    "kleidi_plugin_health_timeout": {
        "type": "int",
        "default": 120,
        "description": "Seconds a node's plugin may take to pass `kleidi check` after a (re)start.",
    },
    "kleidi_plugin_systemd_unit": {
        "type": "path",
        "default": "/etc/systemd/system/kleidi.service",
        "description": "Path of the systemd unit (install mode systemd).",
    },
}

# The Helm values besides `config`, as Ansible types; `config` is generated from the model.
_VALUES_TYPES: dict[str, Any] = {
    "image": {"repository": "str", "tag": "str", "digest": "str", "pullPolicy": "str"},
    "configDir": "path",
    "env": "dict",
    "hostVolumes": "list",
    "hostNetwork": "bool",
    "priorityClassName": "str",
    "resources": "dict",
    "securityContext": "dict",
    "podSecurityContext": "dict",
    "probes": "dict",
}


# Settings the Helm values leave out, because the chart refuses them: a key server's (roles/kleidi_keyserver sets
# them through kleidi_plugin_values).
_KEY_SERVER_DOCS = {
    "config.serve_remote": "Key servers only (the kleidi_keyserver role sets it): also serve the provider to "
    "proxy-mode plugins (provider remote) over mutual TLS; docs/remote.md.",
    "config.serve_remote.listen": "TCP host:port the key server listens on, e.g. 0.0.0.0:8443.",
    "config.serve_remote.ca_cert": "CA (PEM) the clients' certificates must chain to: one dedicated to proxy mode.",
    "config.serve_remote.cert": "The key server's certificate (PEM), with the name the clients dial among its SANs.",
    "config.serve_remote.key": "The key server's private key (PEM).",
    "config.serve_remote.allowed_client_names": "When not empty, a client certificate must also carry one of these "
    "names among its SANs; others are refused and logged.",
}


def _option(annotation: Any, path: str, docs: dict[str, str], is_parsed: bool = False) -> dict[str, Any]:
    inner, _optional = (object, False) if is_parsed else unwrap(annotation)
    option: dict[str, Any] = {"description": _KEY_SERVER_DOCS.get(path) or description(path, docs)}
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        option["type"] = "dict"
        option["options"] = {
            name: (
                {"description": f"Retired, ignored with a warning: {field.deprecated}.", "type": "raw"}
                if field.deprecated
                else _option(field.annotation, f"{path}.{name}", docs, parsed(field.metadata))
            )
            for name, field in inner.model_fields.items()
        }
    elif typing.get_origin(inner) is typing.Literal:
        option["type"] = "str"
        option["choices"] = list(typing.get_args(inner))
    elif typing.get_origin(inner) is list and typing.get_args(inner) == (str,):
        option["type"] = "list"
        option["elements"] = "str"
    elif inner is str:
        option["type"] = "str"
    elif inner is int:
        option["type"] = "int"
    else:  # durations ("30s" or seconds), octal modes ("0600" or a number)
        option["type"] = "raw"
    return option


def _values_option(docs: dict[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, kind in _VALUES_TYPES.items():
        if isinstance(kind, dict):
            options[key] = {
                "type": "dict",
                "description": docs[key],
                "options": {sub: {"type": t, "description": docs[f"{key}.{sub}"]} for sub, t in kind.items()},
            }
        else:
            options[key] = {"type": kind, "description": docs[key]}
    options["config"] = _option(Config, "config", docs)
    return {
        "type": "dict",
        "default": {},
        "description": "Values merged over kleidi_plugin_values_file, as `helm install -f` would: "
        "the same keys as the chart.",
        "options": dict(sorted(options.items())),
    }


def render() -> str:
    docs = descriptions()
    options = dict(_ROLE_OPTIONS)
    options["kleidi_plugin_values"] = _values_option(docs)
    spec = {
        "argument_specs": {
            "main": {
                "short_description": "Install the kleidi KMS plugin on a control-plane node",
                "description": [
                    "Writes kleidi.yaml from the Helm values and the backend role's settings, installs the kleidi "
                    "command in a virtualenv, runs the plugin as a static pod or systemd unit, and waits until "
                    "every control-plane node's plugin is healthy and reports the same key_id.",
                    "Generated by scripts/argument_specs.py from kleidi's config model; do not edit by hand.",
                ],
                "options": dict(sorted(options.items())),
            }
        }
    }
    return "---\n" + yaml.dump(spec, Dumper=_IndentedDumper, sort_keys=False, width=120, allow_unicode=True)


class _IndentedDumper(yaml.SafeDumper):
    """Indents list items under their key, as yamllint (and so ansible-lint) expects."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def main() -> int:
    TARGET.write_text(render(), encoding="utf-8")
    print(f"wrote {TARGET.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
