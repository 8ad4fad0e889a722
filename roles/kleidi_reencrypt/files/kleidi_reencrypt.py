#!/usr/bin/env python3
"""Re-encrypt, through the apiserver, every stored object of the resources kleidi's kms provider encrypts.

Runs on the Ansible controller with kubectl and a kubeconfig (the kleidi_reencrypt role runs it; an operator can
too). Each object is read and written back unchanged (`kubectl replace -f -`, the object on stdin): the apiserver
then stores it with its current write provider, and writes only objects that are stale (under another provider or
an older key_id), so a second pass costs reads only.

    kleidi_reencrypt.py plan    --provider NAME --state-dir DIR [--key-id ID] [--run-id ID] [--away] [--dry-run]
                                < encryption-config.json
    kleidi_reencrypt.py rewrite --state-file FILE (--unit NAME | --all) [--qps N]

`plan` reads the EncryptionConfiguration in force (JSON on stdin, secrets redacted or not: only its structure is
used), works out the resources whose first provider is the kms provider NAME (wildcards through `kubectl
api-resources`), counts their objects per namespace, and creates or resumes the run's state file
(<state dir>/reencrypt-<run id>.json). With --away, the resources are those whose entry still lists the provider
after another one that now writes: the way out of kms, before it is removed. `rewrite` rewrites one unit (a
namespace, or all cluster-scoped objects) and records every object done, so a run that stops is resumed by running
it again: done units and done objects are skipped. Every run prints one JSON document on stdout: names and counts
only. Objects pass through this process's memory and kubectl's stdin, never argv, a log or the output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

CLUSTER = "(cluster-scoped)"
STATE_VERSION = 1
# Built-in resources that etcd does not keep under /registry/<resource>/ (the apiserver's storage paths).
ETCD_PATHS = {
    "services": "services/specs/",
    "endpoints": "services/endpoints/",
    "nodes": "minions/",
    "replicationcontrollers": "controllers/",
    "ingresses.networking.k8s.io": "ingress/",
    "events.events.k8s.io": "events/",
    "customresourcedefinitions.apiextensions.k8s.io": "apiextensions.k8s.io/customresourcedefinitions/",
    "apiservices.apiregistration.k8s.io": "apiregistration.k8s.io/apiservices/",
}
# How often the state file is rewritten while a unit runs (the unit's end always writes it).
SAVE_EVERY = 2.0
CONFLICT_RETRIES = 5
# So many refusals in a row mean the kubeconfig's user may not do this at all: stop rather than try every object.
MAX_REFUSED_IN_A_ROW = 20


class Stop(Exception):
    """The run cannot go on (the apiserver or kubectl failed): what is done is saved, run again to resume."""


class Kubectl:
    def __init__(self, kubectl: str, kubeconfig: str, timeout: str) -> None:
        self.base = [kubectl, *(["--kubeconfig", kubeconfig] if kubeconfig else []), f"--request-timeout={timeout}"]

    def run(self, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [*self.base, *args], input=stdin, capture_output=True, text=True, check=False, timeout=600
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Stop(f"kubectl {args[0]} could not run: {exc}") from None

    def json(self, args: list[str]) -> dict:
        done = self.run([*args, "-o", "json"])
        if done.returncode != 0:
            raise Stop(f"kubectl {' '.join(args)} failed: {first_line(done.stderr)}")
        try:
            return json.loads(done.stdout or "{}")
        except ValueError:
            raise Stop(f"kubectl {' '.join(args)} printed something that is not JSON") from None


def first_line(text: str, limit: int = 300) -> str:
    """The first non-empty line of kubectl's stderr, cut short: kubectl names objects there, never their data."""
    line = next((line.strip() for line in (text or "").splitlines() if line.strip()), "(no message)")
    return line if len(line) <= limit else line[:limit] + "..."


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# --- which resources -------------------------------------------------------------------------------------------


def covers(pattern: str, resource: str) -> bool:
    """Whether an EncryptionConfiguration resource name (secrets, deployments.apps, *.apps, *., *.*) applies."""
    if pattern in (resource, "*.*"):
        return True
    return pattern.startswith("*.") and pattern[2:] == resource.partition(".")[2]


def first_provider(entry: dict) -> tuple[str, str]:
    """The kind of the entry's first provider (kms, aescbc, identity, ...) and, for kms, its name."""
    providers = entry.get("providers") or [{}]
    kind = next(iter(providers[0]), "")
    return kind, (providers[0].get(kind) or {}).get("name", "") if kind == "kms" else ""


def kms_names(entry: dict) -> list[str]:
    return [(p.get("kms") or {}).get("name", "") for p in entry.get("providers") or [] if "kms" in p]


def selected(entry: dict, provider: str, away: bool) -> bool:
    """Into kms: the entry's first provider is the kms provider. Away from it: the entry still lists it (to read
    what it wrote) but another provider writes."""
    if away:
        return provider in kms_names(entry) and first_provider(entry) != ("kms", provider)
    return first_provider(entry) == ("kms", provider)


def ours(config: dict, provider: str, resource: str, away: bool = False) -> bool:
    """Whether ``resource`` is to be rewritten: the first entry that covers it decides, as in the apiserver."""
    for entry in config.get("resources") or []:
        if any(covers(pattern, resource) for pattern in entry.get("resources") or []):
            return selected(entry, provider, away)
    return False


def served(kube: Kubectl, namespaced: bool) -> tuple[list[str], str]:
    """Resources the apiserver serves that can be listed, read and replaced; a warning when an API group did not
    answer (an aggregated API that is down), since kubectl then lists the others."""
    done = kube.run(
        ["api-resources", "--verbs=list,get,update", f"--namespaced={str(namespaced).lower()}", "-o", "name"]
    )
    names = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 and not names:
        raise Stop(f"kubectl api-resources failed: {first_line(done.stderr)}")
    return names, first_line(done.stderr) if done.returncode != 0 else ""


def aggregated_groups(kube: Kubectl) -> set[str]:
    """API groups another server answers (an APIService with a service): nothing of theirs is in this etcd."""
    found = kube.json(["get", "apiservices.apiregistration.k8s.io"])
    return {
        (item.get("spec") or {}).get("group", "")
        for item in found.get("items") or []
        if (item.get("spec") or {}).get("service")
    }


def custom_resources(kube: Kubectl) -> set[str]:
    found = kube.json(["get", "customresourcedefinitions.apiextensions.k8s.io"])
    return {
        f"{item['spec']['names']['plural']}.{item['spec']['group']}"
        for item in found.get("items") or []
        if (item.get("spec") or {}).get("names")
    }


def etcd_path(resource: str, crds: set[str]) -> str:
    """Where the apiserver keeps ``resource`` under its etcd prefix (/registry by default)."""
    if resource in ETCD_PATHS:
        return ETCD_PATHS[resource]
    plural, _, group = resource.partition(".")
    if resource in crds:
        return f"{group}/{plural}/"
    return f"{plural}/"


def resolve(kube: Kubectl, config: dict, provider: str, away: bool = False) -> tuple[list[dict], list[str]]:
    """The resources to rewrite, each {name, namespaced, etcd_path}, and notes (what was left out and why)."""
    notes = []
    patterns = [
        pattern
        for entry in config.get("resources") or []
        if selected(entry, provider, away)
        for pattern in entry.get("resources") or []
    ]
    if not patterns and away:
        raise Stop(
            f"the EncryptionConfiguration in force has no resource that lists the kms provider {provider!r} after "
            f"another provider: put the provider that is to write first, then re-encrypt away from {provider!r}"
        )
    if not patterns:
        raise Stop(
            f"the EncryptionConfiguration in force has no resource whose first provider is the kms provider "
            f"{provider!r}: nothing is written with it, so there is nothing to re-encrypt into it"
        )
    found = {}
    for namespaced in (True, False):
        names, warning = served(kube, namespaced)
        if warning:
            notes.append(f"kubectl api-resources: {warning}")
        found.update(dict.fromkeys(names, namespaced))
    skip = aggregated_groups(kube) if any("*" in p for p in patterns) else set()
    resources = [name for name in found if ours(config, provider, name, away) and name.partition(".")[2] not in skip]
    for pattern in patterns:
        if "*" not in pattern and pattern not in found:
            notes.append(f"{pattern}: not served by the apiserver (or cannot be listed and updated), left out")
    crds = custom_resources(kube) if any("." in name for name in resources) else set()
    return (
        [{"name": name, "namespaced": found[name], "etcd_path": etcd_path(name, crds)} for name in sorted(resources)],
        notes,
    )


# --- the state file --------------------------------------------------------------------------------------------


def run_id(provider: str, key_id: str, resources: list[dict], away: bool) -> str:
    text = json.dumps([provider, key_id, sorted(r["name"] for r in resources), *(["away"] if away else [])])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        state = json.load(handle)
    if state.get("version") != STATE_VERSION:
        raise Stop(f"{path} was written by another version of this program (version {state.get('version')})")
    return state


def save(path: str, state: dict) -> None:
    """Atomically, so a run killed at any moment leaves the last complete state."""
    state["updated"] = now()
    directory = os.path.dirname(path)
    handle, temp = tempfile.mkstemp(dir=directory, prefix=".reencrypt-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(state, out, indent=1, sort_keys=True)
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def totals(state: dict) -> dict:
    units = state["units"]
    objects = sum(max(u["objects"], u.get("processed", 0)) for u in units.values())
    processed = sum(u["objects"] if u["status"] == "done" else len(u.get("done", [])) for u in units.values())
    rate = state["processed"] / state["busy_seconds"] if state.get("busy_seconds") else 0.0
    return {
        "units": len(units),
        "units_done": sum(u["status"] == "done" for u in units.values()),
        "objects": objects,
        "objects_done": min(processed, objects),
        "rate": round(rate, 1),
        "eta_seconds": round((objects - min(processed, objects)) / rate) if rate else None,
    }


# --- plan ------------------------------------------------------------------------------------------------------


def plan(args: argparse.Namespace, kube: Kubectl) -> dict:
    config = json.load(sys.stdin)
    resources, notes = resolve(kube, config, args.provider, args.away)
    ident = args.run_id or run_id(args.provider, args.key_id, resources, args.away)
    path = os.path.join(args.state_dir, f"reencrypt-{ident}.json")
    state = load(path) if os.path.exists(path) else None
    if state is None:
        state = {
            "version": STATE_VERSION,
            "run_id": ident,
            "provider": args.provider,
            "key_id": args.key_id,
            "direction": "away" if args.away else "into",
            "resources": resources,
            "created": now(),
            "finished": None,
            "processed": 0,
            "busy_seconds": 0.0,
            "units": {},
        }
    if not state["finished"]:
        counts: dict[str, int] = {}
        for resource in state["resources"]:
            listed = kube.json(["get", resource["name"], *(["--all-namespaces"] if resource["namespaced"] else [])])
            for item in listed.get("items") or []:
                unit = CLUSTER
                if resource["namespaced"]:
                    unit = (item.get("metadata") or {}).get("namespace") or CLUSTER
                counts[unit] = counts.get(unit, 0) + 1
        for unit in counts.keys() - state["units"].keys():
            state["units"][unit] = {"status": "pending", "objects": 0}
        for unit, entry in state["units"].items():
            if entry["status"] != "done":  # a namespace deleted since the last run has nothing left
                entry["objects"] = counts.get(unit, 0)
        if not any(u["status"] != "done" for u in state["units"].values()):
            state["finished"] = now()
    if not args.dry_run:
        os.makedirs(args.state_dir, mode=0o700, exist_ok=True)
        save(path, state)
    pending = sorted(
        (name for name, unit in state["units"].items() if unit["status"] != "done"),
        key=lambda name: (name == CLUSTER, name),
    )
    return {
        "run_id": ident,
        "state_file": path,
        "provider": state["provider"],
        "key_id": state["key_id"],
        "direction": state["direction"],
        "resources": state["resources"],
        "finished": state["finished"],
        "pending": [{"name": name, "objects": state["units"][name]["objects"]} for name in pending],
        "notes": notes,
        "totals": totals(state),
        "message": plan_message(state, pending),
    }


def plan_message(state: dict, pending: list[str]) -> str:
    if state["finished"]:
        return f"re-encryption run {state['run_id']} finished at {state['finished']}: nothing left to do"
    names = ", ".join(r["name"] for r in state["resources"])
    objects = sum(
        max(state["units"][name]["objects"] - len(state["units"][name].get("done", [])), 0) for name in pending
    )
    done = sum(unit["status"] == "done" for unit in state["units"].values())
    resuming = f" (resuming run {state['run_id']}: {done} units done before)" if done else ""
    return f"{objects} objects of {names} in {len(pending)} units to re-encrypt{resuming}"


# --- rewrite ---------------------------------------------------------------------------------------------------


class Throttle:
    def __init__(self, qps: float) -> None:
        self.interval = 1.0 / qps if qps > 0 else 0.0
        self.next = time.monotonic()

    def wait(self) -> None:
        delay = self.next - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self.next = max(self.next, time.monotonic()) + self.interval


def server_error(stderr: str, kind: str) -> bool:
    return f"Error from server ({kind})" in (stderr or "")


def rewrite_object(kube: Kubectl, throttle: Throttle, resource: str, namespace: str, obj: dict) -> tuple[str, str]:
    """Write one object back through the apiserver. Returns (outcome, reason): rewritten (stored anew), current
    (the apiserver had nothing stale to write), gone (deleted meanwhile), refused (the apiserver said no to this
    object). A conflict (changed meanwhile) re-reads the object and tries again."""
    name = obj["metadata"]["name"]
    where = ["--namespace", namespace] if namespace != CLUSTER else []
    for _attempt in range(CONFLICT_RETRIES):
        throttle.wait()
        before = obj["metadata"].get("resourceVersion", "")
        done = kube.run(
            ["replace", *where, "-f", "-", "-o", "jsonpath={.metadata.resourceVersion}"], stdin=json.dumps(obj)
        )
        if done.returncode == 0:
            return ("current" if done.stdout.strip() == before else "rewritten"), ""
        if server_error(done.stderr, "NotFound"):
            return "gone", ""
        if server_error(done.stderr, "Conflict"):
            throttle.wait()
            again = kube.run(["get", resource, name, *where, "-o", "json"])
            if again.returncode != 0 and server_error(again.stderr, "NotFound"):
                return "gone", ""
            if again.returncode != 0:
                raise Stop(f"kubectl get {resource} {name} failed: {first_line(again.stderr)}")
            obj = json.loads(again.stdout)
            continue
        if "Error from server" in (done.stderr or ""):
            return "refused", first_line(done.stderr)
        raise Stop(f"kubectl replace {resource} {name} failed: {first_line(done.stderr)}")
    return "refused", f"changed {CONFLICT_RETRIES} times while being rewritten"


def rewrite_unit(kube: Kubectl, state: dict, path: str, name: str, throttle: Throttle) -> dict:
    unit = state["units"].get(name)
    if unit is None:
        raise Stop(f"{name} is not a unit of run {state['run_id']}: run plan first")
    report = {"unit": name, "rewritten": 0, "current": 0, "gone": 0, "refused": [], "already_done": 0}
    if unit["status"] == "done":
        report["already_done"] = unit["objects"]
        return report
    done = set(unit.get("done", []))
    unit["status"] = "running"
    clock = {"started": time.monotonic(), "saved": time.monotonic(), "processed": 0}

    def checkpoint() -> None:
        """Record the objects done so far (and the time spent, for the rate), atomically."""
        unit["done"] = sorted(done)
        state["processed"] += clock["processed"]
        state["busy_seconds"] = round(state["busy_seconds"] + time.monotonic() - clock["started"], 3)
        clock.update(started=time.monotonic(), saved=time.monotonic(), processed=0)
        save(path, state)

    refused_in_a_row = 0
    try:
        for resource in (r for r in state["resources"] if r["namespaced"] == (name != CLUSTER)):
            throttle.wait()
            listed = kube.json(["get", resource["name"], *(["--namespace", name] if name != CLUSTER else [])])
            for obj in listed.get("items") or []:
                key = f"{resource['name']}/{obj['metadata']['name']}"
                if key in done:
                    report["already_done"] += 1
                    continue
                outcome, reason = rewrite_object(kube, throttle, resource["name"], name, obj)
                clock["processed"] += 1
                if outcome == "refused":
                    report["refused"].append({"object": key, "reason": reason})
                    refused_in_a_row += 1
                    if refused_in_a_row >= MAX_REFUSED_IN_A_ROW:
                        raise Stop(
                            f"the apiserver refused {refused_in_a_row} objects in a row, the last {key}: {reason}"
                        )
                    continue
                refused_in_a_row = 0
                report[outcome] += 1
                done.add(key)
                if time.monotonic() - clock["saved"] > SAVE_EVERY:
                    checkpoint()
    except Stop:
        unit["status"] = "stopped"
        checkpoint()
        raise
    if report["refused"]:
        unit["status"] = "refused"
        unit["refused"] = report["refused"]
    else:  # a unit done keeps its count only: the names are not needed any more
        unit["status"] = "done"
        unit["objects"] = len(done)
        unit.pop("refused", None)
    checkpoint()
    if unit["status"] == "done":
        unit.pop("done", None)
    if all(u["status"] == "done" for u in state["units"].values()):
        state["finished"] = now()
    save(path, state)
    return report


def rewrite(args: argparse.Namespace, kube: Kubectl) -> tuple[dict, int]:
    state = load(args.state_file)
    throttle = Throttle(args.qps)
    names = [args.unit] if args.unit else sorted(state["units"], key=lambda n: (n == CLUSTER, n))
    reports, stopped = [], ""
    for name in names:
        try:
            reports.append(rewrite_unit(kube, state, args.state_file, name, throttle))
        except Stop as exc:
            stopped = str(exc)
            break
    result = {"units": reports, "totals": totals(state), "finished": state["finished"], "run_id": state["run_id"]}
    result["message"] = "; ".join(describe(report) for report in reports)
    summary = progress(result["totals"])
    result["message"] = f"{result['message']}; {summary}" if result["message"] else summary
    refused = [r for report in reports for r in report["refused"]]
    if stopped:
        result["error"] = (
            f"stopped: {stopped}. What was done is kept in {args.state_file}; run again to resume (done "
            f"units and objects are skipped)."
        )
        return result, 1
    if refused:
        result["error"] = (
            f"the apiserver refused {len(refused)} objects; they are not re-encrypted: "
            + "; ".join(f"{r['object']}: {r['reason']}" for r in refused[:10])
            + ("; ..." if len(refused) > 10 else "")
            + ". Fix them and run again: only what is not done is retried."
        )
        return result, 3
    return result, 0


def describe(report: dict) -> str:
    unit = "cluster-scoped objects" if report["unit"] == CLUSTER else f"namespace {report['unit']}"
    parts = [f"{report[k]} {k}" for k in ("rewritten", "current", "gone") if report[k]]
    if report["refused"]:
        parts.append(f"{len(report['refused'])} refused")
    if report["already_done"]:
        parts.append(f"{report['already_done']} done before")
    return f"{unit}: {', '.join(parts) or 'nothing left'}"


def progress(total: dict) -> str:
    eta = f"ETA {duration(total['eta_seconds'])}" if total["eta_seconds"] is not None else "ETA unknown"
    if total["units_done"] == total["units"]:
        eta = "done"
    return (
        f"total {total['objects_done']}/{total['objects']} objects, {total['units_done']}/{total['units']} units, "
        f"{total['rate']} objects/s, {eta}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubectl", default="kubectl")
    parser.add_argument("--kubeconfig", default="")
    parser.add_argument("--request-timeout", default="60s")
    commands = parser.add_subparsers(dest="command", required=True)
    planning = commands.add_parser("plan", help="resolve the resources, count their objects, start or resume a run")
    planning.add_argument("--provider", required=True, help="the kms provider's name in the EncryptionConfiguration")
    planning.add_argument("--state-dir", required=True)
    planning.add_argument("--key-id", default="", help="the key_id the plugins serve (names the run)")
    planning.add_argument("--run-id", default="", help="a run id of your own instead of one made from the key_id")
    planning.add_argument("--dry-run", action="store_true", help="write no state file (check mode)")
    planning.add_argument(
        "--away",
        action="store_true",
        help="rewrite the resources whose configuration still lists the provider but no longer writes with it",
    )
    rewriting = commands.add_parser("rewrite", help="rewrite one unit (a namespace) or every unit left")
    rewriting.add_argument("--state-file", required=True)
    which = rewriting.add_mutually_exclusive_group(required=True)
    which.add_argument("--unit")
    which.add_argument("--all", action="store_true")
    rewriting.add_argument("--qps", type=float, default=20.0, help="objects written per second at most")
    args = parser.parse_args(argv)
    kube = Kubectl(args.kubectl, args.kubeconfig, args.request_timeout)
    try:
        if args.command == "plan":
            result, code = plan(args, kube), 0
        else:
            result, code = rewrite(args, kube)
    except Stop as exc:
        result, code = {"error": str(exc)}, 1
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
