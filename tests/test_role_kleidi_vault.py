"""The kleidi_vault role, run by ansible-playbook against a real OpenBao, on two simulated nodes (local hosts with a
node root each). For token, approle and cert auth: the role sets up the mount, key, policy and login; a real
`kleidi serve` per node, configured from the kleidi_vault_backend fact, is healthy, both report one key_id and a
ciphertext from one node decrypts on the other; the node's credential can do nothing beyond the policy; a second run
changes nothing; check mode on a fresh setup writes nothing; no secret reaches the `-v` output. The admin token is not
root: it carries the admin policy docs/vault.md gives. kubernetes auth is refused for a static pod and works otherwise.

Each ansible-playbook run costs 10-25 s of CPU here (every module run starts a Python), so the scenarios run side by
side in threads, started by one module fixture; each test waits for its own and re-raises what failed in it."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests
import yaml

from tests.ansible_run import PlayResult, local_inventory, run_playbook
from tests.backends.openbao import JwtIssuer, OpenBao, TestCA, TokenReviewServer, shared_dev_server
from tests.plugin import KleidiProcess

pytestmark = pytest.mark.integration

PLAYBOOK = "tests/playbooks/kleidi_vault.yml"
HOSTS = ("cp-1", "cp-2")
UID = GID = 10001  # the kleidi role's kleidi_user / kleidi_group


@dataclass
class Names:
    """Everything the role creates in Vault, unique per scenario (they share a server)."""

    method: str
    tag: str = field(default_factory=lambda: secrets.token_hex(4))

    @property
    def mount(self) -> str:
        return f"transit-{self.tag}"

    @property
    def key(self) -> str:
        return f"kek-{self.tag}"

    @property
    def policy(self) -> str:
        return f"kleidi-{self.tag}"

    @property
    def role(self) -> str:
        return f"kleidi-{self.tag}"

    @property
    def auth_mount(self) -> str:
        return "token" if self.method == "token" else f"{self.method}-{self.tag}"

    def role_vars(self) -> dict[str, Any]:
        variables: dict[str, Any] = {
            "kleidi_vault_auth_method": self.method,
            "kleidi_vault_transit_mount": self.mount,
            "kleidi_vault_key_name": self.key,
            "kleidi_vault_policy_name": self.policy,
            "kleidi_vault_auth_role": self.role,
        }
        if self.method != "token":
            variables["kleidi_vault_auth_mount"] = self.auth_mount
        return variables


def admin_policy(n: Names) -> str:
    """docs/vault.md's admin policy for the role, with this scenario's names."""
    paths = {
        "sys/mounts": ["read"],
        f"sys/mounts/{n.mount}": ["create", "update"],
        f"{n.mount}/keys/{n.key}": ["read", "create", "update"],
        f"{n.mount}/keys/{n.key}/config": ["update"],
        f"sys/policies/acl/{n.policy}": ["read", "create", "update"],
    }
    if n.method == "token":
        paths |= {
            f"auth/token/roles/{n.role}": ["read", "create", "update"],
            f"auth/token/create/{n.role}": ["update"],
            "auth/token/lookup": ["update"],
        }
    else:
        paths |= {"sys/auth": ["read"], f"sys/auth/{n.auth_mount}": ["create", "update", "sudo"]}
    if n.method == "approle":
        paths |= {
            f"auth/{n.auth_mount}/role/{n.role}": ["read", "create", "update"],
            f"auth/{n.auth_mount}/role/{n.role}/role-id": ["read"],
            f"auth/{n.auth_mount}/role/{n.role}/secret-id": ["update"],
        }
    if n.method == "cert":
        paths |= {f"auth/{n.auth_mount}/certs/{n.role}": ["read", "create", "update"]}
    if n.method == "kubernetes":  # the auth method is the operator's: the role only reads its config
        paths = {k: v for k, v in paths.items() if not k.startswith("sys/auth")}
        paths |= {
            f"auth/{n.auth_mount}/config": ["read"],
            f"auth/{n.auth_mount}/role/{n.role}": ["read", "create", "update"],
        }
    return "".join(f'path "{path}" {{\n  capabilities = {json.dumps(caps)}\n}}\n' for path, caps in paths.items())


def admin_token(server: OpenBao, n: Names) -> str:
    name = f"kleidi-admin-{n.tag}"
    server.client().sys.create_or_update_policy(name, admin_policy(n))
    return server.token([name], ttl="1h")


@dataclass
class Setup:
    """One scenario: a server, names, two node roots, an inventory, and every run's output (scanned for secrets)."""

    server: OpenBao
    names: Names
    root: Path
    admin: str
    extra: dict[str, Any] = field(default_factory=dict)
    host_vars: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)

    def node_root(self, host: str) -> Path:
        return self.root / "nodes" / host

    def play(self, *args: str, **overrides: Any) -> PlayResult:
        # Modules run under the system Python, as on a real Debian node and controller (it starts faster, too).
        system = {"ansible_python_interpreter": "/usr/bin/python3"}
        hosts = {h: {**system, "kleidi_node_root": str(self.node_root(h)), **self.host_vars.get(h, {})} for h in HOSTS}
        inventory = local_inventory(self.root / "hosts.yml", hosts)
        data = yaml.safe_load(inventory.read_text())
        data["all"]["hosts"] = {"localhost": {"ansible_connection": "local", **system}}  # where the Vault calls run
        inventory.write_text(yaml.safe_dump(data, sort_keys=False))
        extra = {
            "kleidi_vault_address": self.server.address,
            "kleidi_vault_admin_token": self.admin,
            **self.names.role_vars(),
            **self.extra,
            **overrides,
        }
        # json results so the test can read the facts the playbook shows
        env = {"ANSIBLE_CALLBACK_RESULT_FORMAT": "json"}
        result = run_playbook(PLAYBOOK, inventory, "-v", *args, extra_vars=extra, env=env, timeout=300)
        self.outputs.append(result.output)
        return result

    def vault(self, path: str) -> requests.Response:
        """GET as root, to see what the role did."""
        return requests.get(
            f"{self.server.address}/v1/{path}",
            headers={"X-Vault-Token": self.server.root_token},
            verify=self.server.verify,
            timeout=10,
        )

    def files(self, host: str) -> dict[str, str]:
        config_dir = self.node_root(host) / "etc/kleidi"
        return {p.name: p.read_text() for p in sorted(config_dir.iterdir())} if config_dir.exists() else {}


def new_setup(server: OpenBao, method: str, root: Path) -> Setup:
    names = Names(method)
    return Setup(server, names, root, admin_token(server, names))


# --- what every scenario checks ------------------------------------------------------------------------------


def backend_facts(output: str) -> dict[str, dict[str, Any]]:
    """The kleidi_vault_backend fact per host, from the playbook's last task (`ok: [host] => {"msg": {...}}`)."""
    facts: dict[str, dict[str, Any]] = {}
    decoder = json.JSONDecoder()
    for match in re.finditer(r"^ok: \[(\S+)\] => ", output, re.MULTILINE):
        try:
            value, _ = decoder.raw_decode(output, match.end())
        except json.JSONDecodeError:
            continue
        shown = value.get("msg") if isinstance(value, dict) else None
        if isinstance(shown, dict) and "kleidi_vault_backend" in shown:
            facts[match.group(1)] = shown["kleidi_vault_backend"]
    assert set(facts) == set(HOSTS), f"no kleidi_vault_backend fact for every host in:\n{output[-3000:]}"
    return facts


def expected_fact(s: Setup, auth: dict[str, str], **settings: Any) -> dict[str, Any]:
    return {
        "provider": "vault",
        "settings": {
            "address": s.server.address,
            "namespace": "",
            "transit_mount": s.names.mount,
            "key_name": s.names.key,
            "timeout": "5s",
            "auth": auth,
            **settings,
        },
        "env": {},
        "volumes": [],
    }


def host_view(settings: dict[str, Any], node_root: Path) -> dict[str, Any]:
    """The fact's vault settings with the node-view file paths turned into this machine's paths."""
    files = ("token_file", "role_id_file", "secret_id_file", "client_cert", "client_key")
    auth = {k: f"{node_root}{v}" if k in files else v for k, v in settings["auth"].items()}
    view = {**settings, "auth": auth}
    if "ca_cert" in view:
        view["ca_cert"] = f"{node_root}{view['ca_cert']}"
    return view


def check_vault_objects(s: Setup) -> None:
    n = s.names
    mounts = s.vault("sys/mounts").json()["data"]
    assert mounts[f"{n.mount}/"]["type"] == "transit"
    key = s.vault(f"{n.mount}/keys/{n.key}").json()["data"]
    assert key["type"] == "aes256-gcm96"
    assert key["exportable"] is False and key["deletion_allowed"] is False and key["derived"] is False
    assert key["allow_plaintext_backup"] is False
    policy = s.vault(f"sys/policies/acl/{n.policy}").json()["data"]["policy"]
    rules = dict(re.findall(r'path "([^"]+)" \{\s*capabilities = (\[[^\]]*\])', policy))
    assert {path: json.loads(caps) for path, caps in rules.items()} == {
        f"{n.mount}/encrypt/{n.key}": ["update"],
        f"{n.mount}/decrypt/{n.key}": ["update"],
        f"{n.mount}/keys/{n.key}": ["read"],
        "auth/token/lookup-self": ["read"],
        "auth/token/renew-self": ["update"],
        "auth/token/revoke-self": ["update"],
    }


def check_node_files(s: Setup, expected: set[str]) -> None:
    for host in HOSTS:
        config_dir = s.node_root(host) / "etc/kleidi"
        st = config_dir.stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, UID, GID), config_dir
        assert set(s.files(host)) == expected
        for name in expected:
            st = (config_dir / name).stat()
            mode = 0o644 if name == "vault-ca.pem" else 0o600
            assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, UID, GID), name


def serve_both(s: Setup, facts: dict[str, dict[str, Any]]) -> str:
    """A kleidi serve per node from its fact: both healthy, one key_id, ciphertexts decrypt across nodes."""
    plugins = []
    try:
        for host in HOSTS:
            settings = host_view(facts[host]["settings"], s.node_root(host))
            config = {"provider": "vault", "health_interval": "1s", "vault": settings}
            plugins.append(KleidiProcess(s.root / "plugin" / host, config).start())
        for plugin in plugins:
            plugin.wait_healthy()
        with plugins[0].client() as one, plugins[1].client() as two:
            key_id = one.status().key_id
            assert key_id.startswith("vault:") and two.status().key_id == key_id
            for writer, reader in ((one, two), (two, one)):
                seed = os.urandom(32)
                answer = writer.encrypt(seed, uid="u")
                assert answer.key_id == key_id
                assert reader.decrypt(answer.ciphertext, answer.key_id, {}, "u") == seed
        return str(key_id)
    finally:
        for plugin in plugins:
            plugin.stop()


def check_least_privilege(s: Setup, token: str) -> None:
    """The node's credential: its key only, encrypt/decrypt/read, no default policy, nothing else."""
    n = s.names
    client = s.server.client(token)
    assert client.auth.token.lookup_self()["data"]["policies"] == [n.policy]
    plaintext = base64.b64encode(b"probe").decode()
    wrapped = client.secrets.transit.encrypt_data(n.key, plaintext, mount_point=n.mount)["data"]["ciphertext"]
    assert client.secrets.transit.decrypt_data(n.key, wrapped, mount_point=n.mount)["data"]["plaintext"] == plaintext
    assert client.secrets.transit.read_key(n.key, mount_point=n.mount)["data"]["latest_version"] == 1
    other = f"other-{n.tag}"
    s.server.create_key(other, mount=n.mount)
    refused: list[Callable[[], Any]] = [
        lambda: client.secrets.transit.encrypt_data(other, plaintext, mount_point=n.mount),
        lambda: client.secrets.transit.read_key(other, mount_point=n.mount),
        lambda: client.secrets.transit.create_key(f"new-{n.tag}", mount_point=n.mount),
        lambda: client.secrets.transit.rotate_key(n.key, mount_point=n.mount),
        lambda: client.secrets.transit.export_key(n.key, "encryption-key", mount_point=n.mount),
        lambda: client.secrets.transit.delete_key(n.key, mount_point=n.mount),
        lambda: client.sys.create_or_update_policy(n.policy, 'path "*" { capabilities = ["sudo"] }'),
        lambda: client.sys.read_policy(n.policy),
        client.sys.list_mounted_secrets_engines,
        lambda: client.adapter.post("/v1/cubbyhole/x", json={"value": "y"}),  # the default policy allows this
    ]
    for call in refused:
        with pytest.raises((hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest)):
            call()


def check_no_secret_in_output(s: Setup, extra_secrets: list[str]) -> None:
    for secret in [s.admin, *extra_secrets]:
        assert secret and len(secret) >= 8
        for output in s.outputs:
            assert secret not in output, "a secret reached ansible-playbook's -v output"


def check_second_run(s: Setup) -> None:
    before = {host: s.files(host) for host in HOSTS}
    s.play().assert_unchanged()
    assert {host: s.files(host) for host in HOSTS} == before


# --- the scenarios ---------------------------------------------------------------------------------------------


def check_mode_scenario(server: OpenBao, root: Path) -> None:
    """Check mode on a fresh setup (approle, the default): says it would change things, writes nothing."""
    s = new_setup(server, "approle", root)
    n = s.names
    checked = s.play("--check").assert_ok()
    assert checked.changed() == {"cp-1": 2, "cp-2": 2}  # the config directory and the two credential files
    assert f"{n.mount}/" not in s.vault("sys/mounts").json()["data"]
    assert f"{n.auth_mount}/" not in s.vault("sys/auth").json()["data"]
    assert s.vault(f"sys/policies/acl/{n.policy}").status_code == 404
    assert not (root / "nodes").exists()
    check_no_secret_in_output(s, [])


def approle_scenario(server: OpenBao, root: Path) -> None:
    s = new_setup(server, "approle", root)
    n = s.names
    s.play().assert_ok()
    check_vault_objects(s)
    assert s.vault("sys/auth").json()["data"][f"{n.auth_mount}/"]["type"] == "approle"
    role = s.vault(f"auth/{n.auth_mount}/role/{n.role}").json()["data"]
    assert role["token_policies"] == [n.policy] and role["token_no_default_policy"] is True
    check_node_files(s, {"vault-role-id", "vault-secret-id"})
    one, two = (s.files(host) for host in HOSTS)
    assert one["vault-role-id"] == two["vault-role-id"]
    assert one["vault-secret-id"] != two["vault-secret-id"]  # a secret-id per node

    facts = backend_facts(s.outputs[-1])
    auth = {
        "method": "approle",
        "mount": n.auth_mount,
        "role_id_file": "/etc/kleidi/vault-role-id",
        "secret_id_file": "/etc/kleidi/vault-secret-id",
    }
    assert facts["cp-1"] == facts["cp-2"] == expected_fact(s, auth)
    serve_both(s, facts)

    login = server.client().adapter.post(
        f"/v1/auth/{n.auth_mount}/login",
        json={"role_id": one["vault-role-id"], "secret_id": one["vault-secret-id"]},
    )
    check_least_privilege(s, login["auth"]["client_token"])

    check_second_run(s)
    check_no_secret_in_output(s, [one["vault-secret-id"], two["vault-secret-id"], one["vault-role-id"]])


def token_scenario(server: OpenBao, root: Path) -> None:
    """cp-1 gets a token the operator supplies (kleidi_vault_token as a host var; cp-1 is also where the steps run once
    for all nodes go), cp-2 one the role creates."""
    s = new_setup(server, "token", root)
    supplied = server.token([s.names.policy], period="24h", no_default_policy=True)
    s.host_vars["cp-1"] = {"kleidi_vault_token": supplied}
    s.play().assert_ok()
    check_vault_objects(s)
    check_node_files(s, {"vault-token"})
    assert s.files("cp-1")["vault-token"] == supplied
    created = s.files("cp-2")["vault-token"]
    looked_up = server.client().auth.token.lookup(created)["data"]
    assert looked_up["policies"] == [s.names.policy] and looked_up["orphan"] is True
    assert looked_up["renewable"] is True and looked_up["explicit_max_ttl"] == 0
    # periodic through the token role: a renewal grants the period, whatever is asked, and never hits a max TTL
    renewed = server.client(created).auth.token.renew_self(increment=10_000_000)
    assert renewed["auth"]["lease_duration"] == 86400

    facts = backend_facts(s.outputs[-1])
    auth = {"method": "token", "token_file": "/etc/kleidi/vault-token"}
    assert facts["cp-1"] == facts["cp-2"] == expected_fact(s, auth)
    serve_both(s, facts)
    check_least_privilege(s, created)
    check_second_run(s)
    check_no_secret_in_output(s, [created, supplied])
    # kleidi_vault_allow_http reaches the plugin's own config, which makes the same check (kleidi.config)
    s.play(kleidi_vault_allow_http=True).assert_ok()
    assert backend_facts(s.outputs[-1])["cp-1"] == expected_fact(s, auth, allow_http=True)


def cert_scenario(root: Path) -> None:
    ca = TestCA(root / "ca")
    server = OpenBao(root / "bao", tls=True, ca=ca).start()
    try:
        s = new_setup(server, "cert", root)
        s.extra = {
            "kleidi_vault_ca_cert": str(ca.file),
            "kleidi_vault_cert_ca": str(ca.file),
            "kleidi_vault_cert_allowed_common_names": [f"kleidi-{host}" for host in HOSTS],
        }
        for host in HOSTS:
            cert, key = ca.issue(f"kleidi-{host}", client=True)
            s.host_vars[host] = {"kleidi_vault_client_cert": str(cert), "kleidi_vault_client_key": str(key)}
        s.play().assert_ok()
        check_vault_objects(s)
        check_node_files(s, {"vault-ca.pem", "vault-client.crt", "vault-client.key"})
        assert s.files("cp-1")["vault-ca.pem"] == ca.pem

        facts = backend_facts(s.outputs[-1])
        auth = {
            "method": "cert",
            "mount": s.names.auth_mount,
            "role": s.names.role,
            "client_cert": "/etc/kleidi/vault-client.crt",
            "client_key": "/etc/kleidi/vault-client.key",
        }
        assert facts["cp-1"] == facts["cp-2"] == expected_fact(s, auth, ca_cert="/etc/kleidi/vault-ca.pem")
        serve_both(s, facts)

        node = s.node_root("cp-1") / "etc/kleidi"
        login = hvac.Client(
            url=server.address,
            verify=str(ca.file),
            cert=(str(node / "vault-client.crt"), str(node / "vault-client.key")),
        ).auth.cert.login(name=s.names.role, mount_point=s.names.auth_mount)
        check_least_privilege(s, login["auth"]["client_token"])

        # a client certificate from a CA the role does not trust is refused
        stranger_cert, stranger_key = TestCA(root / "stranger", "stranger CA").issue("kleidi-cp-1", client=True)
        stranger = hvac.Client(url=server.address, verify=str(ca.file), cert=(str(stranger_cert), str(stranger_key)))
        with pytest.raises((hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden)):
            stranger.auth.cert.login(name=s.names.role, mount_point=s.names.auth_mount)

        check_second_run(s)
        check_no_secret_in_output(s, [(node / "vault-client.key").read_text().splitlines()[1]])
    finally:
        server.stop()


def refusals_scenario(server: OpenBao, root: Path) -> None:
    s = new_setup(server, "approle", root)

    # kubernetes auth (jwt takes the same path) for a static pod: a static pod cannot have a ServiceAccount
    refused = s.play(kleidi_vault_auth_method="kubernetes")
    assert refused.returncode != 0
    assert "a static pod cannot have a ServiceAccount" in refused.output and "Helm chart" in refused.output

    # plain http to a Vault that is not on loopback
    refused = s.play(kleidi_vault_address="http://vault.example.invalid:8200")
    assert refused.returncode != 0 and "would cross the network in clear" in refused.output

    # a wrong admin token: Vault's answer is shown, the token is not
    wrong = "s." + secrets.token_urlsafe(18)
    refused = s.play(kleidi_vault_admin_token=wrong)
    assert refused.returncode != 0
    assert "Read the transit key: Vault answered HTTP 403: permission denied" in refused.output
    check_no_secret_in_output(s, [wrong])

    assert not (root / "nodes").exists()
    assert f"{s.names.mount}/" not in s.vault("sys/mounts").json()["data"]


def kubernetes_systemd_scenario(server: OpenBao, root: Path) -> None:
    """kubernetes auth is allowed when the plugin is not a static pod: the role binds the ServiceAccount to the
    policy on an auth mount the operator configured, and a login with that ServiceAccount's token gets the policy."""
    s = new_setup(server, "kubernetes", root)
    n = s.names
    ca = TestCA(root / "ca")
    review = TokenReviewServer(ca)
    try:
        server.enable_auth("kubernetes", n.auth_mount)
        server.write(
            f"auth/{n.auth_mount}/config",
            kubernetes_host=review.address,
            kubernetes_ca_cert=ca.pem,
            token_reviewer_jwt=review.reviewer_jwt,
            disable_local_ca_jwt=True,
        )
        s.play(kleidi_install_mode="systemd").assert_ok()
        role = s.vault(f"auth/{n.auth_mount}/role/{n.role}").json()["data"]
        assert role["bound_service_account_names"] == ["kleidi"]
        assert role["bound_service_account_namespaces"] == ["kube-system"]
        assert role["token_policies"] == [n.policy] and role["token_no_default_policy"] is True
        check_node_files(s, set())
        auth = {
            "method": "kubernetes",
            "mount": n.auth_mount,
            "role": n.role,
            "jwt_file": "/var/run/secrets/kubernetes.io/serviceaccount/token",
        }
        facts = backend_facts(s.outputs[-1])
        assert facts["cp-1"] == facts["cp-2"] == expected_fact(s, auth)

        sa_token = JwtIssuer().service_account_token("kube-system", "kleidi")
        review.accept(sa_token, "kube-system", "kleidi")
        login = server.client().adapter.post(f"/v1/auth/{n.auth_mount}/login", json={"role": n.role, "jwt": sa_token})
        check_least_privilege(s, login["auth"]["client_token"])
        check_no_secret_in_output(s, [])
    finally:
        review.close()


# --- the tests: one per scenario, all started together -------------------------------------------------------


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future[None]]]:
    server = shared_dev_server()
    with ThreadPoolExecutor(max_workers=6) as pool:
        yield {
            "check": pool.submit(check_mode_scenario, server, tmp_path_factory.mktemp("check")),
            "approle": pool.submit(approle_scenario, server, tmp_path_factory.mktemp("approle")),
            "token": pool.submit(token_scenario, server, tmp_path_factory.mktemp("token")),
            "cert": pool.submit(cert_scenario, tmp_path_factory.mktemp("cert")),
            "kubernetes": pool.submit(kubernetes_systemd_scenario, server, tmp_path_factory.mktemp("kubernetes")),
            "refusals": pool.submit(refusals_scenario, server, tmp_path_factory.mktemp("refusals")),
        }


def test_check_mode_on_a_fresh_setup_writes_nothing(scenarios: dict[str, Future[None]]) -> None:
    scenarios["check"].result(timeout=600)


def test_approle_setup_plugins_least_privilege_and_second_run(scenarios: dict[str, Future[None]]) -> None:
    scenarios["approle"].result(timeout=600)


def test_token_setup_plugins_least_privilege_and_second_run(scenarios: dict[str, Future[None]]) -> None:
    scenarios["token"].result(timeout=600)


def test_cert_over_tls_setup_plugins_least_privilege_and_second_run(scenarios: dict[str, Future[None]]) -> None:
    scenarios["cert"].result(timeout=600)


def test_refuses_kubernetes_for_static_pods_plain_http_and_a_wrong_admin_token(
    scenarios: dict[str, Future[None]],
) -> None:
    scenarios["refusals"].result(timeout=600)


def test_kubernetes_auth_when_the_plugin_is_not_a_static_pod(scenarios: dict[str, Future[None]]) -> None:
    scenarios["kubernetes"].result(timeout=600)
