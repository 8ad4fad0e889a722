"""Run the project's real playbooks with ansible-playbook, as an operator would, and read the outcome."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.plugin import REPO

_RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)


@dataclass
class PlayResult:
    returncode: int
    output: str

    def changed(self) -> dict[str, int]:
        """Changed-task count per host from the PLAY RECAP."""
        return {host: int(changed) for host, _ok, changed, _u, _f in _RECAP.findall(self.output)}

    def failed(self) -> dict[str, int]:
        return {host: int(failed) for host, _ok, _c, _u, failed in _RECAP.findall(self.output)}

    def assert_ok(self) -> PlayResult:
        assert self.returncode == 0, f"ansible-playbook failed ({self.returncode}):\n{self.output[-6000:]}"
        return self

    def assert_unchanged(self) -> PlayResult:
        self.assert_ok()
        changed = {host: n for host, n in self.changed().items() if n}
        assert not changed, f"a second run changed something: {changed}\n{self.output[-6000:]}"
        return self


def local_inventory(path: Path, hosts: dict[str, dict[str, Any]], group: str = "kube_control_plane") -> Path:
    """Write a YAML inventory of hosts reached with the local connection, all in ``group``."""
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    data = {"all": {"children": {group: {"hosts": {name: {**local, **vars_} for name, vars_ in hosts.items()}}}}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_playbook(
    playbook: str | Path,
    inventory: Path,
    *args: str,
    extra_vars: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 900,
) -> PlayResult:
    """ansible-playbook from the top of the repository (so ansible.cfg's roles_path applies). Extra vars go
    through a file, so secrets in them never reach argv."""
    argv = [_tool("ansible-playbook"), "-i", str(inventory), str(playbook), *args]
    if extra_vars:
        vars_file = inventory.with_name(inventory.stem + ".extra-vars.json")
        vars_file.write_text(json.dumps(extra_vars))
        vars_file.chmod(0o600)
        argv += ["-e", f"@{vars_file}"]
    full_env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", **(env or {})}
    done = subprocess.run(argv, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout, check=False)
    return PlayResult(done.returncode, done.stdout + done.stderr)


def _tool(name: str) -> str:
    """A tool installed beside this Python (pip's console scripts), else from PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is missing: make deps installs it")
    return found
