"""molecule/default/simnode: the node agent and the kube-apiserver stand-in, as real processes.

Each test gets a node root of its own and, on the real host, a unique mount-point prefix under /run, so that
it shows what a pod sees at its mountPaths and what is left outside. Every agent is stopped, and every path the
test made is removed, even when the test fails."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.backends.softhsm import SoftHsm
from tests.conftest import pkcs11_config
from tests.plugin import REPO, KleidiProcess, free_port, wait_for

pytestmark = pytest.mark.integration

SIMNODE = REPO / "molecule" / "default" / "simnode"
AGENT = SIMNODE / "node_agent.py"
STANDIN = SIMNODE / "apiserver_standin.py"
PKI = SIMNODE / "pki.py"
UID, GID = 10001, 10002


def agent(*args: str, check: bool = True, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(AGENT), *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    if check and done.returncode != 0:
        raise AssertionError(f"node_agent {args[0]} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done


def stop_agent(state: Path, pids: set[int]) -> tuple[subprocess.CompletedProcess[str], list[int]]:
    """Stop a node's agent, then kill the pod processes it left behind (returned), so that a failed test leaves
    nothing running."""
    stopped = agent("stop", "--state-dir", str(state), check=False)
    left = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    for pid in left:
        os.kill(pid, 9)
    return stopped, left


class Node:
    """A simulated node: its root, its agent's state dir, and the host prefix its pods mount under."""

    def __init__(self, base: Path) -> None:
        self.root = base / "root"
        self.state = base / "agent"
        self.root.mkdir(parents=True)
        self.manifests = self.root / "etc/kubernetes/manifests"
        self.manifests.mkdir(parents=True)
        # Paths on the real host that no one else uses: the pods' mount points go there.
        self.host = Path(f"/run/simnode-test-{secrets.token_hex(4)}")
        self.pids: set[int] = set()

    def path(self, node_path: str) -> Path:
        return self.root / node_path.lstrip("/")

    def start(self, *programs: str, address: str = "127.0.0.1") -> None:
        flags = [f"--program={p}" for p in programs]
        agent("start", "--node", "cp-test", "--node-root", str(self.root), "--state-dir", str(self.state),
              "--node-address", address, *flags)  # fmt: skip

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(agent("status", "--state-dir", str(self.state)).stdout)
        self.pids |= {p["pid"] for p in data.get("pods", {}).values() if p.get("pid")}
        return data

    def pod(self, name: str) -> dict[str, Any]:
        return self.status()["pods"].get(f"kube-system/{name}", {})

    def write(self, manifest: dict[str, Any], file: str | None = None) -> Path:
        path = self.manifests / (file or f"{manifest['metadata']['name']}.yaml")
        tmp = path.with_name(f".{path.name}.tmp")  # the kubelet skips dot files: write, then rename
        tmp.write_text(yaml.safe_dump(manifest, sort_keys=False))
        tmp.replace(path)
        return path

    def log(self, pod: str) -> str:
        parts = []
        for name in ("agent.log", f"{pod}.log"):
            if (self.state / name).exists():
                parts.append(f"--- {name}\n" + (self.state / name).read_text(errors="replace")[-4000:])
        return "\n".join(parts)


@pytest.fixture
def node() -> Iterator[Node]:
    base = Path(f"/var/tmp/simnode-test-{secrets.token_hex(4)}")
    base.mkdir(mode=0o755)
    made = Node(base)
    try:
        yield made
    finally:
        stopped, left = stop_agent(made.state, made.pids)
        host_left = made.host.exists()
        if host_left:
            subprocess.run(["umount", "-R", "-l", str(made.host)], capture_output=True, check=False)
            shutil.rmtree(made.host, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not left, f"pod processes outlived `stop`: {left}"
        assert not host_left, f"`stop` left {made.host} on the host: {stopped.stdout}"


def fake_kleidi(node: Node) -> str:
    """A program standing in for an image's binary: reports what it sees, then stays up."""
    script = node.path("/bin/fake-kleidi")
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(
        "#!/bin/sh\n"
        'report="$1"; data="$2"\n'
        "{\n"
        '  echo "uid=$(id -u)"; echo "gid=$(id -g)"; echo "groups=$(id -G)"\n'
        '  echo "greeting=$GREETING"\n'
        '  echo "pwd=$(pwd)"\n'
        '  echo "hello=$(cat "$data/hello.txt")"\n'
        '  if touch "$data/probe" 2>/dev/null; then echo data-writable=yes; else echo data-writable=no; fi\n'
        "  if touch /var/tmp/simnode-root-probe 2>/dev/null; then echo root-writable=yes\n"
        "  else echo root-writable=no; fi\n"
        '} > "$report/report.tmp" && mv "$report/report.tmp" "$report/report.txt"\n'
        '[ "$3" = crash ] && exit 3\n'
        "exec sleep 600\n"
    )
    script.chmod(0o755)
    return f"kleidi={script}"


def pod_manifest(
    node: Node, greeting: str = "hello", data_type: str = "DirectoryOrCreate", mode: str = ""
) -> dict[str, Any]:
    data, report = f"{node.host}/data", f"{node.host}/report"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "kleidi", "namespace": "kube-system"},
        "spec": {
            "hostNetwork": True,
            "containers": [
                {
                    "name": "kleidi",
                    "image": "example.org/kleidi:test",
                    "command": ["kleidi", report, data],
                    "args": [mode] if mode else [],
                    "workingDir": report,
                    "env": [
                        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                        {"name": "GREETING", "value": f"{greeting} from $(NODE)"},
                    ],
                    "securityContext": {
                        "runAsUser": UID,
                        "runAsGroup": GID,
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [
                        {"name": "data", "mountPath": data, "readOnly": True},
                        {"name": "report", "mountPath": report},
                    ],
                }
            ],
            "volumes": [
                {"name": "data", "hostPath": {"path": "/srv/data", "type": data_type}},
                {"name": "report", "hostPath": {"path": "/srv/report", "type": "DirectoryOrCreate"}},
            ],
        },
    }


def prepare_volumes(node: Node) -> Path:
    """/srv/data with a file the pod must see, /srv/report writable by the pod's user; returns the report."""
    node.path("/srv/data").mkdir(parents=True)
    node.path("/srv/data/hello.txt").write_text("from the node root\n")
    node.path("/srv/report").mkdir(parents=True)
    os.chown(node.path("/srv/report"), UID, GID)
    return node.path("/srv/report/report.txt")


def read_report(report: Path, node: Node, greeting: str) -> dict[str, str]:
    def ready() -> dict[str, str] | None:
        if not report.exists():
            return None
        values = dict(line.split("=", 1) for line in report.read_text().splitlines())
        return values if values.get("greeting", "").startswith(greeting) else None

    found: dict[str, str] = wait_for(ready, 15, f"the pod's report ({greeting})\n{node.log('kleidi')}", 0.1)
    return found


def test_static_pod_runs_in_its_view_and_follows_its_manifest(node: Node) -> None:
    report = prepare_volumes(node)
    node.start(fake_kleidi(node))
    node.write(pod_manifest(node))
    seen = read_report(report, node, "hello")

    # hostPath binds are visible at their mountPath, env and the security context apply.
    assert seen["hello"] == "from the node root"
    assert seen["greeting"] == "hello from cp-test"
    assert seen["uid"] == str(UID) and seen["gid"] == str(GID) and seen["groups"] == str(GID)
    assert seen["pwd"] == f"{node.host}/report"
    assert seen["data-writable"] == "no", "a readOnly mount took a write"
    assert seen["root-writable"] == "no", "readOnlyRootFilesystem let the pod write outside its volumes"
    assert not node.path("/srv/data/probe").exists()
    # ... and only there: on the real host the mount points are empty.
    assert (node.host / "data").is_dir() and not any((node.host / "data").iterdir())
    assert not any((node.host / "report").iterdir())
    first = node.pod("kleidi")
    assert first["state"] == "Running" and first["restarts"] == 0, first

    # A changed manifest replaces the pod.
    report.unlink()
    node.write(pod_manifest(node, greeting="changed"))
    assert read_report(report, node, "changed")["greeting"] == "changed from cp-test"
    second = wait_for(lambda: node.pod("kleidi").get("pid"), 5, "the new pod's pid")
    assert second != first["pid"]
    assert not Path(f"/proc/{first['pid']}").exists(), "the old pod still runs"

    # A removed manifest stops it.
    (node.manifests / "kleidi.yaml").unlink()
    wait_for(lambda: not node.status()["pods"], 10, f"the pod to stop\n{node.log('kleidi')}")
    assert not Path(f"/proc/{second}").exists()

    # stop takes the agent and the empty mount points it made on the host.
    node.write(pod_manifest(node, greeting="again"))
    read_report(report, node, "again")
    third = node.pod("kleidi")["pid"]
    result = json.loads(agent("stop", "--state-dir", str(node.state)).stdout)
    assert not Path(f"/proc/{third}").exists()
    assert not node.host.exists(), result
    assert str(node.host) in result["removed_mount_points"]
    assert node.path("/srv/data/hello.txt").exists(), "stop must not touch the node root's content"


def test_missing_directory_volume_crashes_and_broken_manifests(node: Node) -> None:
    report = node.path("/srv/report/report.txt")
    node.path("/srv/report").mkdir(parents=True)
    os.chown(node.path("/srv/report"), UID, GID)
    node.start(fake_kleidi(node))
    node.write(pod_manifest(node, data_type="Directory"))
    (node.manifests / "notes.txt").write_text("not: [a pod\n")
    (node.manifests / ".hidden.yaml").write_text("ignored: true\n")

    # A Directory volume that does not exist: the pod is not started, and is retried with back-off.
    pod = wait_for(lambda: node.pod("kleidi").get("state") == "CreateContainerError" and node.pod("kleidi"), 5, "error")
    assert "hostPath type check failed: /srv/data" in pod["message"] and pod["pid"] is None
    time.sleep(1.5)
    assert not report.exists(), "the pod ran without its Directory volume"
    errors = node.status()["manifest_errors"]
    assert list(errors) == [str(node.manifests / "notes.txt")], errors  # dot files are skipped, others read

    node.path("/srv/data").mkdir(parents=True)
    node.path("/srv/data/hello.txt").write_text("late\n")
    assert read_report(report, node, "hello")["hello"] == "late"

    # A container that exits is restarted with back-off, counting restarts and keeping its exit code.
    node.write(pod_manifest(node, greeting="crash", mode="crash"))
    pod = wait_for(lambda: node.pod("kleidi").get("restarts", 0) >= 2 and node.pod("kleidi"), 10, "restarts")
    assert pod["last_exit_code"] == 3 and pod["state"] in ("CrashLoopBackOff", "Running"), pod


def test_exec_runs_a_command_in_the_pods_view(node: Node) -> None:
    prepare_volumes(node)
    manifest = node.write(pod_manifest(node))

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return agent("exec", "--node-root", str(node.root), "--manifest", str(manifest), "--", *command, check=False)

    assert run("cat", f"{node.host}/data/hello.txt").stdout == "from the node root\n"
    assert run("sh", "-c", 'echo "$(id -u):$GREETING"').stdout.strip() == f"{UID}:hello from {os.uname().nodename}"
    assert run("sh", "-c", "exit 7").returncode == 7
    assert not node.host.exists(), "exec left the mount points it made"


def test_exec_without_a_command_runs_the_containers_own_once(node: Node) -> None:
    report = prepare_volumes(node)
    manifest = node.write(pod_manifest(node, greeting="once", mode="crash"))
    exec_args = ["exec", "--node-root", str(node.root), "--manifest", str(manifest), "--node", "cp-test"]

    # The container's command and args, command[0] mapped as the agent maps it; its exit code comes back.
    done = agent(*exec_args, f"--program={fake_kleidi(node)}", check=False)
    assert done.returncode == 3, done.stderr
    seen = dict(line.split("=", 1) for line in report.read_text().splitlines())
    assert seen["greeting"] == "once from cp-test" and seen["hello"] == "from the node root"
    assert seen["uid"] == str(UID) and seen["root-writable"] == "no"

    # An image binary without a program is refused before anything runs, as the agent refuses it.
    report.unlink()
    unmapped = agent(*exec_args, check=False)
    assert unmapped.returncode == 125 and "'kleidi' has no program on this node" in unmapped.stderr
    assert not report.exists()
    assert not node.host.exists(), "exec left the mount points it made"


def test_capabilities_are_composed_as_containerd_does(node: Node) -> None:
    data = node.path("/srv/data")
    data.mkdir(parents=True)
    (data / "file").write_text("x")
    mount = f"{node.host}/data"

    def run(user: int, capabilities: dict[str, list[str]], script: str) -> subprocess.CompletedProcess[str]:
        container = {
            "name": "c",
            "image": "example.org/c:test",
            "command": ["sh"],
            "securityContext": {"runAsUser": user, "runAsGroup": user, "capabilities": capabilities},
            "volumeMounts": [{"name": "data", "mountPath": mount}],
        }
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "caps", "namespace": "kube-system"},
            "spec": {"hostNetwork": True, "containers": [container],
                     "volumes": [{"name": "data", "hostPath": {"path": "/srv/data", "type": "Directory"}}]},
        }  # fmt: skip
        manifest = node.write(pod)
        return agent("exec", "--node-root", str(node.root), "--manifest", str(manifest), "--", "sh", "-c", script,
                     check=False)  # fmt: skip

    bounding = "grep -E '^Cap(Eff|Bnd)' /proc/self/status | tr -s '\\t' ' '"
    # Root with drop ALL and add CHOWN has exactly CAP_CHOWN (bit 0): it may give its file away, nothing more.
    done = run(0, {"drop": ["ALL"], "add": ["CHOWN"]}, f"chown {UID} {mount}/file && {bounding}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == ["CapEff: 0000000000000001", "CapBnd: 0000000000000001"], done.stdout
    assert data.joinpath("file").stat().st_uid == UID
    # Without it, root may not: every capability was dropped.
    refused = run(0, {"drop": ["ALL"]}, f"chown 0 {mount}/file")
    assert refused.returncode != 0 and "Operation not permitted" in refused.stderr
    # The runtime default less one dropped capability; a non-root user gets none of them.
    done = run(0, {"drop": ["CAP_NET_RAW"]}, bounding)
    assert done.stdout.splitlines()[:2] == ["CapEff: 00000000a80405fb", "CapBnd: 00000000a80405fb"], done.stdout
    done = run(UID, {"add": ["NET_ADMIN"]}, bounding)
    assert done.stdout.splitlines()[:2] == ["CapEff: 0000000000000000", "CapBnd: 00000000a80435fb"], done.stdout
    everything = run(0, {"add": ["ALL"]}, "true")
    assert everything.returncode == 125 and "capabilities.add ALL is not simulated" in everything.stderr
    assert not node.host.exists(), "exec left the mount points it made"


# -- the kube-apiserver stand-in ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cluster PKI and one node's (address 127.0.0.1), made by the same script prepare uses."""
    base = tmp_path_factory.mktemp("pki")
    subprocess.run(
        [sys.executable, str(PKI), "cluster", "--dir", str(base / "cluster")], check=True, capture_output=True
    )
    node_args = ["--cluster-dir", str(base / "cluster"), "--node-root", str(base / "node"), "--node-name", "cp-test"]
    node_args += ["--address", "127.0.0.1"]
    subprocess.run([sys.executable, str(PKI), "node", *node_args], check=True, capture_output=True)
    return base


def simnode_pki() -> Any:
    """molecule/default/simnode/pki.py as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("simnode_pki", PKI)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def encryption_config(*providers: dict[str, Any]) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "apiserver.config.k8s.io/v1",
            "kind": "EncryptionConfiguration",
            "resources": [{"resources": ["secrets"], "providers": [*providers, {"identity": {}}]}],
        }
    )


AESCBC = {"aescbc": {"keys": [{"name": "key1", "secret": "c2VjcmV0IGlzIHNlY3VyZSwgb3IgaXMgaXQ/IG5vdCA="}]}}


def kms(name: str, endpoint: str, version: str | None = "v2") -> dict[str, Any]:
    return {"kms": {"name": name, "endpoint": endpoint, **({"apiVersion": version} if version else {})}}


BAD_CONFIGS = {
    "missing": (None, "error opening encryption provider configuration file"),
    "wrong-kind": ("apiVersion: v1\nkind: ConfigMap\n", "no kind 'ConfigMap' is registered"),
    "short-key": (
        encryption_config({"aescbc": {"keys": [{"name": "k", "secret": "dG9vIHNob3J0"}]}}),
        "secret is not of the expected length, got 9",
    ),
    "tcp-endpoint": (encryption_config(kms("k", "tcp://127.0.0.1:1")), "only unix is supported"),
    "kms-v1": (encryption_config(kms("k", "unix:///x.sock", None)), "Set --feature-gates=KMSv1=true"),
    "duplicate-name": (
        encryption_config(kms("k", "unix:///a"), kms("k", "unix:///b")),
        "duplicate KMS provider name k",
    ),
    "two-in-one": (encryption_config({"aescbc": {"keys": []}, "identity": {}}), "more than one provider specified"),
}


@pytest.mark.parametrize(("config", "message"), BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_standin_refuses_a_bad_encryption_config(pki: Path, tmp_path: Path, config: str | None, message: str) -> None:
    path = tmp_path / "config.yaml"
    if config is not None:
        path.write_text(config)
    pki_dir = pki / "node/etc/kubernetes/pki"
    done = subprocess.run(
        [sys.executable, str(STANDIN), "--advertise-address=127.0.0.1", f"--secure-port={free_port()}",
         "--etcd-servers=https://127.0.0.1:2379", f"--tls-cert-file={pki_dir}/apiserver.crt",
         f"--tls-private-key-file={pki_dir}/apiserver.key", f"--client-ca-file={pki_dir}/ca.crt",
         f"--encryption-provider-config={path}"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert message in done.stderr, done.stderr
    assert "c2VjcmV0" not in done.stderr


def https(port: int, path: str, pki: Path, cert: str | None = None, key_dir: Path | None = None) -> tuple[int, str]:
    context = ssl.create_default_context(cafile=str(pki / "cluster/ca.crt"))
    if cert:
        pki_dir = key_dir or pki / "node/etc/kubernetes/pki"
        context.load_cert_chain(str(pki_dir / f"{cert}.crt"), str(pki_dir / f"{cert}.key"))
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=context, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def apiserver_manifest(port: int, socket_host_dir: str | None, socket_mount: str) -> dict[str, Any]:
    mounts = [
        {"name": "k8s-certs", "mountPath": "/etc/kubernetes/pki", "readOnly": True},
        {"name": "encryption", "mountPath": "/etc/kubernetes/encryption", "readOnly": True},
    ]
    volumes = [
        {"name": "k8s-certs", "hostPath": {"path": "/etc/kubernetes/pki", "type": "DirectoryOrCreate"}},
        {"name": "encryption", "hostPath": {"path": "/etc/kubernetes/encryption", "type": "DirectoryOrCreate"}},
    ]
    if socket_host_dir:
        mounts.append({"name": "kms-socket", "mountPath": socket_mount})
        volumes.append({"name": "kms-socket", "hostPath": {"path": socket_host_dir, "type": "DirectoryOrCreate"}})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "kube-apiserver", "namespace": "kube-system"},
        "spec": {
            "hostNetwork": True,
            "containers": [
                {
                    "name": "kube-apiserver",
                    "image": "registry.k8s.io/kube-apiserver:v1.31.4",
                    "command": [
                        "kube-apiserver",
                        "--advertise-address=127.0.0.1",
                        f"--secure-port={port}",
                        "--client-ca-file=/etc/kubernetes/pki/ca.crt",
                        "--tls-cert-file=/etc/kubernetes/pki/apiserver.crt",
                        "--tls-private-key-file=/etc/kubernetes/pki/apiserver.key",
                        "--etcd-servers=https://127.0.0.1:2379",
                        "--encryption-provider-config=/etc/kubernetes/encryption/config.yaml",
                        "--encryption-provider-config-automatic-reload=true",
                    ],
                    "volumeMounts": mounts,
                }
            ],
            "volumes": volumes,
        },
    }


def test_standin_checks_the_plugin_through_the_manifests_mounts(node: Node, pki: Path, tmp_path: Path) -> None:
    shutil.copytree(pki / "node/etc/kubernetes", node.path("/etc/kubernetes"), dirs_exist_ok=True)
    socket_mount = f"{node.host}/kleidi"  # where the apiserver pod sees the plugin's socket directory
    node.path("/etc/kubernetes/encryption").mkdir()
    config = node.path("/etc/kubernetes/encryption/config.yaml")
    kleidi_kms = kms("kleidi", f"unix://{socket_mount}/kleidi.sock")
    kleidi_kms["kms"]["timeout"] = "2s"
    config.write_text(encryption_config(kleidi_kms, AESCBC))
    port = free_port()
    node.start(f"kube-apiserver={sys.executable} {STANDIN}")

    hsm = SoftHsm(tmp_path / "hsm")
    hsm.keygen("kek-1")
    plugin_dir = node.path("/var/lib/kleidi-test")  # the plugin's socket lands in <plugin_dir>/run
    with KleidiProcess(plugin_dir, pkcs11_config(hsm), env=hsm.env) as plugin:

        def readyz() -> tuple[int, str]:
            try:
                return https(port, "/readyz?verbose", pki)
            except OSError:
                return 0, ""

        # The plugin is down: the stand-in starts anyway and is not ready.
        node.write(apiserver_manifest(port, "/var/lib/kleidi-test/run", socket_mount))
        code, body = wait_for(
            lambda: readyz()[0] and readyz(), 15, f"the stand-in to answer\n{node.log('kube-apiserver')}"
        )
        assert code == 500 and "[-]kms-providers failed: reason withheld" in body, body

        # Up: ready within the 3 s negative cache, through the manifest's socket mount.
        plugin.start()
        code, body = wait_for(lambda: readyz()[0] == 200 and readyz(), 10, f"ready\n{node.log('kube-apiserver')}")
        assert "[+]kms-providers ok" in body and "readyz check passed" in body
        assert https(port, "/livez", pki) == (200, "ok")

        # The individual check wants a cluster admin's client certificate.
        code, body = https(port, "/healthz/kms-providers", pki)
        assert code == 403 and 'User \\"system:anonymous\\" cannot get path' in body, body
        assert https(port, "/healthz/kms-providers", pki, cert="apiserver-kubelet-client") == (200, "ok")
        viewer = tmp_path / "viewer"
        simnode_pki().Pki().leaf(viewer, "jane", pki / "cluster", "ca", "jane", ("developers",))
        code, body = https(port, "/healthz/kms-providers", pki, cert="jane", key_dir=viewer)
        assert code == 403 and 'User \\"jane\\"' in body, body  # known, but not a cluster admin
        stranger = tmp_path / "stranger"
        subprocess.run([sys.executable, str(PKI), "cluster", "--dir", str(stranger)], check=True, capture_output=True)
        with pytest.raises(OSError):  # a certificate of another CA fails the TLS handshake
            https(port, "/healthz/kms-providers", pki, cert="ca", key_dir=stranger)

        # Automatic reload: an invalid file is refused, the running config stays and a failure is counted.
        config.write_text("apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources: []\n")
        failures = 'status="failure"} 1'
        wait_for(
            lambda: any(
                line.startswith("apiserver_encryption_config_controller_automatic_reloads_total{") and failures in line
                for line in https(port, "/metrics", pki, cert="apiserver-kubelet-client")[1].splitlines()
            ),
            10,
            "a reload failure",
        )
        assert readyz()[0] == 200

        # The same plugin, but the manifest no longer mounts its socket directory: not ready.
        config.write_text(encryption_config(kleidi_kms, AESCBC))
        node.write(apiserver_manifest(port, None, socket_mount))
        code, body = wait_for(lambda: readyz()[0] == 500 and readyz(), 15, f"not ready\n{node.log('kube-apiserver')}")
        code, detail = https(port, "/readyz/kms-providers", pki, cert="apiserver-kubelet-client")
        assert code == 500 and "kleidi.sock" in detail, detail
        assert node.pod("kube-apiserver")["restarts"] == 0


STATUS_GAUGE = "apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds"
TIME_SCALE = 0.05  # the stand-in's test knob: polls every 3 s while healthy, every 0.5 s while failing
HEALTHY_POLL = 60 * TIME_SCALE


def apiserver_id_hash(node_name: str) -> str:
    """What kube-apiserver on a host of that name puts in apiserver_id_hash: its identity (server.NewConfig), hashed."""
    data = b"".join(len(p).to_bytes(2, "big") + p for p in (node_name.encode(), b"kube-apiserver"))
    identity = "apiserver-" + base64.b32encode(hashlib.sha256(data).digest()[:16]).decode().rstrip("=").lower()
    return "sha256:" + hashlib.sha256(identity.encode()).hexdigest()


def metrics_text(port: int, pki: Path) -> str:
    code, text = https(port, "/metrics", pki, cert="apiserver-kubelet-client")
    assert code == 200, text
    return text


def kms_status_series(port: int, pki: Path, provider: str = "kleidi") -> dict[str, float]:
    """The stand-in's Status gauge for one provider, as {key_id_hash: last time}; every line of the gauge checked
    for the exact shape kube-apiserver prints. {} while the stand-in does not answer."""
    try:
        text = metrics_text(port, pki)
    except OSError:
        return {}
    line = re.compile(
        rf'{STATUS_GAUGE}\{{apiserver_id_hash="{apiserver_id_hash("cp-test")}",key_id_hash="(sha256:[0-9a-f]{{64}})",'
        r'provider_name="([^"]+)"\} (\d\.\d+e\+09)'
    )
    series = {}
    for found in text.splitlines():
        if found.startswith(STATUS_GAUGE + "{"):
            match = line.fullmatch(found)
            assert match, found
            if match.group(2) == provider:
                series[match.group(1)] = float(match.group(3))
    if series:
        help_text = "[ALPHA] The last time in seconds when a keyID was returned by the Status RPC call."
        assert f"# HELP {STATUS_GAUGE} {help_text}\n# TYPE {STATUS_GAUGE} gauge\n" in text, text
    # Only what the real apiserver exports: no storage reads or writes here, so no per-transformation series.
    assert "apiserver_envelope_encryption_key_id_hash_total" not in text, text
    return series


def key_hash(plugin: KleidiProcess) -> str:
    with plugin.client() as client:
        return "sha256:" + hashlib.sha256(client.status().key_id.encode()).hexdigest()


def encrypt_calls(plugin: KleidiProcess) -> str:
    code, text = plugin.http("/metrics")
    assert code == 200, text
    found = re.search(r'^kleidi_requests_total\{api="v2",code="OK",method="Encrypt"\} (\S+)$', text, re.M)
    return found.group(1) if found else "0"


def polling_standin(node: Node, pki: Path, *providers: dict[str, Any]) -> tuple[int, Path, str]:
    """The stand-in on a test node with the poll knob set, its KMS socket directory mounted: (port, its
    EncryptionConfiguration file, the endpoint of the plugin's socket as the pod sees it)."""
    shutil.copytree(pki / "node/etc/kubernetes", node.path("/etc/kubernetes"), dirs_exist_ok=True)
    socket_mount = f"{node.host}/kleidi"
    config = node.path("/etc/kubernetes/encryption/config.yaml")
    config.parent.mkdir()
    endpoint = f"unix://{socket_mount}/kleidi.sock"
    config.write_text(encryption_config(*[{"kms": {**p["kms"], "endpoint": endpoint}} for p in providers]))
    port = free_port()
    manifest = apiserver_manifest(port, "/var/lib/kleidi-test/run", socket_mount)
    manifest["spec"]["containers"][0]["env"] = [{"name": "SIMNODE_TEST_KMS_TIME_SCALE", "value": str(TIME_SCALE)}]
    node.start(f"kube-apiserver={sys.executable} {STANDIN}")
    node.write(manifest)
    return port, config, endpoint


def test_standin_polls_status_and_rotates_the_dek_when_the_kek_changes(node: Node, pki: Path, tmp_path: Path) -> None:
    """The background poll, with nothing asking /healthz or /readyz: the Status gauge of a key_id moves forward on
    every healthy poll; after the plugin restarts on a second KEK, the next poll records the new key_id as the
    provider's newest series and rotates the DEK seed (one Encrypt on the new plugin)."""
    hsm = SoftHsm(tmp_path / "hsm")
    hsm.keygen("kek-1")
    hsm.keygen("kek-2")
    # The plugin's socket lands in <node root>/var/lib/kleidi-test/run, which the stand-in's manifest mounts.
    with KleidiProcess(node.path("/var/lib/kleidi-test"), pkcs11_config(hsm, "kek-1"), env=hsm.env) as plugin:
        plugin.start()
        old = key_hash(plugin)
        port, _, _ = polling_standin(node, pki, kms("kleidi", ""))

        # Primed at load: the first key_id is there before anyone asks for health.
        primed = wait_for(
            lambda: kms_status_series(port, pki).get(old),
            20,
            f"the primed Status gauge\n{node.log('kube-apiserver')}",
            interval=0.25,
        )
        # The healthy poll calls Status again within one interval (the cached answer has expired by then).
        wait_for(lambda: kms_status_series(port, pki).get(old, 0) > primed, HEALTHY_POLL + 2, "a poll", interval=0.25)

        plugin.stop()
        plugin.write_config(pkcs11=hsm.config("kek-2"))
        plugin.start()
        new = key_hash(plugin)
        assert new != old
        started = time.monotonic()

        def newest() -> str | None:
            found = kms_status_series(port, pki)
            return max(found, key=lambda h: found[h]) if found else None

        wait_for(
            lambda: newest() == new, HEALTHY_POLL + 5, f"the new key_id\n{node.log('kube-apiserver')}", interval=0.25
        )
        took = time.monotonic() - started
        assert took <= HEALTHY_POLL + 2, f"the poll took {took:.1f}s to see the new key_id"
        found = kms_status_series(port, pki)
        assert set(found) == {old, new}, found  # the old key_id's series stays (the real LRU keeps 100)

        # The poll rotated the DEK seed: one Encrypt on the new plugin, whose key_id matched Status'.
        pod_log = node.state / "kube-apiserver.log"
        wait_for(lambda: f"oldKeyIDHash={old}" in pod_log.read_text(), 5, "the rotation log")
        log = pod_log.read_text()
        assert "successfully rotated DEK provider=kleidi uid=" in log, log
        assert f"newKeyIDHash={new} oldKeyIDHash={old}" in log, log
        assert encrypt_calls(plugin) == "1.0"
        assert "test knob: KMS poll intervals 3s/0.5s and health TTLs 1s/0.15s" in log, log
        assert node.pod("kube-apiserver")["restarts"] == 0


def test_standin_reload_swaps_the_polled_providers(node: Node, pki: Path, tmp_path: Path) -> None:
    """A reloaded config's providers are primed (a new DEK seed) and polled from then on; the replaced ones are
    polled until their grace period (2 x their timeouts) ends, then no more."""
    hsm = SoftHsm(tmp_path / "hsm")
    hsm.keygen("kek-1")
    with KleidiProcess(node.path("/var/lib/kleidi-test"), pkcs11_config(hsm), env=hsm.env) as plugin:
        plugin.start()
        key = key_hash(plugin)
        first = kms("kleidi", "")
        first["kms"]["timeout"] = "1s"  # a grace period of 2 s once replaced
        port, config, endpoint = polling_standin(node, pki, first)
        wait_for(lambda: kms_status_series(port, pki).get(key), 20, "the primed Status gauge", interval=0.25)
        assert encrypt_calls(plugin) == "1.0"  # the first DEK seed

        # The same plugin under another provider name: the series tell the two configs' polls apart.
        config.write_text(encryption_config(kms("kleidi-next", endpoint)))

        def reloaded() -> float:
            found = re.search(
                r'automatic_reload_last_timestamp_seconds\{[^}]*status="success"\} (\S+)', metrics_text(port, pki)
            )
            return float(found.group(1)) if found else 0.0

        reloaded_at = wait_for(reloaded, 10, f"the reload\n{node.log('kube-apiserver')}", interval=0.25)
        assert encrypt_calls(plugin) == "2.0"  # the new provider's own DEK seed, made when it was primed
        time.sleep(2 + HEALTHY_POLL + 0.5)  # the grace period, then one more poll interval
        old, new = kms_status_series(port, pki)[key], kms_status_series(port, pki, "kleidi-next")[key]
        assert old < reloaded_at + 2 + 0.5, (
            f"the replaced provider was polled {old - reloaded_at:.1f}s after the reload"
        )
        assert new > reloaded_at, "the new provider is not polled"  # it was primed before the reload counted
        assert node.pod("kube-apiserver")["restarts"] == 0
