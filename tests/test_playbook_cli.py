"""playbooks/cli.yml: the kleidi command on every control-plane node, and nothing else on it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kleidi import __version__
from tests.ansible_run import local_inventory, run_playbook
from tests.plugin import REPO

pytestmark = pytest.mark.integration


def test_cli_installs_only_the_kleidi_command_and_a_second_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "cp-1"
    root.mkdir()
    inventory = local_inventory(tmp_path / "hosts.yml", {"cp-1": {"kleidi_node_root": str(root)}})
    run_playbook(REPO / "playbooks" / "cli.yml", inventory).assert_ok()
    done = subprocess.run([root / "opt/kleidi/bin/kleidi", "version"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"kleidi {__version__}"
    made = {path.name for path in root.iterdir()}
    assert made == {"opt"}, f"cli.yml wrote more than the virtualenv: {made}"
    run_playbook(REPO / "playbooks" / "cli.yml", inventory).assert_unchanged()
