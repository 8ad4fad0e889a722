"""The chart's DaemonSet pod on a simulated node (molecule/default/simnode), as far as a machine without a container
runtime or an API server allows.

The chart is rendered with ci/softhsm-values.yaml. Then this test does for the DaemonSet's pod what the kubelet
does: it writes each ConfigMap volume where the kubelet writes it (the pod's directory under /var/lib/kubelet, in
the kubelet's atomic-writer layout, with the volume's defaultMode) and mounts it from there as a hostPath; it runs
the init containers in order, each to completion, through the node agent's `exec` (the agent's own sandbox: mounts,
user, capabilities, read-only root); and, only when every one succeeded, gives the plugin container to the node
agent, which runs it and its readiness probe. `kleidi check` then talks to the plugin from the node and as the
`helm test` pod does.

The node is a directory (its node root) under /var/tmp; the pods' mount points are the chart's own paths on this
machine (/etc/kleidi, /run/kleidi, ...), which the agent creates while it needs them and removes afterwards. The
plugin's probe port is a free one, since every simulated node shares this machine's network."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

import kleidi
from scripts.values_doc import load_values
from tests.helm import CHART, render
from tests.plugin import REPO, free_port
from tests.role_modules import pod_filters
from tests.test_simnode import agent, stop_agent

pytestmark = pytest.mark.integration

AGENT = REPO / "molecule" / "default" / "simnode" / "node_agent.py"
SOFTHSM_VALUES = CHART / "ci" / "softhsm-values.yaml"
NODE_NAME = "cp-helm"
PLUGIN_UID = PLUGIN_GID = 10001  # values.yaml securityContext
# Where this test puts the pods the scheduler bound to the node: the agent reads them as the kubelet reads its
# static pod directory. Not /etc/kubernetes/manifests, which the chart's guard inspects.
BOUND_PODS = "/etc/simnode/bound-pods"
SYSTEM_PYTHON = Path("/usr/bin/python3")


# -- the image --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Image:
    """What stands in for the chart's image: the agent's --program mappings for the commands its pods run."""

    root: Path
    kleidi: tuple[str, ...]  # the image's `kleidi` command, here

    @property
    def programs(self) -> tuple[str, ...]:
        return (f"--program=kleidi={' '.join(self.kleidi)}", "--program=sh=/bin/sh")


def _runtime_closure(name: str) -> list[importlib.metadata.Distribution]:
    """The installed distributions `name` needs at run time (extras left out), this Python's versions."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [name]
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in found:
            continue
        found[key] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(found.values())


def build_image(root: Path) -> Image:
    """A virtualenv of the system Python holding kleidi (this working tree) and the very distributions this
    Python runs it with, copied file by file from their install records.

    The image's kleidi must be a program the plugin's user (10001) can run, as it is in the real image; this
    Python lives under /root, which only root may enter. The init containers' tools (pkcs11-tool, python3) are
    this machine's, found through the container's PATH."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    system = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import sys; print(f'{sys.version_info.major}.{sys.version_info.minor}')"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert system == here, f"{SYSTEM_PYTHON} is {system}, this Python {here}: their compiled wheels differ"
    root.mkdir(mode=0o755)
    venv = root / "venv"
    subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    site = Path(
        subprocess.run(
            [str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    ours = Path(sysconfig.get_path("purelib")).resolve()
    for dist in _runtime_closure("kleidi"):
        if dist.metadata["Name"] == "kleidi":
            continue  # installed editable: the package comes from the working tree below
        for file in dist.files or []:
            source = Path(str(dist.locate_file(file))).resolve()
            if not source.is_relative_to(ours) or not source.is_file():
                continue  # console scripts and the like, outside site-packages
            target = site / source.relative_to(ours)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    shutil.copytree(REPO / "kleidi", site / "kleidi", ignore=shutil.ignore_patterns("__pycache__"))
    # Compiled now: the pods run with a read-only root filesystem and could not write their caches.
    subprocess.run([str(venv / "bin/python"), "-m", "compileall", "-q", str(site / "kleidi")], check=True)
    return Image(root=root, kleidi=(str(venv / "bin/python"), "-m", "kleidi"))


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    root = Path(f"/var/tmp/kleidi-image-{secrets.token_hex(4)}")
    try:
        built = build_image(root)
        done = subprocess.run(
            ["setpriv", f"--reuid={PLUGIN_UID}", f"--regid={PLUGIN_GID}", "--clear-groups", "--", *built.kleidi,
             "version"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.stdout.strip() == f"kleidi {kleidi.__version__}", done.stdout + done.stderr
        yield built
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- the node ---------------------------------------------------------------------------------------------------
class Node:
    """A simulated control-plane node: its root, its agent's state dir, and what the test ran on it."""

    def __init__(self, base: Path, image: Image) -> None:
        self.base = base
        self.root = base / "root"
        self.state = base / "agent"
        self.one_shot = base / "one-shot"  # manifests of the containers run once, outside the agent's pods
        for path in (self.root, self.state, self.one_shot):
            path.mkdir(parents=True)
        self.image = image
        self.pids: set[int] = set()

    def path(self, node_path: str) -> Path:
        return self.root / node_path.lstrip("/")

    def start_agent(self) -> None:
        agent("start", "--node", NODE_NAME, "--node-root", str(self.root), "--state-dir", str(self.state),
              "--node-address", "127.0.0.1", "--manifests-dir", BOUND_PODS, *self.image.programs)  # fmt: skip

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(agent("status", "--state-dir", str(self.state)).stdout)
        self.pids |= {p["pid"] for p in data.get("pods", {}).values() if p.get("pid")}
        return data

    def run_once(self, pod: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        """The pod's one container, run to completion in its view by the agent's sandbox; its mount points are
        recorded with the agent's, so that stopping the agent removes them."""
        manifest = self.one_shot / f"{pod['metadata']['name']}.yaml"
        manifest.write_text(yaml.safe_dump(pod, sort_keys=False))
        return agent("exec", "--node-root", str(self.root), "--manifest", str(manifest), "--node", NODE_NAME,
                     "--state-dir", str(self.state), *self.image.programs, check=False, timeout=120)  # fmt: skip

    def bind(self, pod: dict[str, Any]) -> str:
        """Give a pod to the agent; returns its key in the agent's status."""
        directory = self.path(BOUND_PODS)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{pod['metadata']['name']}.yaml"
        tmp = path.with_name(f".{path.name}.tmp")  # the agent skips dot files: write, then rename
        tmp.write_text(yaml.safe_dump(pod, sort_keys=False))
        tmp.replace(path)
        return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"

    def unbind(self, key: str, timeout: float = 30) -> None:
        """Take a pod away from the agent, as its deletion does, and wait until its container is gone."""
        name = key.split("/", 1)[1]
        (self.path(BOUND_PODS) / f"{name}.yaml").unlink()
        until = time.monotonic() + timeout
        while key in self.status()["pods"]:
            if time.monotonic() > until:
                raise AssertionError(f"{key} still runs {timeout}s after its removal\n{self.logs()}")
            time.sleep(0.2)

    def wait_ready(self, key: str, timeout: float) -> dict[str, Any]:
        """The pod's status once the agent's readiness probe passes; a container that exits fails at once."""
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            pod: dict[str, Any] = self.status()["pods"].get(key) or {}
            if pod.get("ready"):
                return pod
            if pod.get("last_exit_code") is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"{key} not ready: {pod}\n{self.logs()}")

    def logs(self) -> str:
        parts = [f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.state.glob("*.log"))]
        return "\n".join(parts)


@pytest.fixture
def node(image: Image) -> Iterator[Node]:
    base = Path(f"/var/tmp/helm-simnode-{secrets.token_hex(4)}")
    base.mkdir(mode=0o755)
    made = Node(base, image)
    try:
        yield made
    finally:
        stopped, left = stop_agent(made.state, made.pids)
        shutil.rmtree(base, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not left, f"pod processes outlived `stop`: {left}"
        kept = json.loads(stopped.stdout)["kept_mount_points"]
        assert not kept, f"mount points left on this machine: {kept}"


def provision_softhsm_node(node: Node) -> dict[str, str]:
    """What ci/softhsm-values.yaml says the node holds, owned and mode'd as the Ansible roles make them, and the
    kubelet's static pod directory as kubeadm makes it. Returns the PINs."""
    pins = {"pin": secrets.token_hex(8), "so-pin": secrets.token_hex(8)}

    def make(path: str, mode: int, owner: int = 0, text: str | None = None) -> None:
        target = node.path(path)
        if text is None:
            target.mkdir(parents=True)
        else:
            target.write_text(text)
        os.chown(target, owner, owner)
        target.chmod(mode)

    make("/etc/kleidi", 0o750, PLUGIN_UID)
    for name, value in pins.items():
        make(f"/etc/kleidi/{name}", 0o600, PLUGIN_UID, value + "\n")
    conf = "directories.tokendir = /var/lib/kleidi/softhsm/tokens\nobjectstore.backend = file\nlog.level = ERROR\n"
    make("/etc/kleidi/softhsm2.conf", 0o640, PLUGIN_UID, conf)
    make("/var/lib/kleidi/softhsm", 0o755)
    make("/var/lib/kleidi/softhsm/tokens", 0o700, PLUGIN_UID)
    make("/etc/kubernetes/manifests", 0o700)
    return pins


# -- what the kubelet does with the DaemonSet's pod -------------------------------------------------------------
def write_config_map_volume(target: Path, data: dict[str, str], mode: int) -> None:
    """A ConfigMap volume as the kubelet's atomic writer leaves it: the files in a timestamped directory (0755),
    `..data` pointing at it, and one `<key> -> ..data/<key>` link per key; the volume directory itself comes
    from the emptyDir the ConfigMap plugin wraps (0777)."""
    target.mkdir(parents=True)
    target.chmod(0o777)
    stamp = target / time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
    stamp = stamp.with_name(stamp.name + secrets.token_hex(5))
    stamp.mkdir()
    stamp.chmod(0o755)
    for key, text in data.items():
        (stamp / key).write_text(text)
        (stamp / key).chmod(mode)
    (target / "..data").symlink_to(stamp.name)
    for key in data:
        (target / key).symlink_to(f"..data/{key}")


def kubelet_pod(objects: list[dict[str, Any]], node: Node) -> dict[str, Any]:
    """The DaemonSet's pod on this node: its ConfigMap volumes written under the pod's directory, where the
    kubelet writes them, and mounted from there as hostPath volumes; every hostPath volume as rendered."""
    (daemonset,) = [obj for obj in objects if obj["kind"] == "DaemonSet"]
    namespace = daemonset["metadata"]["namespace"]
    config_maps = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "ConfigMap"}
    template = copy.deepcopy(daemonset["spec"]["template"])
    uid = str(uuid.uuid4())
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**template["metadata"], "name": f"{daemonset['metadata']['name']}-{secrets.token_hex(3)[:5]}",
                     "namespace": namespace, "uid": uid},
        "spec": template["spec"],
    }  # fmt: skip
    for volume in pod["spec"]["volumes"]:
        if "hostPath" in volume:
            continue
        source = volume.get("configMap")
        assert source is not None, f"volume {volume['name']}: a kind this test does not materialise: {volume}"
        assert "items" not in source, "items would select keys; the chart mounts whole ConfigMaps"
        path = f"/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~configmap/{volume['name']}"
        write_config_map_volume(node.path(path), config_maps[source["name"]]["data"], source.get("defaultMode", 0o644))
        name = volume["name"]
        volume.clear()
        volume.update(name=name, hostPath={"path": path, "type": "Directory"})
    for directory in (f"/var/lib/kubelet/pods/{uid}", f"/var/lib/kubelet/pods/{uid}/volumes"):
        node.path(directory).chmod(0o750)
    return pod


def one_container_pod(pod: dict[str, Any], container: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """The pod with only `container` and the volumes it mounts: what the agent runs."""
    spec = {k: v for k, v in pod["spec"].items() if k not in ("initContainers", "containers", "volumes")}
    mounted = {mount["name"] for mount in container.get("volumeMounts", [])}
    spec["containers"] = [container]
    spec["volumes"] = [volume for volume in pod["spec"]["volumes"] if volume["name"] in mounted]
    metadata = {**pod["metadata"], "name": name or pod["metadata"]["name"]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


@dataclass
class PodRun:
    init: dict[str, subprocess.CompletedProcess[str]]
    plugin: str | None  # the plugin pod's key in the agent's status, once handed over


def run_daemonset_pod(node: Node, pod: dict[str, Any]) -> PodRun:
    """Init containers in order, each to completion; the first that fails stops the pod there, as the kubelet
    keeps retrying it and never starts the pod's containers. Then the plugin container, to the agent."""
    init: dict[str, subprocess.CompletedProcess[str]] = {}
    for container in pod["spec"].get("initContainers", []):
        done = node.run_once(one_container_pod(pod, container, f"{pod['metadata']['name']}-{container['name']}"))
        init[container["name"]] = done
        if done.returncode != 0:
            return PodRun(init, None)
    (plugin,) = pod["spec"]["containers"]
    return PodRun(init, node.bind(one_container_pod(pod, plugin)))


# -- the tests --------------------------------------------------------------------------------------------------
def softhsm_chart() -> list[dict[str, Any]]:
    return render(SOFTHSM_VALUES, set_values={"config.metrics_listen": f"127.0.0.1:{free_port()}"})


def kleidi_check(socket: Path) -> subprocess.CompletedProcess[str]:
    """`kleidi check` from the node (as root), which must pass."""
    done = subprocess.run(
        [sys.executable, "-m", "kleidi", "check", "--socket", str(socket)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and "PASS: 0 violation(s)" in done.stdout, done.stdout + done.stderr
    return done


def test_the_daemonset_pod_creates_the_token_and_serves_kleidi_check(node: Node) -> None:
    pins = provision_softhsm_node(node)
    objects = softhsm_chart()
    pod = kubelet_pod(objects, node)
    node.start_agent()
    run = run_daemonset_pod(node, pod)

    assert list(run.init) == [container["name"] for container in pod["spec"]["initContainers"]]
    assert {"guard", "softhsm-init"} <= set(run.init)
    for name, done in run.init.items():
        assert done.returncode == 0, f"init container {name}: {done.returncode}\n{done.stdout}{done.stderr}"
    assert "no kleidi static pod on this node" in run.init["guard"].stdout
    assert "created token kleidi with KEK kleidi-kek-1" in run.init["softhsm-init"].stdout
    tokens = node.path("/var/lib/kleidi/softhsm/tokens")
    store = list(tokens.rglob("*"))
    assert store, "softhsm-init left the token directory empty"
    assert {(p.stat().st_uid, p.stat().st_gid) for p in store} == {(PLUGIN_UID, PLUGIN_GID)}

    assert run.plugin is not None
    plugin = node.wait_ready(run.plugin, 40)
    assert plugin["state"] == "Running" and plugin["restarts"] == 0, plugin

    socket = node.path("/run/kleidi/kleidi.sock")
    check = kleidi_check(socket)
    key_id = check.stdout.split("key_id=", 1)[1].split()[0]
    assert key_id.startswith("pkcs11:aes-gcm:kleidi-kek-1:"), check.stdout
    assert (socket.stat().st_uid, socket.stat().st_mode & 0o777) == (PLUGIN_UID, 0o600)

    # `helm test`: the rendered test pod, with its socket mount and as its user, in the same sandbox.
    (test_pod,) = [obj for obj in objects if obj["kind"] == "Pod"]
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    helm_test = node.run_once(test_pod)
    assert helm_test.returncode == 0, helm_test.stdout + helm_test.stderr
    assert "checking KMS plugin at unix:///run/kleidi/kleidi.sock" in helm_test.stdout
    assert "PASS: 0 violation(s)" in helm_test.stdout

    # A rollout (maxSurge 0): the old pod goes, then a new one with a new UID runs on the same node. The socket
    # directory is already the plugin's, the token is left as it is, and the plugin serves the same KEK.
    node.unbind(run.plugin)
    rollout = run_daemonset_pod(node, kubelet_pod(objects, node))
    for name, done in rollout.init.items():
        assert done.returncode == 0, f"init container {name}: {done.returncode}\n{done.stdout}{done.stderr}"
    assert "already holds a token store; leaving it as it is" in rollout.init["softhsm-init"].stdout
    assert rollout.plugin is not None and rollout.plugin != run.plugin
    assert node.wait_ready(rollout.plugin, 40)["restarts"] == 0
    again = kleidi_check(socket)
    assert f"key_id={key_id}\n" in again.stdout, again.stdout

    everything = node.logs() + check.stdout + again.stdout + helm_test.stdout + helm_test.stderr
    everything += "".join(done.stdout + done.stderr for done in [*run.init.values(), *rollout.init.values()])
    for name, value in pins.items():
        assert value not in everything, f"the {name} appears in a log or an output"


def test_the_guard_keeps_the_plugin_off_a_node_running_the_ansible_static_pod(node: Node) -> None:
    provision_softhsm_node(node)
    values = load_values()
    static_pod = pod_filters().static_pod(values, kleidi.__version__, "x")
    manifest = node.path("/etc/kubernetes/manifests/kleidi.yaml")
    manifest.write_text(yaml.safe_dump(static_pod, sort_keys=False))
    manifest.chmod(0o600)
    pod = kubelet_pod(softhsm_chart(), node)
    node.start_agent()
    run = run_daemonset_pod(node, pod)

    names = [container["name"] for container in pod["spec"]["initContainers"]]
    assert list(run.init) == names[: names.index("guard") + 1], "an init container ran after the guard failed"
    guard = run.init["guard"]
    assert guard.returncode == 1, guard.stdout + guard.stderr
    assert "the Ansible static pod" in guard.stderr and "will not start a second plugin" in guard.stderr
    assert run.plugin is None
    assert not any(node.path("/var/lib/kleidi/softhsm/tokens").iterdir()), "softhsm-init ran"
    time.sleep(1.5)  # more than one scan of the agent's pods directory
    assert node.status()["pods"] == {}
    assert not node.path("/run/kleidi/kleidi.sock").exists()
