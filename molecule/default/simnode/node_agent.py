#!/usr/bin/env python3
"""The node agent: does for one simulated node what the kubelet does for static pods, without a runtime.

Every second it reads <node root>/etc/kubernetes/manifests as the kubelet reads its staticPodPath, runs the
first container of each pod in the pod's filesystem view (sandbox.py), restarts it with back-off when it exits
or fails its probes, replaces it when its manifest changes and stops it when the manifest goes away.

    node_agent.py start  --node N --node-root R --state-dir S [--node-address A] [--program NAME=CMD ...]
    node_agent.py stop   --state-dir S [--state-dir S2 ...]
    node_agent.py status --state-dir S
    node_agent.py exec   --node-root R --manifest FILE [--container C] [--program NAME=CMD ...] [-- CMD ...]
    node_agent.py run    --state-dir S        (the agent in the foreground; `start` runs this as a daemon)

See README.md beside this file for what it does not do."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from podspec import ManifestError, PodSpec, read_manifest
from probes import ProbeWorker
from sandbox import (
    MountPointRecord,
    StartError,
    container_argv,
    container_env,
    ensure_host_mount_points,
    node_path,
    prepare_volumes,
    resolve_program,
)

log = logging.getLogger("simnode.agent")

DEFAULT_MANIFESTS_DIR = "/etc/kubernetes/manifests"
SCAN_INTERVAL = 1.0  # seconds between two reads of the manifests directory
TICK = 0.2  # seconds between two looks at the processes
BACKOFF_MIN, BACKOFF_MAX = 1.0, 10.0  # the kubelet's CrashLoopBackOff, scaled down from 10 s .. 5 min
BACKOFF_RESET_AFTER = 10.0  # a container that ran this long starts its next back-off from the minimum
MAX_GRACE = 30.0


@dataclass(frozen=True)
class AgentConfig:
    node: str
    node_root: Path
    node_address: str
    manifests_dir: str
    programs: dict[str, list[str]]

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "node_root": str(self.node_root),
            "node_address": self.node_address,
            "manifests_dir": self.manifests_dir,
            "programs": self.programs,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentConfig:
        return cls(
            node=data["node"],
            node_root=Path(data["node_root"]),
            node_address=data["node_address"],
            manifests_dir=data["manifests_dir"],
            programs={k: list(v) for k, v in data["programs"].items()},
        )


@dataclass
class Pod:
    """One static pod: the spec it runs, the spec it should run (None once its manifest is gone) and its process."""

    spec: PodSpec
    want: PodSpec | None
    proc: subprocess.Popen[bytes] | None = None
    pid_start: int | None = None
    started_at: float = 0.0
    restarts: int = 0
    last_exit: int | None = None
    backoff: float = 0.0
    not_before: float = 0.0
    state: str = "Waiting"
    message: str = ""
    kill_at: float | None = None  # set while terminating: when SIGKILL follows the SIGTERM
    kill_reason: str = ""
    probes: dict[str, ProbeWorker] = field(default_factory=dict)
    ready: bool = False


class Agent:
    def __init__(self, config: AgentConfig, state_dir: Path) -> None:
        self.config = config
        self.state_dir = state_dir
        self.manifests = node_path(config.node_root, config.manifests_dir)
        self.record = MountPointRecord(state_dir / "mount-points.json")
        self.pods: dict[str, Pod] = {}
        self.manifest_errors: dict[str, str] = {}
        self.removed_mount_points: list[str] = []
        self.stopping = False
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="probe")

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info(
            "agent for node %s: node root %s, manifests %s", self.config.node, self.config.node_root, self.manifests
        )
        next_scan = 0.0
        while not self.stopping:
            now = time.monotonic()
            if now >= next_scan:
                self._apply(self._scan())
                next_scan = now + SCAN_INTERVAL
            for key in list(self.pods):
                self._step(key, time.monotonic())
            self._write_status()
            time.sleep(TICK)
        self._shutdown()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("signal %s: stopping every pod", signal.Signals(signum).name)
        self.stopping = True

    def _scan(self) -> dict[str, PodSpec]:
        """The pods the manifests directory asks for, read as the kubelet reads it: every regular file whose
        name does not start with '.', whatever its extension; an unreadable or invalid file is skipped with a
        log line (so a pod whose manifest breaks is stopped); a second pod of the same name is ignored."""
        desired: dict[str, PodSpec] = {}
        errors: dict[str, str] = {}
        try:
            entries = sorted(self.manifests.iterdir())
        except FileNotFoundError:
            entries = []
        for path in entries:
            if path.name.startswith("."):
                continue
            if not path.is_file():
                errors[str(path)] = "not a regular file: the kubelet does not recurse into directories"
                continue
            try:
                spec = read_manifest(path, self.config.node, self.config.node_address)
            except ManifestError as err:
                errors[str(path)] = str(err)
                continue
            if spec.key in desired:
                errors[str(path)] = f"pod {spec.key} is already defined by {desired[spec.key].file}: ignored"
                continue
            desired[spec.key] = spec
        for file, message in errors.items():
            if self.manifest_errors.get(file) != message:
                log.error("manifest %s: %s", file, message)
        self.manifest_errors = errors
        return desired

    def _apply(self, desired: dict[str, PodSpec]) -> None:
        for key, pod in self.pods.items():
            want = desired.get(key)
            if want is None and pod.want is not None:
                log.info("pod %s: manifest removed, stopping it", key)
            elif want is not None and pod.want is not None and want.digest != pod.want.digest:
                log.info("pod %s: manifest %s changed, replacing the pod", key, want.file)
            if want is None or pod.want is None or want.digest != pod.want.digest:
                pod.want = want
        for key, spec in desired.items():
            if key not in self.pods:
                log.info("pod %s: found in %s", key, spec.file)
                for warning in spec.warnings:
                    log.warning("pod %s: %s", key, warning)
                self.pods[key] = Pod(spec=spec, want=spec)

    def _step(self, key: str, now: float) -> None:
        pod = self.pods[key]
        self._reap(pod, now)
        if pod.want is not pod.spec:
            if pod.proc is not None:
                self._terminate(pod, now, "its pod is being replaced or removed")
                return
            if pod.want is None:
                del self.pods[key]
                return
            # A changed manifest is a new pod to the kubelet (a new UID): counters start again.
            self.pods[key] = Pod(spec=pod.want, want=pod.want)
            for warning in pod.want.warnings:
                log.warning("pod %s: %s", key, warning)
            pod = self.pods[key]
        if pod.proc is None:
            if pod.state not in ("Completed", "Failed") and now >= pod.not_before and not self.stopping:
                self._start(pod, now)
        elif pod.kill_at is not None:
            self._terminate(pod, now, pod.kill_reason)
        else:
            self._probe(pod, now)

    # -- one container -------------------------------------------------------------------------------------
    def _start(self, pod: Pod, now: float) -> None:
        container = pod.spec.container()
        if len(pod.spec.containers) > 1 and pod.restarts == 0 and not pod.message:
            log.warning("pod %s: only its first container (%s) is run", pod.spec.key, container.name)
        try:
            program = resolve_program(container.command[0], self.config.programs)
            mounts = prepare_volumes(container, self.config.node_root)
            ensure_host_mount_points(container, mounts, self.record)
        except (StartError, OSError) as err:
            self._back_off(pod, now, "CreateContainerError", str(err))
            log.error(
                "pod %s: container %s cannot start: %s (retry in %.0fs)", pod.spec.key, container.name, err, pod.backoff
            )
            return
        argv = container_argv(container, mounts, [*program, *container.command[1:]])
        with self._pod_log(pod) as out:
            out.write(
                f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} simnode: starting container {container.name} of "
                f"{pod.spec.key} (restart {pod.restarts}) ---\n".encode()
            )
            out.flush()
            pod.proc = subprocess.Popen(
                argv,
                env=container_env(container, self.config.node),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                start_new_session=True,  # its own process group, which stop and restart signal as a whole
            )
        pod.pid_start = process_start_ticks(pod.proc.pid)
        pod.started_at = now
        pod.state, pod.message, pod.ready = "Running", "", False
        pod.kill_at = None
        pod.probes = {
            kind: ProbeWorker(probe, now, self.executor)
            for kind, probe in (
                ("startup", container.startup),
                ("liveness", container.liveness),
                ("readiness", container.readiness),
            )
            if probe is not None
        }
        log.info(
            "pod %s: started container %s, pid %d: %s",
            pod.spec.key,
            container.name,
            pod.proc.pid,
            shlex.join(container.command),
        )

    def _pod_log(self, pod: Pod) -> IO[bytes]:
        return open(self.state_dir / f"{pod.spec.name}.log", "ab")

    def _reap(self, pod: Pod, now: float) -> None:
        if pod.proc is None or pod.proc.poll() is None:
            return
        code = pod.proc.returncode
        ran = now - pod.started_at
        pod.proc, pod.pid_start, pod.last_exit, pod.ready, pod.probes = None, None, code, False, {}
        killed_by_us, pod.kill_at = pod.kill_at is not None, None
        log.info("pod %s: container exited with %s after %.1fs", pod.spec.key, describe_exit(code), ran)
        if pod.want is not pod.spec or self.stopping:
            pod.state = "Terminated"
            return
        policy = pod.spec.restart_policy
        if policy == "Never" or (policy == "OnFailure" and code == 0 and not killed_by_us):
            pod.state = "Completed" if code == 0 else "Failed"
            return
        pod.restarts += 1
        if ran >= BACKOFF_RESET_AFTER:
            pod.backoff = 0.0
        reason = pod.kill_reason if killed_by_us else f"exited with {describe_exit(code)}"
        self._back_off(pod, now, "CrashLoopBackOff", reason)
        log.info("pod %s: restarting in %.0fs (restart %d)", pod.spec.key, pod.backoff, pod.restarts)

    def _back_off(self, pod: Pod, now: float, state: str, message: str) -> None:
        pod.backoff = BACKOFF_MIN if pod.backoff <= 0 else min(pod.backoff * 2, BACKOFF_MAX)
        pod.not_before = now + pod.backoff
        pod.state, pod.message = state, message

    def _terminate(self, pod: Pod, now: float, reason: str) -> None:
        """SIGTERM to the pod's process group, SIGKILL once its grace period is over."""
        if pod.proc is None:
            return
        if pod.kill_at is None:
            pod.kill_at = now + min(pod.spec.grace_seconds, MAX_GRACE)
            pod.kill_reason = reason
            pod.state = "Terminating"
            log.info("pod %s: stopping pid %d: %s", pod.spec.key, pod.proc.pid, reason)
            signal_group(pod.proc.pid, signal.SIGTERM)
        elif now >= pod.kill_at:
            log.warning("pod %s: pid %d outlived its grace period, killing it", pod.spec.key, pod.proc.pid)
            signal_group(pod.proc.pid, signal.SIGKILL)
            pod.kill_at = now + 5

    def _probe(self, pod: Pod, now: float) -> None:
        startup = pod.probes.get("startup")
        if startup is not None and not startup.ever_succeeded:
            startup.tick(now)
            if startup.failed:
                self._terminate(pod, now, f"failed its startup probe: {startup.last_message}")
            return
        liveness = pod.probes.get("liveness")
        if liveness is not None:
            liveness.tick(now)
            if liveness.failed:
                self._terminate(pod, now, f"failed its liveness probe, will be restarted: {liveness.last_message}")
                return
        readiness = pod.probes.get("readiness")
        if readiness is not None:
            readiness.tick(now)
            pod.ready = readiness.passing
        else:
            pod.ready = True

    # -- stopping and reporting ----------------------------------------------------------------------------
    def _shutdown(self) -> None:
        now = time.monotonic()
        for pod in self.pods.values():
            pod.want = None
            self._terminate(pod, now, "the agent is stopping")
        deadline = now + MAX_GRACE + 10
        while any(p.proc is not None for p in self.pods.values()) and time.monotonic() < deadline:
            now = time.monotonic()
            for pod in self.pods.values():
                self._reap(pod, now)
                if pod.proc is not None:
                    self._terminate(pod, now, "the agent is stopping")
            self._write_status()
            time.sleep(TICK)
        self.pods.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)
        removed, kept = self.record.remove_unused()
        self.removed_mount_points = removed
        log.info("agent stopped; removed mount points %s; kept (in use or not empty) %s", removed, kept)
        self._write_status()

    def _write_status(self) -> None:
        pods = {}
        for key, pod in self.pods.items():
            pods[key] = {
                "name": pod.spec.name,
                "namespace": pod.spec.namespace,
                "manifest": pod.spec.file,
                "container": pod.spec.container().name,
                "state": pod.state,
                "message": pod.message,
                "ready": pod.ready,
                "pid": pod.proc.pid if pod.proc is not None else None,
                "pid_start": pod.pid_start,
                "restarts": pod.restarts,
                "last_exit_code": pod.last_exit,
                "log": str(self.state_dir / f"{pod.spec.name}.log"),
            }
        status = {
            "node": self.config.node,
            "agent_pid": os.getpid(),
            "running": not self.stopping,
            "updated": time.time(),
            "pods": pods,
            "manifest_errors": self.manifest_errors,
            "removed_mount_points": self.removed_mount_points,
        }
        write_json(self.state_dir / "status.json", status)


# -- helpers shared by the subcommands ---------------------------------------------------------------------
def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def describe_exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"


def signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks: with the pid it names one process, even after pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def same_process(pid: int | None, start: int | None) -> bool:
    return pid is not None and start is not None and process_start_ticks(pid) == start


def parse_programs(values: list[str]) -> dict[str, list[str]]:
    programs: dict[str, list[str]] = {}
    for value in values:
        name, sep, command = value.partition("=")
        argv = shlex.split(command)
        if not sep or not name or not argv:
            raise SystemExit(f"--program wants NAME=COMMAND, got {value!r}")
        if not os.path.isabs(argv[0]):
            raise SystemExit(f"--program {name}: {argv[0]!r} must be an absolute path")
        programs[name] = argv
    return programs


@contextlib.contextmanager
def agent_lock(state_dir: Path, blocking: bool = False) -> Any:
    """Held by a running agent for its whole life; yields False when another process holds it."""
    with open(state_dir / "agent.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def agent_running(state_dir: Path) -> bool:
    if not (state_dir / "agent.lock").exists():
        return False
    with agent_lock(state_dir) as free:
        return not free


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# -- subcommands -------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).resolve()
    config = AgentConfig.from_json(read_json(state_dir / "agent.json"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    os.umask(0o022)
    with agent_lock(state_dir) as acquired:
        if not acquired:
            log.info("another agent already runs in %s", state_dir)
            return 0
        (state_dir / "agent.pid").write_text(f"{os.getpid()}\n")
        Agent(config, state_dir).run()
        (state_dir / "agent.pid").unlink(missing_ok=True)
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).resolve()
    config = AgentConfig(
        node=args.node,
        node_root=Path(args.node_root).resolve(),
        node_address=args.node_address,
        manifests_dir=args.manifests_dir,
        programs=parse_programs(args.program),
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    if agent_running(state_dir):
        pid = read_json(state_dir / "status.json").get("agent_pid")
        same = read_json(state_dir / "agent.json") == json.loads(json.dumps(config.to_json()))
        note = "" if same else " with other settings (stop it first to change them)"
        print(json.dumps({"changed": False, "pid": pid, "message": f"agent already running{note}"}))
        return 0
    write_json(state_dir / "agent.json", config.to_json())
    (state_dir / "status.json").unlink(missing_ok=True)
    daemonize([sys.executable, str(Path(__file__).resolve()), "run", "--state-dir", str(state_dir)], state_dir)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status = read_json(state_dir / "status.json")
        if status.get("agent_pid") and agent_running(state_dir):
            print(json.dumps({"changed": True, "pid": status["agent_pid"], "message": "agent started"}))
            return 0
        time.sleep(0.1)
    tail = (state_dir / "agent.log").read_text(errors="replace")[-2000:] if (state_dir / "agent.log").exists() else ""
    print(f"the agent did not come up within 15s; its log ends with:\n{tail}", file=sys.stderr)
    return 1


def daemonize(argv: list[str], state_dir: Path) -> None:
    """Double fork: the agent is re-parented to init, in its own session, with no terminal and no pipe of
    the caller's left open (Ansible waits for those to close)."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(state_dir / "agent.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.closerange(3, 1024)
        os.chdir("/")
        os.execv(argv[0], argv)  # noqa: S606 - argv is this script's own command line
    finally:
        os._exit(127)


def cmd_stop(args: argparse.Namespace) -> int:
    dirs = [Path(d).resolve() for d in args.state_dir]
    result: dict[str, Any] = {"changed": False, "stopped": [], "removed_mount_points": [], "kept_mount_points": []}
    running = [d for d in dirs if d.is_dir() and agent_running(d)]
    for state_dir in running:
        pid = int((state_dir / "agent.pid").read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    for state_dir in running:
        while agent_running(state_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        if agent_running(state_dir):
            print(f"agent in {state_dir} did not stop within {args.timeout}s: killing it", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError, ValueError, OSError):
                os.kill(int((state_dir / "agent.pid").read_text()), signal.SIGKILL)
        result["stopped"].append(str(state_dir))
        result["changed"] = True
    left: list[int] = []
    for state_dir in dirs:
        # Pods die with their agent (parent-death signal); make sure of it even if the agent was killed.
        for pod in read_json(state_dir / "status.json").get("pods", {}).values():
            if same_process(pod.get("pid"), pod.get("pid_start")):
                signal_group(pod["pid"], signal.SIGKILL)
                left.append(pod["pid"])
    until = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in left) and time.monotonic() < until:
        time.sleep(0.1)
    for state_dir in dirs:
        if not state_dir.is_dir():
            continue
        removed, kept = MountPointRecord(state_dir / "mount-points.json").remove_unused()
        if state_dir in running:  # what the agent removed itself on its way out
            removed = read_json(state_dir / "status.json").get("removed_mount_points", []) + removed
        result["removed_mount_points"] += removed
        result["kept_mount_points"] += kept
        result["changed"] = result["changed"] or bool(removed)
        (state_dir / "agent.pid").unlink(missing_ok=True)
    print(json.dumps(result))
    still_running = [d for d in dirs if d.is_dir() and agent_running(d)]
    return 1 if still_running else 0


def cmd_status(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).resolve()
    status = read_json(state_dir / "status.json")
    status["running"] = state_dir.is_dir() and agent_running(state_dir)
    if not status["running"]:
        status["pods"] = {}
    print(json.dumps(status, indent=2, sort_keys=True))
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    programs = parse_programs(args.program)
    node_root = Path(args.node_root).resolve()
    try:
        spec = read_manifest(Path(args.manifest), args.node, args.node_address)
        container = spec.container(args.container)
        if command:
            program = [*resolve_program(command[0], programs, required=False), *command[1:]]
        else:
            # The container's own command, its command[0] mapped as the agent maps it: one run to completion,
            # as the kubelet runs an init container or a restartPolicy Never pod.
            program = [*resolve_program(container.command[0], programs), *container.command[1:]]
        mounts = prepare_volumes(container, node_root)
    except (ManifestError, StartError) as err:
        print(f"exec: {err}", file=sys.stderr)
        return 125
    with contextlib.ExitStack() as stack:
        if args.state_dir:
            record = MountPointRecord(Path(args.state_dir).resolve() / "mount-points.json")
        else:
            # Without an agent's state dir, this exec removes again the mount points it had to create.
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="simnode-exec-")))
            record = MountPointRecord(tmp / "mount-points.json")
            stack.callback(record.remove_unused)
        ensure_host_mount_points(container, mounts, record)
        argv = container_argv(container, mounts, program)
        return subprocess.call(argv, env=container_env(container, args.node))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    start = sub.add_parser("start", help="start the agent as a daemon (nothing if it already runs)")
    start.add_argument("--node", required=True, help="the node's name (HOSTNAME of its pods)")
    start.add_argument("--node-root", required=True, help="host directory holding the node's filesystem")
    start.add_argument("--state-dir", required=True, help="agent.pid, agent.log, <pod>.log, status.json go here")
    start.add_argument("--node-address", default="127.0.0.1", help="the node's IP: probes without a host go there")
    start.add_argument("--manifests-dir", default=DEFAULT_MANIFESTS_DIR, help="staticPodPath as the node sees it")
    start.add_argument(
        "--program", action="append", default=[], metavar="NAME=CMD", help="what runs for command[0] NAME"
    )
    start.set_defaults(func=cmd_start)

    run = sub.add_parser("run", help="the agent in the foreground, with the settings `start` saved")
    run.add_argument("--state-dir", required=True)
    run.set_defaults(func=cmd_run)

    stop = sub.add_parser("stop", help="stop agents, their pods, and remove the empty mount points they made")
    stop.add_argument("--state-dir", required=True, action="append")
    stop.add_argument("--timeout", type=float, default=MAX_GRACE + 15)
    stop.set_defaults(func=cmd_stop)

    status = sub.add_parser("status", help="the agent's pods as JSON")
    status.add_argument("--state-dir", required=True)
    status.set_defaults(func=cmd_status)

    exe = sub.add_parser(
        "exec", help="run a command in a pod's filesystem view (mounts, env, user); no command: the container's own"
    )
    exe.add_argument("--node-root", required=True)
    exe.add_argument("--manifest", required=True)
    exe.add_argument("--container", help="default: the pod's first container")
    exe.add_argument("--node", default=os.uname().nodename)
    exe.add_argument("--node-address", default="127.0.0.1")
    exe.add_argument("--program", action="append", default=[], metavar="NAME=CMD")
    exe.add_argument("--state-dir", help="record created mount points with this agent's instead of removing them")
    exe.add_argument("command", nargs=argparse.REMAINDER)
    exe.set_defaults(func=cmd_exec)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
