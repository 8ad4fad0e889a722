"""The official Helm CLI and kubectl from .tools/bin (`python -m scripts.tools` puts them there), for tests.

`render()` gives every object `helm template` renders for the chart, the `helm test` hook pod included.
A missing or different binary fails the test with the command that fetches it; nothing is skipped.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from scripts import tools
from tests.plugin import REPO

CHART = REPO / "helm" / "kleidi"
TOOLS_BIN = REPO / ".tools" / "bin"
HELM = TOOLS_BIN / "helm"
KUBECTL = TOOLS_BIN / "kubectl"
# Helm's own config, cache and data directories, so no user's repositories, plugins or registry logins leak in.
HELM_HOME = REPO / ".tools" / "helm-home"
FETCH = "python -m scripts.tools"


@functools.cache
def _binary(name: str) -> Path:
    path = TOOLS_BIN / name
    wanted = tools.TOOLS_WANTED[name][1]
    if not path.is_file():
        raise AssertionError(f"{path} is missing; run: {FETCH}")
    got = tools.reported_version(name, path)
    if got != wanted:
        raise AssertionError(f"{path} reports {got or 'no version'}, expected {wanted}; run: {FETCH}")
    return path


def _run(name: str, args: Sequence[str], check: bool) -> subprocess.CompletedProcess[str]:
    argv = [str(_binary(name)), *args]
    env = dict(os.environ)
    if name == "helm":
        env.update(
            HELM_CONFIG_HOME=str(HELM_HOME / "config"),
            HELM_CACHE_HOME=str(HELM_HOME / "cache"),
            HELM_DATA_HOME=str(HELM_HOME / "data"),
        )
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=120, check=False)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{name} {' '.join(args)} exited with {done.returncode}\n--- stdout\n{done.stdout}--- stderr\n{done.stderr}"
        )
    return done


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `helm ARGS...` from the repository root; with check, a non-zero exit fails with its stdout and stderr."""
    return _run("helm", args, check)


def kubectl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `kubectl ARGS...` the same way (client-side commands only: there is no cluster here)."""
    return _run("kubectl", args, check)


def render(
    *values_files: Path | str,
    set_values: dict[str, str] | None = None,
    release: str = "kleidi",
    namespace: str = "kube-system",
    extra_args: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Every object `helm template RELEASE CHART` renders, hooks and the `helm test` pod included, in output order.

    values_files are passed as `-f` in order (later ones win); set_values as `--set KEY=VALUE` (Helm parses the
    value: "true" is a boolean, "3" a number, a comma splits it). extra_args go last (e.g. --kube-version).
    """
    args = ["template", release, str(CHART), "--namespace", namespace]
    for values in values_files:
        args += ["--values", str(values)]
    for key, value in (set_values or {}).items():
        args += ["--set", f"{key}={value}"]
    args += extra_args
    out = helm(*args).stdout
    objects = [doc for doc in yaml.safe_load_all(out) if doc is not None]
    for doc in objects:
        assert isinstance(doc, dict), f"helm template rendered a non-mapping document: {doc!r}"
    return objects
