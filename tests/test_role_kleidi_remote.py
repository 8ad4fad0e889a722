"""The kleidi_remote role, run by ansible-playbook on two simulated control-plane nodes (local hosts with a node root
each), with a proxy-mode PKI made by kleidi.pki where the role looks by default (<inventory>/pki, `kleidi pki init`'s
file names): each node gets the CA and its own client certificate and key with the right owner and modes, the fact
names the key servers of the inventory and the node paths, and kleidi's config model accepts it; a second run
changes nothing, a renewed certificate reaches only its node, check mode writes nothing, the key never shows in
the output (--diff included), and settings the plugin could not use stop the role before it writes anything."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from kleidi import config as kleidi_config
from kleidi import pki
from tests.ansible_run import PlayResult, run_playbook
from tests.plugin import REPO

pytestmark = pytest.mark.integration

PLAYBOOK = REPO / "tests" / "playbooks" / "kleidi_remote.yml"
NODES = ("cp-1", "cp-2")
KEY_SERVERS = ("ks-1.example", "ks-2.example")
UID = GID = 10001  # the kleidi role's kleidi_user / kleidi_group
REMOTE_DIR = "etc/kleidi/remote"


@dataclass
class Site:
    """An inventory (control-plane nodes with node roots, key servers never contacted), its PKI, every output."""

    base: Path
    key_servers: tuple[str, ...] = KEY_SERVERS
    outputs: list[str] = field(default_factory=list)

    @property
    def pki_dir(self) -> Path:
        return self.base / "inventory" / "pki"

    def root(self, host: str) -> Path:
        return self.base / "nodes" / host

    def make_pki(self) -> None:
        requests = [pki.Request("server", name) for name in self.key_servers]
        requests += [pki.Request("client", name) for name in NODES]
        pki.init(self.pki_dir, requests)

    def inventory(self) -> Path:
        system = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
        nodes = {host: {**system, "kleidi_node_root": str(self.root(host))} for host in NODES}
        children: dict[str, Any] = {"kube_control_plane": {"hosts": nodes}}
        if self.key_servers:
            children["kleidi_keyservers"] = {"hosts": {name: dict(system) for name in self.key_servers}}
        path = self.base / "inventory" / "hosts.yml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({"all": {"children": children}}, sort_keys=False))
        return path

    def play(self, *args: str, **extra: Any) -> PlayResult:
        result = run_playbook(
            PLAYBOOK, self.inventory(), *args, extra_vars={"kleidi_test_fact_dir": str(self.base), **extra}
        )
        self.outputs.append(result.output)
        return result

    def facts(self) -> dict[str, dict[str, Any]]:
        return dict(json.loads((self.base / "facts.json").read_text()))

    def node_files(self, host: str) -> dict[str, tuple[int, int, int, bytes]]:
        """name -> (mode, uid, gid, content) of the node's proxy-mode files."""
        found = {}
        for path in sorted((self.root(host) / REMOTE_DIR).iterdir()):
            st = path.stat()
            found[path.name] = (st.st_mode & 0o7777, st.st_uid, st.st_gid, path.read_bytes())
        return found


def expected_fact(endpoints: list[str], timeout: str = "1s") -> dict[str, Any]:
    return {
        "provider": "remote",
        "settings": {
            "endpoints": endpoints,
            "ca_cert": "/etc/kleidi/remote/ca.pem",
            "client_cert": "/etc/kleidi/remote/client.pem",
            "client_key": "/etc/kleidi/remote/client-key.pem",
            "timeout": timeout,
        },
        "env": {},
        "volumes": [],
    }


def check_node(site: Site, host: str) -> None:
    remote_dir = site.root(host) / REMOTE_DIR
    for directory in (remote_dir.parent, remote_dir):
        st = directory.stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, UID, GID), directory
    client, key = pki.leaf_files(site.pki_dir, "client", host)
    assert site.node_files(host) == {
        "ca.pem": (0o644, UID, GID, (site.pki_dir / pki.CA_CERT).read_bytes()),
        "client.pem": (0o644, UID, GID, client.read_bytes()),
        "client-key.pem": (0o600, UID, GID, key.read_bytes()),
    }


def secrets_of(site: Site) -> list[str]:
    """The private keys' PEM bodies (one line each is enough to tell), none of which may ever show."""
    keys = [site.pki_dir / pki.CA_KEY, *(pki.leaf_files(site.pki_dir, "client", host)[1] for host in NODES)]
    return [key.read_text().splitlines()[1] for key in keys]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Site:
    site = Site(tmp_path_factory.mktemp("remote"))
    site.make_pki()
    site.play("--diff", "-v").assert_ok()
    return site


def test_each_node_gets_the_ca_and_its_own_client_certificate_and_key(installed: Site) -> None:
    for host in NODES:
        check_node(installed, host)
    assert installed.node_files("cp-1")["client.pem"] != installed.node_files("cp-2")["client.pem"]
    assert not (installed.root("cp-1") / REMOTE_DIR / pki.CA_KEY).exists()


def test_the_fact_names_the_key_servers_of_the_inventory_and_kleidi_accepts_it(installed: Site) -> None:
    facts = installed.facts()
    endpoints = [f"{name}:8443" for name in KEY_SERVERS]
    assert facts == {host: expected_fact(endpoints) for host in NODES}
    config = kleidi_config.validate({"provider": "remote", "remote": facts["cp-1"]["settings"]})
    assert config.remote is not None and config.remote.endpoints == endpoints and config.remote.timeout == 1.0


def test_no_private_key_shows_in_the_output(installed: Site) -> None:
    for secret in secrets_of(installed):
        for output in installed.outputs:
            assert secret not in output, "a private key reached ansible-playbook's output"


def test_a_second_run_changes_nothing_and_a_renewed_certificate_reaches_only_its_node(installed: Site) -> None:
    before = {host: installed.node_files(host) for host in NODES}
    # Endpoints given outright replace the inventory's key servers; they are kleidi.yaml's alone, no file changes.
    given = ["[fd00::21]:8443", "10.0.0.22:9443"]
    installed.play(kleidi_remote_endpoints=given, kleidi_remote_timeout="500ms").assert_unchanged()
    assert {host: installed.node_files(host) for host in NODES} == before
    assert installed.facts()["cp-2"] == expected_fact(given, timeout="500ms")

    # A renewal: kleidi pki issue writes elsewhere, the operator moves the pair into place.
    renewed = installed.base / "renewed"
    renewed.mkdir()
    pki.issue(installed.pki_dir, [pki.Request("client", "cp-2")], out=renewed)
    for path in renewed.iterdir():
        path.replace(installed.pki_dir / path.name)
    again = installed.play().assert_ok()
    assert again.changed() == {"cp-1": 0, "cp-2": 2}  # the key, then its certificate
    assert installed.node_files("cp-1") == before["cp-1"]
    check_node(installed, "cp-2")
    assert installed.node_files("cp-2")["client.pem"] != before["cp-2"]["client.pem"]


def test_check_mode_writes_nothing(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.make_pki()
    checked = site.play("--check", "--diff").assert_ok()
    assert set(checked.changed()) == set(NODES) and all(checked.changed().values())
    assert not (tmp_path / "nodes").exists()
    for secret in secrets_of(site):
        assert secret not in checked.output


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no key servers", "needs 1 to 8 key servers"),
        ("a URL for an endpoint", "https://ks-1.example:8443"),
        ("an endpoint twice", "each host:port once"),
        ("an unreadable timeout", "kleidi_remote_timeout must be a duration"),
        ("a node without its key", "client-cp-2-key.pem"),
    ],
)
def test_settings_the_plugin_could_not_use_stop_the_role_before_it_writes(
    tmp_path: Path, case: str, message: str
) -> None:
    site = Site(tmp_path, key_servers=() if case == "no key servers" else KEY_SERVERS)
    site.make_pki()
    extra: dict[str, Any] = {
        "a URL for an endpoint": {"kleidi_remote_endpoints": ["https://ks-1.example:8443"]},
        "an endpoint twice": {"kleidi_remote_endpoints": ["ks-1.example:8443", "ks-1.example:8443"]},
        "an unreadable timeout": {"kleidi_remote_timeout": "soon"},
    }.get(case, {})
    if case == "a node without its key":
        pki.leaf_files(site.pki_dir, "client", "cp-2")[1].unlink()
    result = site.play(**extra)
    assert result.returncode != 0 and message in result.output, result.output[-3000:]
    failed = {host for host, count in result.failed().items() if count}
    assert failed == ({"cp-2"} if case == "a node without its key" else set(NODES))
    for host in failed:
        assert not site.root(host).exists(), f"{host}: the role wrote before it refused"
