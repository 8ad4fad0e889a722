"""Re-encryption (playbooks/reencrypt.yml, role kleidi_reencrypt): its refusal without a kubeconfig, the resume
bookkeeping of its controller-side program against a fault-injecting kubectl stand-in (there is no apiserver to
rewrite objects through here), its wait for every apiserver to use the plugins' key_id (against stand-ins for the
apiservers' /metrics), and the etcd check against a real etcd holding planted values."""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.ansible_run import PlayResult, local_inventory, run_playbook
from tests.backends.etcd import Etcd
from tests.backends.openbao import TestCA
from tests.backends.softhsm import SoftHsm
from tests.kleidi_nodes import kms_provider, serve_plugin, wired_node
from tests.plugin import REPO
from tests.test_role_kleidi_apiserver import files

pytestmark = pytest.mark.integration

ROLE = REPO / "roles" / "kleidi_reencrypt"
PROGRAM = ROLE / "files" / "kleidi_reencrypt.py"
COUNTER = ROLE / "files" / "kleidi_etcd_count.py"
PLAYBOOK = REPO / "playbooks" / "reencrypt.yml"
ETCD_PLAYBOOK = REPO / "tests" / "playbooks" / "kleidi_reencrypt_etcd.yml"
CLUSTER_UNIT = "(cluster-scoped)"
NAMESPACES = (("alpha", 3), ("beta", 4), ("gamma", 2))
SECRETS = [(ns, f"{ns[0]}{i}") for ns, n in NAMESPACES for i in range(1, n + 1)]
# What each Secret holds: none of it may ever show in an output, a message or the state file.
SECRET_VALUES = [f"sup3r-s3cret-{ns}-{name}" for ns, name in SECRETS]

AESCBC = {"aescbc": {"keys": [{"name": "key1", "secret": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="}]}}
CONFIG = {
    "apiVersion": "apiserver.config.k8s.io/v1",
    "kind": "EncryptionConfiguration",
    "resources": [
        {"resources": ["secrets", "*.example.com"], "providers": [{"kms": kms_provider()}, {"identity": {}}]},
        {"resources": ["configmaps"], "providers": [{"identity": {}}]},
        {"resources": ["*.*"], "providers": [AESCBC, {"identity": {}}]},
    ],
}


# --- a cluster for the kubectl stand-in ----------------------------------------------------------------------


def secret(namespace: str, name: str) -> dict[str, Any]:
    value = f"sup3r-s3cret-{namespace}-{name}"
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1"},
        "data": {"password": base64.b64encode(value.encode()).decode()},
        "stringData": {"plain": value},
    }


def make_cluster(tmp_path: Path, faults: dict[str, Any] | None = None) -> Path:
    """Secrets in alpha (3), beta (4) and gamma (2), a cluster-scoped custom resource, a ConfigMap and an aggregated
    API's resource; everything stored under kek-1, the plugins now on kek-2."""
    secrets = {f"{ns}/{name}": secret(ns, name) for ns, name in SECRETS}
    objects = {
        "secrets": secrets,
        "configmaps": {
            "alpha/c1": {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "c1", "namespace": "alpha", "resourceVersion": "1"},
            }
        },
        "widgets.example.com": {
            "w1": {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w1", "resourceVersion": "1"}}
        },
        "namespaces": {
            ns: {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "resourceVersion": "1"}}
            for ns in ("alpha", "beta", "gamma")
        },
        "pods.metrics.k8s.io": {},
    }
    cluster = {
        "resources": {
            "secrets": {"kind": "Secret", "namespaced": True},
            "configmaps": {"kind": "ConfigMap", "namespaced": True},
            "namespaces": {"kind": "Namespace", "namespaced": False},
            "widgets.example.com": {"kind": "Widget", "namespaced": False},
            "pods.metrics.k8s.io": {"kind": "PodMetrics", "namespaced": True},
        },
        "aggregated": ["metrics.k8s.io"],
        "crds": ["widgets.example.com"],
        "objects": objects,
        "current_key": "kek-2",
        "stored_under": {f"{r}/{k}": "kek-1" for r, items in objects.items() for k in items},
        "faults": faults or {},
    }
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(cluster, indent=1))
    return path


def kubectl_standin(tmp_path: Path) -> Path:
    """The stand-in as kubectl; each call is also logged, with its time, to <tmp_path>/bin/calls.log."""
    wrapper = tmp_path / "bin" / "kubectl"
    wrapper.parent.mkdir(exist_ok=True)
    log = wrapper.with_name("calls.log")
    wrapper.write_text(
        f'#!/bin/sh\necho "$(date +%s.%N) $*" >> "{log}"\n'
        f'exec "{sys.executable}" "{REPO / "tests" / "kubectl_standin.py"}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def replace_times(tmp_path: Path) -> list[float]:
    """When the role's kubectl calls that write (kubectl replace) started."""
    log = tmp_path / "bin" / "calls.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [float(line.split()[0]) for line in lines if " replace " in f" {line} "]


def program(tmp_path: Path, cluster: Path, *args: str, config: dict[str, Any] = CONFIG) -> tuple[int, dict, str]:
    argv = [sys.executable, str(PROGRAM), "--kubectl", str(kubectl_standin(tmp_path)), "--kubeconfig", str(cluster)]
    done = subprocess.run(
        [*argv, *args], input=json.dumps(config), capture_output=True, text=True, check=False, timeout=120
    )
    assert done.stdout.strip().startswith("{"), done.stderr
    return done.returncode, json.loads(done.stdout), done.stdout + done.stderr


def run_like_the_role(tmp_path: Path, cluster: Path, state_dir: Path) -> tuple[dict, list[tuple[str, int, dict]], str]:
    """What tasks/main.yml and unit.yml do: plan, then one rewrite per unit left, stopping at the first failure."""
    code, planned, output = program(
        tmp_path, cluster, "plan", "--provider", "kleidi", "--state-dir", str(state_dir), "--key-id", "kek-2"
    )
    assert code == 0, output
    units = []
    for unit in planned["pending"]:
        code, report, out = program(
            tmp_path, cluster, "rewrite", "--state-file", planned["state_file"], "--unit", unit["name"], "--qps", "0"
        )
        output += out
        units.append((unit["name"], code, report))
        if code != 0:
            break
    return planned, units, output


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for value in SECRET_VALUES:
            assert value not in text and base64.b64encode(value.encode()).decode() not in text, "a Secret leaked"


# --- the program: resume bookkeeping -------------------------------------------------------------------------


def test_a_run_stopped_in_the_middle_of_a_namespace_resumes_and_skips_what_is_done(tmp_path: Path) -> None:
    # kubectl loses the apiserver after 5 writes (in beta, after b1 and b2); in gamma, g1 is written by someone
    # else first (a conflict) and g2 is deleted before its turn.
    faults = {
        "fail_after_replaces": 5,
        "conflict_once": ["secrets/gamma/g1"],
        "delete_on_replace": ["secrets/gamma/g2"],
    }
    cluster = make_cluster(tmp_path, faults)
    state_dir = tmp_path / "state"

    planned, units, output = run_like_the_role(tmp_path, cluster, state_dir)
    assert planned["resources"] == [
        {"name": "secrets", "namespaced": True, "etcd_path": "secrets/"},
        {"name": "widgets.example.com", "namespaced": False, "etcd_path": "example.com/widgets/"},
    ]
    assert planned["pending"] == [
        {"name": "alpha", "objects": 3},
        {"name": "beta", "objects": 4},
        {"name": "gamma", "objects": 2},
        {"name": CLUSTER_UNIT, "objects": 1},
    ]
    assert [(name, code) for name, code, _ in units] == [("alpha", 0), ("beta", 1)]
    assert units[0][2]["units"][0]["rewritten"] == 3
    stop = units[1][2]
    assert "Unable to connect to the server" in stop["error"] and "run again to resume" in stop["error"]
    state_file = Path(planned["state_file"])
    assert state_file.parent == state_dir and state_file.name == f"reencrypt-{planned['run_id']}.json"
    assert state_dir.stat().st_mode & 0o777 == 0o700 and state_file.stat().st_mode & 0o777 == 0o600
    state = json.loads(state_file.read_text())
    assert state["finished"] is None and state["key_id"] == "kek-2"
    assert state["units"]["alpha"] == {"status": "done", "objects": 3}  # a unit done keeps no names
    assert state["units"]["beta"]["status"] == "stopped"
    assert state["units"]["beta"]["done"] == ["secrets/b1", "secrets/b2"]
    after_first = json.loads(cluster.read_text())
    written_first = ["secrets/alpha/a1", "secrets/alpha/a2", "secrets/alpha/a3", "secrets/beta/b1", "secrets/beta/b2"]
    assert after_first["replaced"] == written_first

    planned, units, output2 = run_like_the_role(tmp_path, cluster, state_dir)
    assert "resuming" in planned["message"] and planned["state_file"] == str(state_file)
    assert [u["name"] for u in planned["pending"]] == ["beta", "gamma", CLUSTER_UNIT]
    assert [(name, code) for name, code, _ in units] == [("beta", 0), ("gamma", 0), (CLUSTER_UNIT, 0)]
    beta, gamma, rest = (report["units"][0] for _, _, report in units)
    assert (beta["already_done"], beta["rewritten"]) == (2, 2)
    assert (gamma["rewritten"], gamma["current"], gamma["gone"]) == (0, 1, 1)
    assert rest["rewritten"] == 1
    final = units[-1][2]
    assert final["finished"] and final["totals"]["units_done"] == final["totals"]["units"] == 4
    assert "done" in final["message"]
    after = json.loads(cluster.read_text())
    # The second run asked for nothing the first one had done; each object was written at most once.
    assert after_first["attempts"] == [*written_first, "secrets/beta/b3"]  # b3: where the apiserver went away
    assert after["attempts"][len(after_first["attempts"]) :] == [
        "secrets/beta/b3",
        "secrets/beta/b4",
        "secrets/gamma/g1",  # conflict, re-read, then current
        "secrets/gamma/g1",
        "secrets/gamma/g2",  # deleted meanwhile
        "widgets.example.com/w1",
    ]
    assert after["replaced"] == [*written_first, "secrets/beta/b3", "secrets/beta/b4", "widgets.example.com/w1"]
    assert "configmaps/alpha/c1" not in after["attempts"]

    code, again, _ = program(
        tmp_path, cluster, "plan", "--provider", "kleidi", "--state-dir", str(state_dir), "--key-id", "kek-2"
    )
    assert code == 0 and again["finished"] and again["pending"] == []
    assert "nothing left to do" in again["message"]
    assert_no_secret(output, output2, state_file.read_text())


def test_objects_the_apiserver_refuses_are_named_and_retried_alone(tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path, {"refuse": ["secrets/alpha/a2"]})
    state_dir = tmp_path / "state"
    planned, units, output = run_like_the_role(tmp_path, cluster, state_dir)
    name, code, report = units[0]
    assert (name, code) == ("alpha", 3)
    assert "refused 1 objects" in report["error"] and "secrets/a2" in report["error"]
    assert 'admission webhook "guard.example.com" denied the request' in report["error"]
    state = json.loads(Path(planned["state_file"]).read_text())
    assert state["units"]["alpha"]["status"] == "refused"
    assert state["units"]["alpha"]["done"] == ["secrets/a1", "secrets/a3"]

    data = json.loads(cluster.read_text())
    data["faults"] = {}
    cluster.write_text(json.dumps(data))
    attempts_before = len(data["attempts"])
    _, units, output2 = run_like_the_role(tmp_path, cluster, state_dir)
    assert all(code == 0 for _, code, _ in units)
    assert json.loads(cluster.read_text())["attempts"][attempts_before] == "secrets/alpha/a2"
    assert_no_secret(output, output2)


def test_wildcards_expand_through_api_resources_first_entry_wins_and_aggregated_apis_are_left_out(
    tmp_path: Path,
) -> None:
    cluster = make_cluster(tmp_path)
    config = {
        "resources": [
            {"resources": ["configmaps"], "providers": [{"identity": {}}]},
            {"resources": ["*.*"], "providers": [{"kms": kms_provider()}, {"identity": {}}]},
        ]
    }
    state_dir = tmp_path / "state"
    code, planned, _ = program(
        tmp_path, cluster, "plan", "--provider", "kleidi", "--state-dir", str(state_dir), "--dry-run", config=config
    )
    assert code == 0
    assert {r["name"]: r["etcd_path"] for r in planned["resources"]} == {
        "namespaces": "namespaces/",
        "secrets": "secrets/",
        "widgets.example.com": "example.com/widgets/",
    }
    assert not state_dir.exists(), "a dry run (check mode) wrote the state file"

    code, refused, _ = program(
        tmp_path, cluster, "plan", "--provider", "other", "--state-dir", str(state_dir), "--dry-run", config=config
    )
    assert code == 1 and "no resource whose first provider is the kms provider 'other'" in refused["error"]


def test_away_from_kms_takes_the_resources_that_still_list_it_after_the_provider_that_writes(tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path)
    config = {
        "resources": [
            {"resources": ["secrets"], "providers": [{"identity": {}}, {"kms": kms_provider()}]},
            {"resources": ["configmaps"], "providers": [{"kms": kms_provider()}, {"identity": {}}]},
            {"resources": ["*.example.com"], "providers": [{"identity": {}}]},
        ]
    }
    args = ("plan", "--provider", "kleidi", "--state-dir", str(tmp_path / "state"), "--dry-run")
    code, planned, _ = program(tmp_path, cluster, *args, "--away", config=config)
    assert code == 0 and [r["name"] for r in planned["resources"]] == ["secrets"]
    assert planned["direction"] == "away"
    code, into, _ = program(tmp_path, cluster, *args, config=config)
    assert code == 0 and [r["name"] for r in into["resources"]] == ["configmaps"]
    assert into["run_id"] != planned["run_id"]
    config["resources"] = config["resources"][1:]
    code, refused, _ = program(tmp_path, cluster, *args, "--away", config=config)
    assert code == 1 and "no resource that lists the kms provider 'kleidi' after another provider" in refused["error"]


# --- the playbook ---------------------------------------------------------------------------------------------


def test_without_a_kubeconfig_the_playbook_stops_at_once_says_why_and_changes_nothing(tmp_path: Path) -> None:
    roots = [tmp_path / "cp-1", tmp_path / "cp-2"]
    for root in roots:
        wired_node(root)
    before = {str(root): files(root) for root in roots}
    inventory = local_inventory(tmp_path / "hosts.yml", {root.name: {"kleidi_node_root": str(root)} for root in roots})
    result = run_playbook(PLAYBOOK, inventory)
    assert result.returncode != 0
    message = " ".join(result.output.split())
    assert "needs a kubeconfig on the controller" in message and "set kleidi_kubeconfig" in message
    assert "Nothing was changed" in message
    assert {str(root): files(root) for root in roots} == before
    assert not (tmp_path / ".kleidi-state").exists()
    # It stopped there: nothing after the refusal ran.
    assert "Look for the kubeconfig on the controller" not in result.output


KEY_ID_METRIC = "apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds"


def key_id_hash(key_id: str) -> str:
    return "sha256:" + hashlib.sha256(key_id.encode()).hexdigest()


class ApiserverMetrics:
    """What kleidi_apiserver's key_id.yml asks of a node's apiserver: /metrics over HTTPS on 127.0.0.1, with the
    node's kubeadm client certificate required, and in it the key_id hash series of kleidi's kms provider, as
    kube-apiserver exports them (newest timestamp: the key_id it uses). ``use`` sets the key_id (None: no such
    metric at all, as an apiserver that does not export it) and, with ``then``, the one it takes ``after`` seconds
    after it is first asked, as its next Status poll would. Every answer is recorded: (time, the newest
    key_id_hash or "")."""

    def __init__(self, root: Path, ca: TestCA) -> None:
        pki = root / "etc/kubernetes/pki"
        pki.mkdir(parents=True, exist_ok=True)
        (pki / "ca.crt").write_text(ca.pem)
        client_cert, client_key = ca.issue(f"{root.name}-apiserver-kubelet-client", client=True)
        (pki / "apiserver-kubelet-client.crt").write_bytes(client_cert.read_bytes())
        (pki / "apiserver-kubelet-client.key").write_bytes(client_key.read_bytes())
        cert, key = ca.issue(f"{root.name}-apiserver")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.load_verify_locations(cafile=ca.file)
        context.verify_mode = ssl.CERT_REQUIRED
        self.answers: list[tuple[float, str]] = []
        self.use(None)
        handler = type("Handler", (_MetricsHandler,), {"apiserver": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self.port = int(self._httpd.server_address[1])
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def use(self, key_id: str | None, then: str | None = None, after: float = 0.0) -> None:
        self.key_id, self.then, self.after, self.flips_at = key_id, then, after, 0.0
        self.answers.clear()

    def metrics(self) -> str:
        now = time.time()
        self.flips_at = self.flips_at or now + self.after
        series = [(self.key_id, self.flips_at - 60)] if self.key_id else []
        if self.then and now >= self.flips_at:
            series.append((self.then, self.flips_at))
        self.answers.append((now, key_id_hash(series[-1][0]) if series else ""))
        lines = ["# TYPE process_start_time_seconds gauge", f"process_start_time_seconds {now - 3600}"]
        lines += [
            f'{KEY_ID_METRIC}{{apiserver_id_hash="sha256:00",key_id_hash="{key_id_hash(key_id)}",'
            f'provider_name="kleidi"}} {seen}'
            for key_id, seen in series
        ]
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _MetricsHandler(BaseHTTPRequestHandler):
    apiserver: ApiserverMetrics

    def do_GET(self) -> None:
        body = self.apiserver.metrics().encode() if self.path == "/metrics" else b"not found\n"
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Nodes:
    """Two wired control-plane nodes, their plugins on one SoftHSM KEK (key_id), and their apiservers' /metrics."""

    roots: list[Path]
    apiservers: list[ApiserverMetrics]
    key_id: str


@pytest.fixture(scope="module")
def module_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    base = tmp_path_factory.mktemp("reencrypt-nodes")
    roots = [base / "cp-1", base / "cp-2"]
    for root in roots:
        wired_node(root, resources=("secrets", "*.example.com"))
    hsm = SoftHsm(base / "hsm")
    hsm.keygen("kek-1")
    ca = TestCA(base / "ca")
    with ExitStack() as stack:
        plugins = [serve_plugin(stack, root, hsm) for root in roots]
        with plugins[0].client() as kms:
            key_id = kms.status().key_id
        apiservers = [ApiserverMetrics(root, ca) for root in roots]
        for apiserver in apiservers:
            stack.callback(apiserver.close)
        yield Nodes(roots, apiservers, key_id)


@pytest.fixture
def nodes(module_nodes: Nodes) -> Nodes:
    """Every apiserver already on the plugins' key_id, until a test says otherwise."""
    for apiserver in module_nodes.apiservers:
        apiserver.use(module_nodes.key_id)
    return module_nodes


def reencrypt(tmp_path: Path, nodes: Nodes, cluster: Path, *args: str, **extra: Any) -> PlayResult:
    hosts = {
        root.name: {"kleidi_node_root": str(root), "kleidi_apiserver_port": apiserver.port}
        for root, apiserver in zip(nodes.roots, nodes.apiservers, strict=True)
    }
    inventory = local_inventory(tmp_path / "hosts.yml", hosts)
    extra_vars = {
        "kleidi_kubeconfig": str(cluster),
        "kleidi_kubectl": str(kubectl_standin(tmp_path)),
        "kleidi_plugin_cli": str(Path(sys.executable).with_name("kleidi")),
        "kleidi_plugin_health_timeout": 4,
        "kleidi_reencrypt_qps": 50,
        **extra,
    }
    return run_playbook(PLAYBOOK, inventory, *args, extra_vars=extra_vars)


def test_the_playbook_rewrites_namespace_by_namespace_with_progress_and_resumes_after_a_stop(
    tmp_path: Path, nodes: Nodes
) -> None:
    cluster = make_cluster(tmp_path, {"fail_after_replaces": 4})
    key_id = nodes.key_id
    # What rotate.yml records when it has no kubeconfig; a finished run for that key_id clears it.
    pending = tmp_path / ".kleidi-state" / "pending-reencryption.json"
    pending.parent.mkdir(mode=0o700)
    pending.write_text(json.dumps({"reason": "rotation", "key_id": key_id, "old_key_id": "before"}))

    checked = reencrypt(tmp_path, nodes, cluster, "--check").assert_ok()
    text = " ".join(checked.output.split())
    assert "10 objects of secrets, widgets.example.com in 4 units to re-encrypt (check mode: nothing is" in text
    assert [p.name for p in pending.parent.iterdir()] == ["pending-reencryption.json"]
    assert "attempts" not in json.loads(cluster.read_text())
    assert all(not apiserver.answers for apiserver in nodes.apiservers), "check mode waited for the apiservers"

    stopped = reencrypt(tmp_path, nodes, cluster)
    assert stopped.returncode != 0
    text = " ".join(stopped.output.split())
    assert f"apiservers on key_id {key_id}: cp-1 metric, cp-2 metric (metric:" in text
    assert "[1/4] namespace alpha: 3 rewritten; total 3/10 objects, 1/4 units" in text
    assert "Re-encryption of beta did not finish: stopped: kubectl replace secrets b2 failed" in text
    assert "Run playbooks/reencrypt.yml again to resume" in text
    assert pending.exists(), "the pending record went before the re-encryption finished"
    # Check mode names the run that would resume, and what is left of it.
    text = " ".join(reencrypt(tmp_path, nodes, cluster, "--check").assert_unchanged().output.split())
    assert "6 objects of secrets, widgets.example.com in 3 units to re-encrypt (resuming run" in text

    resumed = reencrypt(tmp_path, nodes, cluster).assert_ok()
    text = " ".join(resumed.output.split())
    assert "(resuming run" in text
    assert "[1/3] namespace beta: 3 rewritten, 1 done before" in text
    assert "[3/3] cluster-scoped objects: 1 rewritten; total 10/10 objects, 4/4 units" in text
    assert "The etcd check was skipped: kleidi_etcd_endpoints is not set" in text
    state = json.loads(next((tmp_path / ".kleidi-state").glob("reencrypt-*.json")).read_text())
    assert state["key_id"] == key_id and state["finished"]
    assert not pending.exists()

    for apiserver in nodes.apiservers:
        apiserver.answers.clear()
    again = reencrypt(tmp_path, nodes, cluster).assert_unchanged()
    assert "nothing left to do" in " ".join(again.output.split())
    # Nothing left to rewrite: no apiserver is asked.
    assert all(not apiserver.answers for apiserver in nodes.apiservers)
    assert_no_secret(checked.output, stopped.output, resumed.output, again.output)


# A KEK changed outside rotate.yml (a Vault admin's transit rotate, a token label switched by hand): every plugin
# serves the new key_id at once, but each apiserver learns it only at its next Status poll, and writes under the old
# one until then. Run alone, reencrypt.yml must not rewrite before every apiserver uses the new key_id.


def test_run_alone_it_rewrites_only_once_every_apiserver_uses_the_plugins_key_id(tmp_path: Path, nodes: Nodes) -> None:
    cluster = make_cluster(tmp_path)
    late = nodes.apiservers[1]
    late.use("the-old-key-id", then=nodes.key_id, after=3)
    result = reencrypt(tmp_path, nodes, cluster).assert_ok()
    text = " ".join(result.output.split())
    assert f"apiservers on key_id {nodes.key_id}: cp-1 metric, cp-2 metric" in text
    assert "[4/4] cluster-scoped objects: 1 rewritten; total 10/10 objects, 4/4 units" in text
    # cp-2's apiserver was seen on the old key_id, then on the new one; every write came after that.
    assert late.answers[0][1] == key_id_hash("the-old-key-id")
    seen_new = min(at for at, newest in late.answers if newest == key_id_hash(nodes.key_id))
    writes = replace_times(tmp_path)
    assert len(writes) == 10 and min(writes) > seen_new >= late.flips_at > late.answers[0][0]
    assert len(json.loads(cluster.read_text())["replaced"]) == 10


def test_an_apiserver_that_keeps_the_old_key_id_stops_the_run_before_anything_is_rewritten(
    tmp_path: Path, nodes: Nodes
) -> None:
    cluster = make_cluster(tmp_path)
    nodes.apiservers[1].use("the-old-key-id")
    result = reencrypt(tmp_path, nodes, cluster, kleidi_apiserver_key_id_timeout=5)
    assert result.returncode != 0
    text = " ".join(result.output.split())
    assert f"The apiserver on cp-2 (https://127.0.0.1:{nodes.apiservers[1].port}) did not report key_id" in text
    assert f"{nodes.key_id} ({key_id_hash(nodes.key_id)}) for its kms provider kleidi within 5s" in text
    assert f"Its newest key_id_hash: {key_id_hash('the-old-key-id')}" in text
    assert len(nodes.apiservers[1].answers) == 2  # asked again once, 5 s later
    assert replace_times(tmp_path) == []
    assert "attempts" not in json.loads(cluster.read_text())
    assert "[1/4]" not in text


def test_an_apiserver_without_the_key_id_metric_is_given_its_status_poll_interval(tmp_path: Path, nodes: Nodes) -> None:
    cluster = make_cluster(tmp_path)
    quiet = nodes.apiservers[1]
    quiet.use(None)  # /metrics answers, without any key_id hash series
    result = reencrypt(tmp_path, nodes, cluster, kleidi_apiserver_status_poll_delay=4).assert_ok()
    text = " ".join(result.output.split())
    assert f"apiservers on key_id {nodes.key_id}: cp-1 metric, cp-2 delay (metric:" in text
    assert "delay: their Status poll interval waited out" in text
    # Not called from rotate.yml, there is no switch time to count from: the whole poll delay, from when it asked.
    asked = quiet.answers[-1][0]
    writes = replace_times(tmp_path)
    assert len(writes) == 10 and min(writes) >= asked + 4


# --- the etcd check --------------------------------------------------------------------------------------------


def encrypted_object(key_id: str) -> bytes:
    """A KMS v2 EncryptedObject as the apiserver stores it (encryptedData, keyID, encryptedDEKSource, type)."""

    def field(number: int, data: bytes) -> bytes:
        return bytes([number << 3 | 2, len(data)]) + data

    return field(1, b"\x00ciphertext\n") + field(2, key_id.encode()) + field(3, b"seed" * 8) + bytes([5 << 3, 1])


def plant(etcd: Etcd, values: dict[str, bytes]) -> None:
    for key, value in values.items():
        etcd.put(key, value)


MIXED = {
    "/registry/secrets/default/a": b"k8s:enc:kms:v2:kleidi:" + encrypted_object("key-new"),
    "/registry/secrets/default/b": b"k8s:enc:kms:v2:kleidi:" + encrypted_object("key-new"),
    "/registry/secrets/kube-system/c": b"k8s:enc:kms:v2:kleidi:" + encrypted_object("key-old"),
    "/registry/secrets/default/d": b"k8s:enc:kms:v2:vault-old:" + encrypted_object("v1"),
    "/registry/secrets/default/e": b"k8s:enc:kms:v1:legacy:" + b"\x01\x02",
    "/registry/secrets/default/f": b"k8s:enc:aescbc:v1:key1:" + b"\x99" * 32,
    "/registry/secrets/default/g": b"k8s:enc:secretbox:v1:key1:" + b"\x98" * 32,
    "/registry/secrets/default/h": b"k8s\x00\n\x0c\n\x02v1\x12\x06Secret plaintext",
    "/registry/example.com/widgets/w1": b'{"kind":"Widget","apiVersion":"example.com/v1"}',
    # Not under the checked prefixes: a sibling whose name starts the same, and a resource kms does not write.
    "/registry/secretsmeta/x": b"k8s\x00plain",
    "/registry/configmaps/default/y": b"k8s\x00plain",
}


def counter(etcd: Etcd, *prefixes: str, page: int = 3) -> dict:
    argv = [sys.executable, str(COUNTER), "--provider", "kleidi", "--endpoints", etcd.endpoint, "--page", str(page)]
    argv += [f"--cacert={etcd.ca.file}", f"--cert={etcd.client_cert}", f"--key={etcd.client_key}"] if etcd.ca else []
    done = subprocess.run([*argv, *prefixes], capture_output=True, text=True, check=True, timeout=60)
    return json.loads(done.stdout)


@pytest.fixture
def etcd(tmp_path: Path) -> Any:
    with Etcd(tmp_path / "etcd", TestCA(tmp_path / "ca")) as server:
        yield server


def test_the_etcd_count_is_exact_per_provider_and_key_id(etcd: Etcd) -> None:
    plant(etcd, MIXED)
    found = counter(etcd, "/registry/secrets/", "/registry/example.com/widgets/")
    zero = {"aescbc": 0, "aesgcm": 0, "secretbox": 0, "other_encrypted": 0, "identity": 0}
    assert found["prefixes"]["/registry/secrets/"] == {
        **zero,
        "total": 8,
        "target": 3,
        "target_key_ids": {"key-new": 2, "key-old": 1},
        "other_kms": {"v2:vault-old": 1, "v1:legacy": 1},
        "aescbc": 1,
        "secretbox": 1,
        "identity": 1,
    }
    assert found["prefixes"]["/registry/example.com/widgets/"] == {
        **zero,
        "total": 1,
        "target": 0,
        "target_key_ids": {},
        "other_kms": {},
        "identity": 1,
    }
    assert found["total"]["total"] == 9 and found["total"]["target"] == 3 and found["total"]["identity"] == 2
    assert found["not_target"] == [
        "/registry/secrets/default/d",
        "/registry/secrets/default/e",
        "/registry/secrets/default/f",
        "/registry/secrets/default/g",
        "/registry/secrets/default/h",
    ]
    # Pages of 3 and one page of everything give the same counts.
    assert counter(etcd, "/registry/secrets/", "/registry/example.com/widgets/", page=500) == found


def etcd_check(tmp_path: Path, root: Path, etcd: Etcd, key_id: str, direction: str = "into") -> PlayResult:
    """The role's etcd.yml on a node whose etcd client certificate is where kubeadm keeps it."""
    pki = root / "etc/kubernetes/pki"
    (pki / "etcd").mkdir(parents=True, exist_ok=True)
    assert etcd.ca is not None
    (pki / "etcd" / "ca.crt").write_bytes(etcd.ca.file.read_bytes())
    (pki / "apiserver-etcd-client.crt").write_bytes(etcd.client_cert.read_bytes())
    (pki / "apiserver-etcd-client.key").write_bytes(etcd.client_key.read_bytes())
    inventory = local_inventory(tmp_path / "hosts.yml", {"cp-1": {"kleidi_node_root": str(root)}})
    planned = {"resources": [{"name": "secrets", "namespaced": True, "etcd_path": "secrets/"}]}
    extra = {
        "kleidi_etcd_endpoints": etcd.endpoint,
        "kleidi_reencrypt_planned": planned,
        "kleidi_reencrypt_key_id": key_id,
        "kleidi_reencrypt_direction": direction,
    }
    return run_playbook(ETCD_PLAYBOOK, inventory, "--check", extra_vars=extra)


def test_the_etcd_check_fails_naming_the_counts_when_anything_is_not_under_kleidi(tmp_path: Path, etcd: Etcd) -> None:
    plant(etcd, MIXED)
    result = etcd_check(tmp_path, tmp_path / "node", etcd, "key-new")
    assert result.returncode != 0
    text = " ".join(result.output.split())
    assert "etcd does not hold every value of these resources under k8s:enc:kms:v2:kleidi: with key_id key-new" in text
    assert (
        "etcd (cp-1): 8 values; 3 under kms v2 kleidi (key_ids: key-new x2, key-old x1), 2 under other kms providers "
        "(v1:legacy x1, v2:vault-old x1), 1 aescbc, 0 aesgcm, 1 secretbox, 0 other encrypted, 1 identity (plaintext)"
    ) in text
    assert "/registry/secrets/default/h" in text


def test_the_etcd_check_passes_when_every_value_is_under_kleidi_and_the_key_id(tmp_path: Path, etcd: Etcd) -> None:
    plant(etcd, {k: v for k, v in MIXED.items() if v.startswith(b"k8s:enc:kms:v2:kleidi:") and b"key-new" in v})
    plant(etcd, {"/registry/configmaps/default/y": b"k8s\x00plain"})
    result = etcd_check(tmp_path, tmp_path / "node", etcd, "key-new").assert_ok()
    assert "etcd (cp-1): 2 values; 2 under kms v2 kleidi (key_ids: key-new x2), 0 under other kms" in " ".join(
        result.output.split()
    )
    # An old key_id left is a failure too: the run did not reach it.
    plant(etcd, {"/registry/secrets/kube-system/c": MIXED["/registry/secrets/kube-system/c"]})
    assert etcd_check(tmp_path, tmp_path / "node", etcd, "key-new").returncode != 0


def test_away_from_kms_the_etcd_check_requires_nothing_left_under_kleidi(tmp_path: Path, etcd: Etcd) -> None:
    plant(etcd, {"/registry/secrets/default/f": MIXED["/registry/secrets/default/f"]})
    plant(etcd, {"/registry/secrets/default/h": MIXED["/registry/secrets/default/h"]})
    result = etcd_check(tmp_path, tmp_path / "node", etcd, "key-new", direction="away").assert_ok()
    assert "etcd (cp-1): 2 values; 0 under kms v2 kleidi (key_ids: none)" in " ".join(result.output.split())
    plant(etcd, {"/registry/secrets/kube-system/c": MIXED["/registry/secrets/kube-system/c"]})
    left = etcd_check(tmp_path, tmp_path / "node", etcd, "key-new", direction="away")
    assert left.returncode != 0
    text = " ".join(left.output.split())
    assert "etcd still holds 1 values of these resources under k8s:enc:kms:v2:kleidi:, which only kleidi" in text
