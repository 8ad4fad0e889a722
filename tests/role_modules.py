"""Import the Ansible modules and filter plugins that roles ship, so their pure functions can be tested directly."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from tests.plugin import REPO

ROLES = REPO / "roles"


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def apiserver_module(name: str) -> ModuleType:
    """A module of the kleidi_apiserver role, with the kleidi role's module_utils where Ansible would put them."""
    role = ROLES / "kleidi_apiserver"
    load(ROLES / "kleidi" / "module_utils" / "kleidi_files.py", "ansible.module_utils.kleidi_files")
    return load(role / "library" / f"{name}.py", f"kleidi_role_{name}")


def pod_filters() -> ModuleType:
    return load(ROLES / "kleidi_plugin" / "filter_plugins" / "kleidi_pod.py", "kleidi_role_pod")
