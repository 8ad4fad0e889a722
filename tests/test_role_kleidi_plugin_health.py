"""The kleidi_plugin role's health gate: no apiserver is touched unless every control-plane node's plugin is healthy
and all of them use one KEK; otherwise the play stops and names each node's key_id."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.ansible_run import PlayResult, local_inventory, run_playbook
from tests.backends.softhsm import SoftHsm
from tests.conftest import pkcs11_config
from tests.plugin import REPO, KleidiProcess

pytestmark = pytest.mark.integration

PLAYBOOK = REPO / "tests" / "playbooks" / "kleidi_plugin_health.yml"


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    roots = (tmp_path / "cp-1", tmp_path / "cp-2")
    for root in roots:
        (root / "run" / "kleidi").mkdir(parents=True)
    yield roots


def serve(stack: ExitStack, root: Path, hsm: SoftHsm) -> KleidiProcess:
    """A real plugin listening where the node's apiserver would dial it (<node root>/run/kleidi/kleidi.sock)."""
    socket = root / "run" / "kleidi" / "kleidi.sock"
    plugin = stack.enter_context(
        KleidiProcess(root / "plugin", {**pkcs11_config(hsm), "listen": f"unix://{socket}"}, env=hsm.env)
    )
    plugin.socket = str(socket)
    plugin.start()
    plugin.wait_healthy()
    return plugin


def gate(tmp_path: Path, roots: tuple[Path, Path]) -> PlayResult:
    hosts = {root.name: {"kleidi_node_root": str(root)} for root in roots}
    return run_playbook(PLAYBOOK, local_inventory(tmp_path / "hosts.yml", hosts))


def test_nodes_that_share_the_kek_pass(tmp_path: Path, nodes: tuple[Path, Path]) -> None:
    hsm = SoftHsm(tmp_path / "hsm")
    hsm.keygen("kek-1")
    with ExitStack() as stack:
        for root in nodes:
            serve(stack, root, hsm)
        result = gate(tmp_path, nodes).assert_ok()
    assert "every control-plane node uses key_id pkcs11:" in result.output


def test_nodes_with_different_keks_stop_the_play_naming_each_key_id(tmp_path: Path, nodes: tuple[Path, Path]) -> None:
    with ExitStack() as stack:
        key_ids = {}
        for root in nodes:
            hsm = SoftHsm(tmp_path / f"hsm-{root.name}")
            hsm.keygen("kek-1")
            with serve(stack, root, hsm).client() as kms:
                key_ids[root.name] = kms.status().key_id
        result = gate(tmp_path, nodes)
    assert result.returncode != 0
    assert "do not share one KEK" in result.output
    assert key_ids["cp-1"] != key_ids["cp-2"]
    for host, key_id in key_ids.items():
        assert f"{host}: {key_id}" in result.output


def test_a_node_without_a_plugin_stops_the_play(tmp_path: Path, nodes: tuple[Path, Path]) -> None:
    hsm = SoftHsm(tmp_path / "hsm")
    hsm.keygen("kek-1")
    with ExitStack() as stack:
        serve(stack, nodes[0], hsm)
        result = gate(tmp_path, nodes)
    assert result.returncode != 0
    assert "kleidi on cp-2 did not pass `kleidi check`" in result.output


EXCLUSIVE = REPO / "tests" / "playbooks" / "kleidi_plugin_exclusive.yml"


def test_a_node_served_by_another_install_is_refused_before_anything_changes(
    tmp_path: Path, nodes: tuple[Path, Path]
) -> None:
    hsm = SoftHsm(tmp_path / "hsm")
    hsm.keygen("kek-1")
    inventory = local_inventory(tmp_path / "hosts.yml", {nodes[0].name: {"kleidi_node_root": str(nodes[0])}})
    with ExitStack() as stack:
        serve(stack, nodes[0], hsm)  # as the Helm chart's DaemonSet would
        refused = run_playbook(EXCLUSIVE, inventory)
        assert refused.returncode != 0
        assert "most likely the kleidi Helm chart's DaemonSet" in refused.output
        # The same plugin, installed by this role (its static pod manifest is there), is this role's to manage.
        manifests = nodes[0] / "etc" / "kubernetes" / "manifests"
        manifests.mkdir(parents=True)
        (manifests / "kleidi.yaml").write_text("{}")
        run_playbook(EXCLUSIVE, inventory).assert_ok()
    (manifests / "kleidi.yaml").unlink()
    # A socket nobody serves any more (a plugin that was killed leaves it behind) is no obstacle.
    stale = nodes[0] / "run" / "kleidi" / "kleidi.sock"
    stale.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left_behind:
        left_behind.bind(str(stale))
    assert stale.is_socket()
    run_playbook(EXCLUSIVE, inventory).assert_ok()
