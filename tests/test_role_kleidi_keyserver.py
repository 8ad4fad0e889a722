"""Proxy mode through the real playbooks, on local node roots: playbooks/site.yml's key server play (role
kleidi_keyserver with a SoftHSM2 backend) on two key servers, then the control-plane nodes the way site.yml's next
play gives them kleidi (tests/playbooks/kleidi_install.yml: role kleidi_remote, then kleidi_plugin as a static pod).

Stand-ins run what a real node would start: systemd's part for the key servers (a `kleidi serve` from the host's
kleidi.yaml once the role wrote the unit, restarted when either changes) and the kubelet's for the control-plane
nodes (tests/kubelet.py). Checked: the key servers' files, kleidi.yaml (serve_remote, its allow-list of the
control-plane hosts) and unit; both key servers share one KEK (the token made once and copied); the role's own
health gate passes on both sides; a data key wrapped through one control-plane node unwraps through the other and
through a key server's own socket, under the key servers' key_id; a client certificate the CA signed for a name
outside the allow-list is refused and logged; a second run changes nothing; the PINs and keys never show; and the
role refuses a host that is also a control-plane node, and a play that does not make the key servers the group
sharing the KEK."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from kleidi import pki
from tests.ansible_run import PlayResult, run_playbook
from tests.kleidi_nodes import bare_kubeadm_node
from tests.kubelet import StaticPods, node_config, softhsm_env
from tests.plugin import REPO, KleidiProcess, free_port, wait_for

pytestmark = pytest.mark.integration

SITE = REPO / "playbooks" / "site.yml"
INSTALL = REPO / "tests" / "playbooks" / "kleidi_install.yml"
ALONE = REPO / "tests" / "playbooks" / "kleidi_keyserver_alone.yml"
KEY_SERVERS = ("ks-1", "ks-2")
NODES = ("cp-1", "cp-2")
PIN = "pin-" + secrets.token_hex(8)
SO_PIN = "so-" + secrets.token_hex(8)
UID = GID = 10001
UNIT = "etc/systemd/system/kleidi.service"
CONFIG = "etc/kleidi/kleidi.yaml"


class Units(StaticPods):
    """systemd's part on the key servers' node roots: once the role has written the kleidi unit, a `kleidi serve`
    from the host's kleidi.yaml (its node paths read under the root), replaced whenever the unit or kleidi.yaml
    changes, as the role's restart handler would on a real host."""

    def __init__(self, workdir: Path, roots: list[Path]) -> None:
        super().__init__(workdir, roots, softhsm_env)

    def watched(self, root: Path) -> bytes:
        return (root / UNIT).read_bytes() + (root / CONFIG).read_bytes()

    def node_config(self, root: Path) -> dict[str, Any]:
        config = node_config(root, yaml.safe_load((root / CONFIG).read_text()))
        serve = dict(config["serve_remote"])
        for key in ("ca_cert", "cert", "key"):
            serve[key] = f"{root}{serve[key]}"
        config["serve_remote"] = serve
        return config


@dataclass
class Site:
    base: Path
    ports: dict[str, int] = field(default_factory=lambda: {host: free_port() for host in KEY_SERVERS})
    outputs: list[str] = field(default_factory=list)

    @property
    def pki_dir(self) -> Path:
        return self.base / "inventory" / "pki"

    def root(self, host: str) -> Path:
        return self.base / "nodes" / host

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{self.ports[host]}" for host in KEY_SERVERS]

    def prepare(self) -> None:
        # The nodes dial 127.0.0.1, so the key servers' certificates carry it besides their names.
        requests = [pki.Request("server", host, ("127.0.0.1",)) for host in KEY_SERVERS]
        requests += [pki.Request("client", name) for name in (*NODES, "intruder")]
        pki.init(self.pki_dir, requests)
        for host in KEY_SERVERS:  # the kleidi command where kleidi_plugin puts it: this test's own, no wheel
            venv = self.root(host) / "opt/kleidi/bin"
            venv.mkdir(parents=True)
            (venv / "kleidi").symlink_to(Path(sys.executable).with_name("kleidi"))
        for host in NODES:
            bare_kubeadm_node(self.root(host))

    def inventory(self, also_control_plane: tuple[str, ...] = ()) -> Path:
        system = {"ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3"}
        servers = {
            host: {**system, "kleidi_node_root": str(self.root(host)), "kleidi_keyserver_listen": self.endpoints[n]}
            for n, host in enumerate(KEY_SERVERS)
        }
        nodes = {host: {**system, "kleidi_node_root": str(self.root(host))} for host in NODES}
        nodes |= {host: servers[host] for host in also_control_plane}
        data = {
            "all": {
                "hosts": {"localhost": system},
                "children": {"kleidi_keyservers": {"hosts": servers}, "kube_control_plane": {"hosts": nodes}},
            }
        }
        path = self.base / "inventory" / "hosts.yml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def play(self, playbook: Path, *args: str, inventory: Path | None = None, **extra: Any) -> PlayResult:
        variables = {
            "kleidi_softhsm_pin": PIN,
            "kleidi_softhsm_so_pin": SO_PIN,
            "kleidi_plugin_health_timeout": 60,
            "kleidi_backend_role": "kleidi_remote",  # the control-plane nodes' (the key servers have their own)
            "kleidi_remote_endpoints": self.endpoints,
            **extra,
        }
        result = run_playbook(playbook, inventory or self.inventory(), *args, extra_vars=variables)
        self.outputs.append(result.output)
        return result

    def secrets(self) -> list[str]:
        keys = [self.pki_dir / pki.CA_KEY]
        keys += [pki.leaf_files(self.pki_dir, "server", host)[1] for host in KEY_SERVERS]
        keys += [pki.leaf_files(self.pki_dir, "client", host)[1] for host in NODES]
        return [PIN, SO_PIN, *(key.read_text().splitlines()[1] for key in keys)]


@dataclass
class Running:
    site: Site
    units: Units
    pods: StaticPods
    key_servers: PlayResult
    nodes: PlayResult


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    site = Site(tmp_path_factory.mktemp("keyserver"))
    site.prepare()
    roots = [site.root(host) for host in KEY_SERVERS]
    with Units(site.base / "units", roots) as units:
        key_servers = site.play(SITE, "--limit", "kleidi_keyservers")
        assert not units.errors, units.errors
        key_servers.assert_ok()
        node_roots = [site.root(host) for host in NODES]
        with StaticPods(site.base / "pods", node_roots, lambda root: dict(os.environ)) as pods:
            nodes = site.play(INSTALL, "--limit", "kube_control_plane")
            assert not pods.errors, pods.errors
            nodes.assert_ok()
            yield Running(site, units, pods, key_servers, nodes)


def test_the_key_servers_get_their_certificate_and_serve_remote_for_the_control_plane(running: Running) -> None:
    site = running.site
    for n, host in enumerate(KEY_SERVERS):
        remote = site.root(host) / "etc/kleidi/remote"
        cert, key = pki.leaf_files(site.pki_dir, "server", host)
        found = {
            p.name: ((st := p.stat()).st_mode & 0o777, st.st_uid, st.st_gid, p.read_bytes()) for p in remote.iterdir()
        }
        assert found == {
            "ca.pem": (0o644, UID, GID, (site.pki_dir / pki.CA_CERT).read_bytes()),
            "server.pem": (0o644, UID, GID, cert.read_bytes()),
            "server-key.pem": (0o600, UID, GID, key.read_bytes()),
        }
        config = yaml.safe_load((site.root(host) / CONFIG).read_text())
        assert config["provider"] == "pkcs11" and "remote" not in config
        assert config["serve_remote"] == {
            "listen": site.endpoints[n],
            "ca_cert": "/etc/kleidi/remote/ca.pem",
            "cert": "/etc/kleidi/remote/server.pem",
            "key": "/etc/kleidi/remote/server-key.pem",
            "allowed_client_names": list(NODES),
        }
        unit = (site.root(host) / UNIT).read_text()
        assert "ExecStart=/opt/kleidi/bin/kleidi serve --config /etc/kleidi/kleidi.yaml" in unit


def test_every_key_server_serves_one_kek_and_the_nodes_see_its_key_id(running: Running) -> None:
    key_ids = set()
    for host in KEY_SERVERS:
        with running.units.plugin(running.site.root(host)).client() as kms:
            key_ids.add(kms.status().key_id)
    (key_id,) = key_ids
    assert "every control-plane node uses key_id " + key_id in running.key_servers.output  # the key servers' gate
    assert "every control-plane node uses key_id " + key_id in running.nodes.output  # the nodes' gate
    for host in NODES:
        config = yaml.safe_load((running.site.root(host) / CONFIG).read_text())
        assert config["provider"] == "remote" and "pkcs11" not in config
        assert config["remote"]["endpoints"] == running.site.endpoints


def test_a_data_key_wrapped_through_one_node_unwraps_through_the_other_and_the_key_server(running: Running) -> None:
    one, two = (running.pods.plugin(running.site.root(host)) for host in NODES)
    key_server = running.units.plugin(running.site.root(KEY_SERVERS[1]))
    data_key = secrets.token_bytes(32)
    with one.client() as kms:
        wrapped = kms.encrypt(data_key, uid="through-cp-1")
    for plugin in (two, key_server):
        with plugin.client() as kms:
            assert (
                kms.decrypt(wrapped.ciphertext, wrapped.key_id, dict(wrapped.annotations), "through-cp-1") == data_key
            )


def test_a_certificate_for_a_name_outside_the_allow_list_is_refused(running: Running) -> None:
    site = running.site
    cert, key = pki.leaf_files(site.pki_dir, "client", "intruder")
    remote = {"endpoints": site.endpoints, "ca_cert": str(site.pki_dir / pki.CA_CERT), "client_cert": str(cert),
              "client_key": str(key), "timeout": "1s"}  # fmt: skip
    key_server = running.units.plugin(site.root(KEY_SERVERS[0]))
    with KleidiProcess(site.base / "intruder", {"provider": "remote", "remote": remote, "health_interval": "1s"}) as p:
        p.start()
        with p.client() as kms, pytest.raises(grpc.RpcError) as refused_call:
            kms.encrypt(secrets.token_bytes(32), uid="intruder")
        assert refused_call.value.code() == grpc.StatusCode.UNAVAILABLE
        assert p.healthz()[0] != 200

    def refusals() -> list[dict[str, Any]]:
        return [r for r in key_server.log_records() if r.get("subject_cn") == "intruder" and "refused" in r["msg"]]

    assert "allowed_client_names" in wait_for(refusals, 20, "the key server to log the refusal")[0]["reason"]


def test_a_second_run_changes_nothing_and_no_secret_shows(running: Running) -> None:
    site = running.site
    again = site.play(SITE, "--limit", "kleidi_keyservers").assert_unchanged()
    assert "every control-plane node uses key_id" in again.output
    site.play(INSTALL, "--limit", "kube_control_plane").assert_unchanged()
    assert running.units.starts == dict.fromkeys([site.root(host) for host in KEY_SERVERS], 1)
    for secret in site.secrets():
        for output in site.outputs:
            assert secret not in output, "a PIN or a private key reached ansible-playbook's output"


def test_a_key_server_that_is_also_a_control_plane_node_is_refused(running: Running) -> None:
    site = running.site
    inventory = site.inventory(also_control_plane=("ks-2",))
    try:
        refused = site.play(SITE, "--limit", "kleidi_keyservers", inventory=inventory)
    finally:
        site.inventory()
    assert refused.returncode != 0 and "A key server is a host of its own" in refused.output


def test_the_role_refuses_a_play_that_does_not_make_the_key_servers_share_the_kek(running: Running) -> None:
    refused = running.site.play(ALONE)
    assert refused.returncode != 0 and "as playbooks/site.yml's first play does" in refused.output


def test_check_mode_on_fresh_key_servers_writes_nothing(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.prepare()
    before = sorted(str(path) for path in (tmp_path / "nodes").rglob("*"))
    checked = site.play(SITE, "--limit", "kleidi_keyservers", "--check").assert_ok()
    assert all(checked.changed()[host] for host in KEY_SERVERS)
    assert sorted(str(path) for path in (tmp_path / "nodes").rglob("*")) == before
    for secret in site.secrets():
        assert secret not in checked.output
