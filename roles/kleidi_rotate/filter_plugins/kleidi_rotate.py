"""Where a rotation goes: the one place playbooks/rotate.yml decides its target KEK.

Inputs: each control-plane node's kleidi.yaml as a mapping (kleidi_in_force), the key_id each node's plugin serves
(kleidi_plugin_key_ids, "" where it did not pass `kleidi check`), what the last rotation recorded on the controller
(kleidi_state_dir/rotation.json, {} when none), the backend role, and the operator's target if any.

- PKCS#11 (SoftHSM, TPM2): the KEK in force is the key_label the nodes' kleidi.yaml names; the next one is that
  label with its trailing number plus one (kleidi-kek-1 -> kleidi-kek-2). With aes-cbc-hmac (TPM2) the HMAC key
  moves along: its label's trailing number becomes the new AES label's (kleidi-mac-1 -> kleidi-mac-2).
- Vault/OpenBao: the version in force is the one in the key_id every plugin reports (vault:...:v<N>:...); the next
  one is N + 1.
- A rotation recorded as under way (phase "switching") and not finished is resumed: run again without a target, a
  stopped run goes on to the same KEK rather than a new one.

A key_id names its KEK: pkcs11:<mechanism>:<label>[+<hmac label>]:<fingerprint>, vault:<hash>:v<version>:<hash>.
`marker` is the pattern every node's key_id matches once it uses the target."""

from __future__ import annotations

import re
from typing import Any

_TRAILING = re.compile(r"^(.*?)(\d+)$")
_VAULT = re.compile(r"^vault:[^:]+:v(\d+):")


def next_label(label: str) -> str:
    """kleidi-kek-1 -> kleidi-kek-2, kek-09 -> kek-10; "" when the label does not end in a number."""
    found = _TRAILING.match(label)
    if not found:
        return ""
    digits = found.group(2)
    return f"{found.group(1)}{int(digits) + 1:0{len(digits)}d}"


def _with_number_of(label: str, other: str) -> str:
    """``label`` with its trailing number replaced by ``other``'s ("" when either has none)."""
    mine, theirs = _TRAILING.match(label), _TRAILING.match(other)
    return f"{mine.group(1)}{theirs.group(2)}" if mine and theirs else ""


def pkcs11_marker(label: str, hmac_label: str = "") -> str:
    return "^pkcs11:[^:]+:" + re.escape(label) + (r"\+" + re.escape(hmac_label) if hmac_label else "") + ":"


def vault_marker(version: int) -> str:
    return f"^vault:[^:]+:v{version}:"


def rotate_plan(
    in_force: dict[str, dict[str, Any]],
    key_ids: dict[str, str],
    state: dict[str, Any],
    backend_role: str,
    target: Any = "",
    hmac_target: str = "",
    state_file: str = "rotation.json",
) -> dict[str, Any]:
    """The plan: provider, target (a label, or a version as a string), hmac_target, marker, current (host -> the
    label or version in force), old_key_id, resumed, done (every node already serves one key_id matching the
    marker) and problems (messages that stop the play before anything changes)."""
    provider = "vault" if backend_role == "kleidi_vault" else "pkcs11"
    target, hmac_target = str(target or ""), str(hmac_target or "")
    problems: list[str] = []
    hosts = list(in_force)
    for host in hosts:
        config = in_force[host] or {}
        if not config:
            problems.append(f"{host}: no kleidi.yaml; install kleidi with playbooks/site.yml first.")
        elif config.get("provider") != provider:
            problems.append(
                f"{host}: its kleidi.yaml uses the {config.get('provider')} provider, but kleidi_backend_role is "
                f"{backend_role} ({provider})."
            )
        elif not key_ids.get(host):
            problems.append(
                f"{host}: its plugin did not pass `kleidi check`; a rotation starts only from a healthy control plane."
            )
    plan: dict[str, Any] = {
        "provider": provider,
        "backend": backend_role,
        "target": "",
        "hmac_target": "",
        "marker": "",
        "current": {},
        "old_key_id": "",
        "resumed": False,
        "done": False,
        "problems": problems,
    }
    if problems:
        return plan
    resumable = state.get("phase") == "switching" and state.get("backend") == backend_role and state.get("target")
    if provider == "pkcs11":
        current = {host: str(in_force[host]["pkcs11"].get("key_label", "")) for host in hosts}
        hmacs = {host: str(in_force[host]["pkcs11"].get("hmac_key_label") or "") for host in hosts}
        labels = sorted(set(current.values()))
        if target:
            chosen = target
            if resumable and str(state["target"]) == target and not hmac_target:
                hmac_target = str(state.get("hmac_target") or "")
        elif resumable:
            chosen, hmac_target = str(state["target"]), str(state.get("hmac_target") or "")
        elif len(labels) == 1:
            chosen = next_label(labels[0])
            if not chosen:
                problems.append(
                    f"The KEK in force, {labels[0]}, does not end in a number, so there is no next one: give the new "
                    "label as kleidi_rotate_target."
                )
        else:
            chosen = ""
            problems.append(
                "The nodes' kleidi.yaml name different KEKs ("
                + ", ".join(f"{host}: {label}" for host, label in current.items())
                + f") and {state_file} records no rotation under way: give the KEK to finish with as "
                "kleidi_rotate_target."
            )
        if chosen and any(hmacs.values()) and not hmac_target:
            in_use = sorted(set(hmacs.values()))
            if chosen in labels and len(labels) == 1:
                hmac_target = in_use[0]
            elif len(in_use) == 1:
                hmac_target = _with_number_of(in_use[0], chosen)
            if not hmac_target:
                problems.append(
                    f"Cannot tell the HMAC key's label that goes with {chosen} (in use: {', '.join(in_use)}): give it "
                    "as kleidi_rotate_hmac_target."
                )
        if chosen and hmac_target and chosen == hmac_target:
            problems.append(f"The AES and HMAC keys need two labels; both would be {chosen}.")
        plan.update(target=chosen, hmac_target=hmac_target, current=current)
        plan["marker"] = pkcs11_marker(chosen, hmac_target) if chosen else ""
    else:
        versions: dict[str, int] = {}
        for host in hosts:
            found = _VAULT.match(key_ids[host])
            if found:
                versions[host] = int(found.group(1))
            else:
                problems.append(f"{host}: its plugin's key_id {key_ids[host]} is not a Vault transit key_id.")
        chosen = ""
        if target:
            if not target.isdigit() or int(target) < 1:
                problems.append(f"kleidi_rotate_target {target} is not a transit key version (1, 2, ...).")
            elif versions and int(target) < max(versions.values()):
                problems.append(
                    f"The plugins already use key version {max(versions.values())}, past kleidi_rotate_target "
                    f"{target}: Vault's key versions only go up, and kleidi always encrypts with the latest one."
                )
            else:
                chosen = str(int(target))
        elif resumable:
            chosen = str(state["target"])
        elif len(set(versions.values())) == 1:
            chosen = str(next(iter(versions.values())) + 1)
        elif versions:
            problems.append(
                "The nodes' plugins use different key versions ("
                + ", ".join(f"{host}: v{version}" for host, version in versions.items())
                + f") and {state_file} records no rotation under way: wait one health_interval and run again, or "
                "give the version as kleidi_rotate_target."
            )
        plan.update(target=chosen, current={host: str(version) for host, version in versions.items()})
        plan["marker"] = vault_marker(int(chosen)) if chosen else ""
    if problems:
        return plan
    served = set(key_ids[host] for host in hosts)
    plan["done"] = len(served) == 1 and re.match(plan["marker"], next(iter(served))) is not None
    plan["resumed"] = bool(resumable) and str(state.get("target")) == plan["target"]
    recorded = str(state.get("target") or "") == plan["target"] and state.get("backend") == backend_role
    if recorded and state.get("old_key_id"):
        plan["old_key_id"] = str(state["old_key_id"])
    elif len(served) == 1 and not plan["done"]:
        plan["old_key_id"] = next(iter(served))
    else:
        plan["old_key_id"] = ", ".join(sorted(key for key in served if not re.match(plan["marker"], key)))
    return plan


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"kleidi_rotate_plan": rotate_plan}
