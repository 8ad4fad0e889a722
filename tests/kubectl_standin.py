"""A fault-injecting stand-in for kubectl, for the re-encryption program's resume bookkeeping (a unit test: there
is no apiserver on the simulated nodes). Its "cluster" is the JSON file given as --kubeconfig, rewritten after
every call:

    {"resources": {"secrets": {"kind": "Secret", "namespaced": true}, ...},   # what api-resources lists
     "aggregated": ["metrics.k8s.io"], "crds": ["widgets.example.com"],
     "objects": {"secrets": {"<ns>/<name>" or "<name>": object}},
     "current_key": "kek-2", "stored_under": {"secrets/<ns>/<name>": "kek-1"},     # what a replace rewrites
     "faults": {"fail_after_replaces": 5, "conflict_once": [...], "delete_on_replace": [...], "refuse": [...]},
     "attempts": [every replace asked for], "replaced": [every object written], "calls": [argv, ...]}

`replace` behaves as the apiserver does for an unchanged object: it writes (new resourceVersion) only what is
stored under another key than current_key, answers Conflict for a stale resourceVersion and NotFound for a deleted
object. Faults: after fail_after_replaces successful replaces the next call fails as kubectl does when the apiserver
is gone (once); conflict_once keys see a concurrent write on their first replace; delete_on_replace keys are
deleted just before; refuse keys are refused by "an admission webhook".
"""

from __future__ import annotations

import json
import sys
from typing import Any

UNREACHABLE = "Unable to connect to the server: dial tcp 127.0.0.1:6443: connect: connection refused"


def main(argv: list[str]) -> int:
    path, args, namespace, all_namespaces, output, files = "", [], "", False, "", ""
    it = iter(argv)
    for arg in it:
        if arg == "--kubeconfig":
            path = next(it)
        elif arg in ("--namespace", "-n"):
            namespace = next(it)
        elif arg in ("--all-namespaces", "-A"):
            all_namespaces = True
        elif arg == "-o":
            output = next(it)
        elif arg == "-f":
            files = next(it)
        elif arg.startswith("--request-timeout=") or arg == "--client":
            continue
        else:
            args.append(arg)
    if args == ["version"]:
        print("Client Version: v1.31.4-standin")
        return 0
    with open(path, encoding="utf-8") as handle:
        cluster = json.load(handle)
    cluster.setdefault("calls", []).append(argv)
    try:
        code = run(cluster, args, namespace, all_namespaces, output, files)
    finally:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(cluster, handle, indent=1)
    return code


def run(cluster: dict[str, Any], args: list[str], namespace: str, all_ns: bool, output: str, files: str) -> int:
    verb = args[0]
    if verb == "api-resources":
        namespaced = next(a for a in args if a.startswith("--namespaced=")).endswith("true")
        for name, info in cluster["resources"].items():
            if info["namespaced"] == namespaced:
                print(name)
        return 0
    if verb == "get":
        return get(cluster, args[1], args[2] if len(args) > 2 else "", namespace, all_ns)
    if verb == "replace" and files == "-":
        return replace(cluster, json.load(sys.stdin), namespace, output)
    print(f"error: the stand-in does not know {args}", file=sys.stderr)
    return 2


def key_of(resource: str, namespace: str, name: str, cluster: dict[str, Any]) -> str:
    return f"{namespace}/{name}" if cluster["resources"][resource]["namespaced"] else name


def get(cluster: dict[str, Any], resource: str, name: str, namespace: str, all_ns: bool) -> int:
    if resource == "apiservices.apiregistration.k8s.io":
        items = [{"spec": {"group": g, "service": {"name": "x"}}} for g in cluster.get("aggregated", [])]
        items.append({"spec": {"group": "apps", "service": None}})
        print(json.dumps({"kind": "List", "items": items}))
        return 0
    if resource == "customresourcedefinitions.apiextensions.k8s.io":
        items = [
            {"spec": {"group": crd.partition(".")[2], "names": {"plural": crd.partition(".")[0]}}}
            for crd in cluster.get("crds", [])
        ]
        print(json.dumps({"kind": "List", "items": items}))
        return 0
    if resource not in cluster["resources"]:
        print(f'error: the server doesn\'t have a resource type "{resource}"', file=sys.stderr)
        return 1
    stored = cluster["objects"].get(resource, {})
    if name:
        obj = stored.get(key_of(resource, namespace, name, cluster))
        if obj is None:
            print(f'Error from server (NotFound): {resource} "{name}" not found', file=sys.stderr)
            return 1
        print(json.dumps(obj))
        return 0
    items = [
        obj
        for key, obj in sorted(stored.items())
        if all_ns or not cluster["resources"][resource]["namespaced"] or key.partition("/")[0] == namespace
    ]
    print(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    return 0


def replace(cluster: dict[str, Any], obj: dict[str, Any], namespace: str, output: str) -> int:
    faults = cluster.setdefault("faults", {})
    resource = next(r for r, info in cluster["resources"].items() if info["kind"] == obj["kind"])
    meta = obj["metadata"]
    namespace = meta.get("namespace") or namespace
    key = key_of(resource, namespace, meta["name"], cluster)
    full = f"{resource}/{key}"
    cluster.setdefault("attempts", []).append(full)
    if (
        faults.get("fail_after_replaces") is not None
        and len(cluster.get("replaced", [])) >= faults["fail_after_replaces"]
    ):
        del faults["fail_after_replaces"]
        print(UNREACHABLE, file=sys.stderr)
        return 1
    stored = cluster["objects"].setdefault(resource, {})
    if full in faults.get("delete_on_replace", []):
        faults["delete_on_replace"].remove(full)
        stored.pop(key, None)
    if full in faults.get("refuse", []):
        print(
            f'Error from server (Forbidden): error when replacing "STDIN": admission webhook "guard.example.com" '
            f'denied the request: {resource} "{meta["name"]}" is frozen',
            file=sys.stderr,
        )
        return 1
    if key not in stored:
        print(
            f'Error from server (NotFound): error when replacing "STDIN": {resource} "{meta["name"]}" not found',
            file=sys.stderr,
        )
        return 1
    current = stored[key]
    if full in faults.get("conflict_once", []):  # someone else writes it first (which re-encrypts it too)
        faults["conflict_once"].remove(full)
        current["metadata"]["resourceVersion"] = str(int(current["metadata"]["resourceVersion"]) + 1)
        cluster["stored_under"][full] = cluster["current_key"]
    if meta.get("resourceVersion") != current["metadata"]["resourceVersion"]:
        print(
            f'Error from server (Conflict): error when replacing "STDIN": Operation cannot be fulfilled on '
            f'{resource} "{meta["name"]}": the object has been modified; please apply your changes to the latest '
            "version and try again",
            file=sys.stderr,
        )
        return 1
    if cluster["stored_under"].get(full) != cluster["current_key"]:
        obj["metadata"]["resourceVersion"] = str(int(current["metadata"]["resourceVersion"]) + 1)
        stored[key] = obj
        cluster["stored_under"][full] = cluster["current_key"]
        cluster.setdefault("replaced", []).append(full)
    if output != "jsonpath={.metadata.resourceVersion}":
        print("error: the stand-in answers only -o jsonpath={.metadata.resourceVersion}", file=sys.stderr)
        return 2
    sys.stdout.write(stored[key]["metadata"]["resourceVersion"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
