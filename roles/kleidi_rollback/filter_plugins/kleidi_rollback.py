"""Filters of the kleidi_rollback role: which run a rollback undoes, decided once for every node."""

from __future__ import annotations

import json
import os

from ansible.errors import AnsibleFilterError


def kleidi_rollback_choose(runs_by_host, explicit=""):
    """The run to roll back, from each node's list of runs (kleidi_rollback state=list), oldest first.

    Without ``explicit``: the newest run that was not itself a rollback. Nodes where it is not marked rolled back
    yet are the ones to roll back (a stopped rollback resumes); when none is left, ``done`` says so and nothing is
    rolled back again: a second rollback never bounces back. With ``explicit`` (kleidi_rollback_stamp): that run,
    on every node that holds it, even a rollback (undoing it) or a run rolled back before, but never underneath a
    newer changing run that is still in force.

    Returns {stamp, hosts, done, error, message}."""
    runs = {}  # stamp -> {host: run}
    for host, found in sorted(runs_by_host.items()):
        for run in found or []:
            runs.setdefault(run["stamp"], {})[host] = run
    rollbacks = {stamp for stamp, hosts in runs.items() if any(r.get("rollback_of") for r in hosts.values())}
    changing = sorted(set(runs) - rollbacks)

    def result(stamp="", hosts=(), done=False, error="", message=""):
        return {"stamp": stamp, "hosts": sorted(hosts), "done": done, "error": error, "message": message}

    def pending(stamp):
        return [host for host, run in runs[stamp].items() if not run.get("rolled_back_by")]

    if explicit:
        if explicit not in runs:
            known = ", ".join(sorted(runs)) or "none"
            return result(error=f"no node holds backups of run {explicit} (runs found: {known})")
        newer = [s for s in changing if s > explicit and pending(s)]
        if newer:
            return result(
                error=f"run {newer[-1]} is newer than {explicit} and still in force on {', '.join(pending(newer[-1]))}:"
                f" roll it back first (its changes may be to the same files)"
            )
        kind = "the rollback " if explicit in rollbacks else "run "
        return result(explicit, runs[explicit], message=f"rolling back {kind}{explicit} on {', '.join(runs[explicit])}")
    if not changing:
        return result(done=True, message="no node holds backups of a changing run: nothing to roll back")
    last = changing[-1]
    left = pending(last)
    if left:
        return result(last, left, message=f"rolling back run {last} (the last changing run) on {', '.join(left)}")
    by = sorted({r["rolled_back_by"] for r in runs[last].values()})
    earlier = changing[-2] if len(changing) > 1 else ""
    further = f" To roll back the run before it, set kleidi_rollback_stamp={earlier}." if earlier else ""
    return result(
        last,
        done=True,
        message=f"the last changing run, {last}, was rolled back already ({', '.join(by)}) on every node it changed: "
        f"nothing to do.{further} To undo the rollback, set kleidi_rollback_stamp={by[-1]}.",
    )


def kleidi_rollback_reencrypted(state_dir, provider):
    """Whether the controller's state directory says that everything stored is under kms provider ``provider``:
    its last finished re-encryption (kleidi_reencrypt keeps one reencrypt-<id>.json per run, with its provider,
    direction and when it finished) went into that provider, not away from it (uninstall.yml's way out)."""
    try:
        names = sorted(os.listdir(state_dir))
    except (FileNotFoundError, NotADirectoryError):
        return False
    finished = []
    for name in names:
        if not (name.startswith("reencrypt-") and name.endswith(".json")):
            continue
        try:
            with open(os.path.join(state_dir, name), encoding="utf-8") as handle:
                state = json.load(handle)
        except (OSError, ValueError) as exc:
            raise AnsibleFilterError(f"cannot read the re-encryption state {name} in {state_dir}: {exc}") from exc
        if isinstance(state, dict) and state.get("provider") == provider and state.get("finished"):
            finished.append((str(state["finished"]), state.get("direction") or "into"))
    return bool(finished) and max(finished)[1] != "away"


class FilterModule:
    def filters(self):
        return {
            "kleidi_rollback_choose": kleidi_rollback_choose,
            "kleidi_rollback_reencrypted": kleidi_rollback_reencrypted,
        }
