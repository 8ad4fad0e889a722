#!/usr/bin/python
"""Ansible module: what a node's SoftHSM2 token directory holds (token, serial, key labels), read-only."""

from __future__ import annotations

DOCUMENTATION = r"""
module: kleidi_backup_softhsm
short_description: Read a SoftHSM2 token directory's token, serial number and secret key labels
description:
  - Looks for the token labelled O(token_label) in O(token_dir) with pkcs11-tool, through a private SoftHSM2 config
    that names that directory, and lists the labels of its secret keys after logging in with O(pin).
  - pkcs11-tool runs as O(user) and O(group) (the plugin's user, who owns the directory): lock files SoftHSM2 makes
    beside the objects it opens stay the plugin's. The PIN reaches pkcs11-tool through its environment (env:NAME),
    never its arguments.
  - Changes nothing. RV(state) is C(missing) (no such token, or no directory), C(unhealthy) (the token is there but
    does not open with the PIN, or holds no secret key), C(ambiguous) (two tokens carry the label) or C(healthy).
options:
  token_dir: {description: Host path of SoftHSM2's token directory., type: path, required: true}
  module: {description: The SoftHSM2 PKCS#11 module., type: path, required: true}
  token_label: {description: Label of the token., type: str, required: true}
  pin: {description: The token's user PIN., type: str, required: true, no_log: true}
  user: {description: Numeric uid pkcs11-tool runs as when Ansible runs as root., type: int, required: true}
  group: {description: Numeric gid pkcs11-tool runs as when Ansible runs as root., type: int, required: true}
"""

RETURN = r"""
state: {description: missing, unhealthy, ambiguous or healthy., type: str}
serial: {description: The token's serial number (empty when missing)., type: str}
dir: {description: The name of the token's directory inside O(token_dir) (empty when not found)., type: str}
labels: {description: Labels of the token's secret keys, sorted., type: list}
reason: {description: Why the state is not healthy., type: str}
"""

import os
import re
import shutil
import subprocess
import tempfile

from ansible.module_utils.basic import AnsibleModule

_SLOT = re.compile(r"^Slot \d+ ")


def parse_slots(text):
    """[(label, serial)] of the initialised tokens in `pkcs11-tool --list-token-slots` output."""
    tokens, current = [], None
    for line in text.splitlines():
        if _SLOT.match(line):
            if current and current.get("label") is not None:
                tokens.append((current["label"], current.get("serial", "")))
            current = {}
        elif current is not None and ":" in line:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "token label":
                current["label"] = value.strip()
            elif key == "serial num":
                current["serial"] = value.strip()
            elif key == "token state" and "uninitialized" in value:
                current["label"] = None
    if current and current.get("label") is not None:
        tokens.append((current["label"], current.get("serial", "")))
    return tokens


def parse_secret_keys(text):
    """Labels of the secret key objects in `pkcs11-tool --list-objects --type secrkey` output."""
    labels, secret = [], False
    for line in text.splitlines():
        if line and not line[0].isspace():
            secret = line.startswith("Secret Key Object")
        elif secret and line.strip().startswith("label:"):
            labels.append(line.strip()[len("label:") :].strip())
    return labels


def token_dir_name(token_dir, serial):
    """SoftHSM2 names a token's directory by a UUID whose last 16 hex digits are the token's serial number."""
    if not serial or not os.path.isdir(token_dir):
        return ""
    for name in sorted(os.listdir(token_dir)):
        if os.path.isdir(os.path.join(token_dir, name)) and name.replace("-", "").lower().endswith(serial.lower()):
            return name
    return ""


def closed_parent(path, uid, gid):
    """The first directory on the way to path that uid/gid may not enter (the plugin could not either), or ""."""
    current = "/"
    for part in [p for p in os.path.abspath(path).split("/") if p]:
        info = os.stat(current)
        if info.st_uid == uid:
            allowed = info.st_mode & 0o100
        elif info.st_gid == gid:
            allowed = info.st_mode & 0o010
        else:
            allowed = info.st_mode & 0o001
        if not allowed:
            return current
        current = os.path.join(current, part)
    return ""


def main():
    module = AnsibleModule(
        argument_spec={
            "token_dir": {"type": "path", "required": True},
            "module": {"type": "path", "required": True},
            "token_label": {"type": "str", "required": True},
            "pin": {"type": "str", "required": True, "no_log": True},
            "user": {"type": "int", "required": True},
            "group": {"type": "int", "required": True},
        },
        supports_check_mode=True,
    )
    params = module.params
    result = {"changed": False, "state": "missing", "serial": "", "dir": "", "labels": [], "reason": ""}
    token_dir = params["token_dir"]
    if not os.path.isdir(token_dir):
        result["reason"] = f"{token_dir} does not exist"
        module.exit_json(**result)
    if shutil.which("pkcs11-tool") is None:
        module.fail_json(msg="pkcs11-tool is not installed on this node (package opensc)", **result)
    as_root = os.geteuid() == 0
    private = tempfile.mkdtemp(prefix="kleidi-softhsm-")
    try:
        conf = os.path.join(private, "softhsm2.conf")
        with open(conf, "w", encoding="utf-8") as handle:
            handle.write(f"directories.tokendir = {token_dir}\nobjectstore.backend = file\nlog.level = ERROR\n")
        if as_root:
            os.chown(private, params["user"], params["group"])
            os.chown(conf, params["user"], params["group"])
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SOFTHSM2_CONF": conf,
            "KLEIDI_SOFTHSM_PIN": params["pin"],
        }
        identity = {"user": params["user"], "group": params["group"], "extra_groups": []} if as_root else {}

        def tool(*args):
            return subprocess.run(
                ["pkcs11-tool", "--module", params["module"], *args],
                env=env,
                capture_output=True,
                text=True,
                check=False,
                cwd=private,
                **identity,
            )

        slots = tool("--list-token-slots")
        if slots.returncode != 0:
            closed = closed_parent(token_dir, params["user"], params["group"]) if as_root else ""
            why = f"{closed} is closed to it" if closed else slots.stderr.strip()[-300:]
            result.update(state="unhealthy", reason=f"the plugin's user cannot list the token's slots: {why}")
            module.exit_json(**result)
        found = [serial for label, serial in parse_slots(slots.stdout) if label == params["token_label"]]
        if not found:
            result["reason"] = f"no token labelled {params['token_label']} in {token_dir}"
            module.exit_json(**result)
        if len(found) > 1:
            result.update(
                state="ambiguous",
                reason=f"{len(found)} tokens in {token_dir} are labelled {params['token_label']} (serials "
                + ", ".join(found)
                + ")",
            )
            module.exit_json(**result)
        serial = found[0]
        result.update(serial=serial, dir=token_dir_name(token_dir, serial))
        objects = tool(
            "--token-label",
            params["token_label"],
            "--login",
            "--pin",
            "env:KLEIDI_SOFTHSM_PIN",
            "--list-objects",
            "--type",
            "secrkey",
        )
        if objects.returncode != 0:
            error = objects.stderr.replace(params["pin"], "<redacted>").strip().splitlines()
            result.update(
                state="unhealthy", reason="the token does not open with the PIN: " + (error[-1] if error else "")
            )
            module.exit_json(**result)
        labels = sorted(parse_secret_keys(objects.stdout))
        result["labels"] = labels
        if not labels:
            result.update(state="unhealthy", reason="the token holds no secret key")
        else:
            result["state"] = "healthy"
        module.exit_json(**result)
    finally:
        shutil.rmtree(private, ignore_errors=True)


if __name__ == "__main__":
    main()
