"""`ansible-playbook playbooks/site.yml --check` on a fresh kubeadm control-plane node shows what it would change
and changes nothing: the node is one of molecule/default's simulated nodes, laid down by its prepare.yml, with its
apiserver stand-in running under its node agent."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.ansible_run import local_inventory, run_playbook
from tests.plugin import REPO

pytestmark = pytest.mark.integration

SCENARIO = REPO / "molecule" / "default"
# Directories of the real host that the roles would write to on a real node; a check run must not touch them.
REAL_PATHS = ("/etc/kubernetes", "/etc/kleidi", "/run/kleidi", "/var/lib/kleidi", "/opt/kleidi", "/var/backups/kleidi")


def snapshot(*roots: str | Path) -> dict[str, tuple[int, int, str]]:
    """Every path under the roots with its mode, owner and content hash (or link target)."""
    found: dict[str, tuple[int, int, str]] = {}
    for root in roots:
        if not os.path.lexists(root):
            continue
        for path in [Path(root), *Path(root).rglob("*")]:
            st = path.lstat()
            if path.is_symlink():
                content = "-> " + os.readlink(path)
            elif path.is_file():
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = ""
            found[str(path)] = (st.st_mode, st.st_uid, content)
    return found


@pytest.fixture
def fresh_node(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A freshly prepared simulated node (apiserver with an aescbc configuration, no kleidi); stopped afterwards."""
    state = Path(f"/var/tmp/kleidi-check-{secrets.token_hex(3)}")
    group_vars = yaml.safe_load((REPO / "inventories/molecule/group_vars/kube_control_plane.yml").read_text())
    group_vars |= yaml.safe_load((REPO / "inventories/molecule/group_vars/all/simnode.yml").read_text())
    group_vars["simnode_state_root"] = str(state)
    inventory = local_inventory(
        tmp_path / "hosts.yml",
        {"cp-1": {"kleidi_node_root": str(state / "cp-1"), "kleidi_node_address": "127.0.0.21", **group_vars}},
    )
    try:
        run_playbook(SCENARIO / "prepare.yml", inventory).assert_ok()
        yield inventory, state / "cp-1"
    finally:
        subprocess.run(
            [
                sys.executable,
                str(SCENARIO / "simnode" / "node_agent.py"),
                "stop",
                "--state-dir",
                str(state / "agents" / "cp-1"),
            ],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(state, ignore_errors=True)


def test_check_mode_on_a_fresh_node_shows_the_changes_and_makes_none(fresh_node: tuple[Path, Path]) -> None:
    inventory, root = fresh_node
    before = snapshot(root, *REAL_PATHS)
    result = run_playbook(REPO / "playbooks" / "site.yml", inventory, "--check", "--diff").assert_ok()
    assert result.changed()["cp-1"] > 0, "check mode showed no change on a node without kleidi"
    for shown in ("kleidi.yaml", "kube-apiserver.yaml", "encryption-provider-config", "kms"):
        assert shown in result.output, f"the --diff output does not show {shown}"
    assert snapshot(root, *REAL_PATHS) == before, "a --check run changed files"
    assert "molecule-user-pin" not in result.output and "molecule-so-pin" not in result.output
