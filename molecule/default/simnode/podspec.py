"""A static pod manifest, read and checked the way the kubelet reads one from its manifests directory.

Only what a static pod of a control-plane node uses is modelled: hostPath volumes, env (values and a few
fieldRefs), command/args with $(VAR) expansion, the security context fields that change what a process can do,
httpGet/tcpSocket probes, restartPolicy and the termination grace period. Anything else that would change how
the container runs is refused with a message instead of being silently ignored."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# hostPath types the kubelet knows (k8s.io/api core/v1 HostPathType); "" means no check at all.
HOST_PATH_TYPES = frozenset(
    {"", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice", "BlockDevice"}
)
# fieldRef paths the downward API resolves for a static pod without an API server.
FIELD_REFS = frozenset({"metadata.name", "metadata.namespace", "spec.nodeName", "status.hostIP", "status.podIP"})
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_CAPABILITY = re.compile(r"^[A-Z][A-Z_]*$")
_VAR_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


class ManifestError(ValueError):
    """The file is not a pod the kubelet would run; the message says why."""


@dataclass(frozen=True)
class Mount:
    """One hostPath volume mounted into the container."""

    volume: str
    host_path: str  # hostPath.path, as the node sees it
    mount_path: str
    read_only: bool
    type: str
    sub_path: str = ""

    @property
    def source(self) -> str:
        """What is mounted, as the node sees it: the hostPath, or the subPath inside it."""
        return f"{self.host_path.rstrip('/')}/{self.sub_path}" if self.sub_path else self.host_path


@dataclass(frozen=True)
class Probe:
    """An httpGet or tcpSocket probe (exec and grpc probes are recorded but not run: see README)."""

    kind: str  # httpGet | tcpSocket | exec | grpc
    host: str
    port: int
    path: str = "/"
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()
    initial_delay: float = 0
    period: float = 10
    timeout: float = 1
    failure_threshold: int = 3
    success_threshold: int = 1


@dataclass(frozen=True)
class Container:
    name: str
    image: str
    command: tuple[str, ...]  # command + args, $(VAR) expanded
    env: tuple[tuple[str, str], ...]
    working_dir: str
    run_as_user: int | None
    run_as_group: int | None
    run_as_non_root: bool
    no_new_privs: bool
    drop_all_caps: bool
    read_only_root: bool
    mounts: tuple[Mount, ...]
    liveness: Probe | None = None
    readiness: Probe | None = None
    startup: Probe | None = None
    add_caps: tuple[str, ...] = ()  # capabilities.add, lower case without CAP_ (setpriv's names)
    drop_caps: tuple[str, ...] = ()  # capabilities.drop other than ALL


@dataclass(frozen=True)
class PodSpec:
    name: str
    namespace: str
    file: str
    digest: str  # changes whenever the pod object changes (the kubelet gives the pod a new UID then)
    containers: tuple[Container, ...]
    restart_policy: str
    grace_seconds: float
    warnings: tuple[str, ...] = field(default=())

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def container(self, name: str | None = None) -> Container:
        if name is None:
            return self.containers[0]
        for container in self.containers:
            if container.name == name:
                return container
        raise ManifestError(f"pod {self.key} has no container {name!r}")


def read_manifest(path: Path, node_name: str, node_address: str) -> PodSpec:
    """Parse and validate one manifest file; raises ManifestError with the kubelet-like reason."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ManifestError(f"cannot read {path}: {err}") from err
    try:
        # The kubelet decodes YAML or JSON, one object per file.
        obj = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ManifestError(f"{path}: not YAML or JSON: {err}") from err
    return pod_from_object(obj, str(path), node_name, node_address)


def pod_from_object(obj: Any, file: str, node_name: str, node_address: str) -> PodSpec:
    if not isinstance(obj, dict):
        raise ManifestError(f"{file}: not a Kubernetes object")
    if obj.get("apiVersion") != "v1" or obj.get("kind") != "Pod":
        raise ManifestError(
            f"{file}: expected apiVersion v1, kind Pod; got {obj.get('apiVersion')!r} {obj.get('kind')!r}"
        )
    meta = _mapping(obj.get("metadata"), f"{file}: metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{file}: metadata.name is required")
    namespace = meta.get("namespace") or "default"
    spec = _mapping(obj.get("spec"), f"{file}: spec")
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    warnings: list[str] = []

    volumes = _host_path_volumes(spec.get("volumes") or [], file)
    pod_security = _mapping(spec.get("securityContext") or {}, f"{file}: spec.securityContext")
    containers_raw = spec.get("containers")
    if not isinstance(containers_raw, list) or not containers_raw:
        raise ManifestError(f"{file}: spec.containers must list at least one container")
    if spec.get("initContainers"):
        warnings.append("initContainers are not run by this agent")
    if not spec.get("hostNetwork"):
        warnings.append(
            "hostNetwork is not set: this agent always runs in the node's network (a pod network is not simulated)"
        )
    fields = {
        "metadata.name": name,
        "metadata.namespace": namespace,
        "spec.nodeName": node_name,
        "status.hostIP": node_address,
        "status.podIP": node_address,  # hostNetwork: the pod IP is the node's
    }
    containers = tuple(
        _container(_mapping(raw, f"{file}: container"), volumes, pod_security, fields, file, node_address)
        for raw in containers_raw
    )
    names = [c.name for c in containers]
    if len(set(names)) != len(names):
        raise ManifestError(f"{file}: duplicate container names {names}")
    restart_policy = spec.get("restartPolicy") or "Always"
    if restart_policy not in {"Always", "OnFailure", "Never"}:
        raise ManifestError(f"{file}: unsupported restartPolicy {restart_policy!r}")
    grace = spec.get("terminationGracePeriodSeconds", 30)
    return PodSpec(
        name=name,
        namespace=str(namespace),
        file=file,
        digest=digest,
        containers=containers,
        restart_policy=restart_policy,
        grace_seconds=float(grace),
        warnings=tuple(warnings),
    )


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(f"{what} must be a mapping")
    return value


def _host_path_volumes(raw: Any, file: str) -> dict[str, tuple[str, str]]:
    """volume name -> (hostPath.path, type). Other volume kinds need an API server or a runtime."""
    if not isinstance(raw, list):
        raise ManifestError(f"{file}: spec.volumes must be a list")
    volumes: dict[str, tuple[str, str]] = {}
    for item in raw:
        volume = _mapping(item, f"{file}: volume")
        vname = volume.get("name")
        if not isinstance(vname, str) or not _DNS_LABEL.match(vname):
            raise ManifestError(f"{file}: volume name {vname!r} is not a DNS label")
        if vname in volumes:
            raise ManifestError(f"{file}: duplicate volume name {vname!r}")
        host = volume.get("hostPath")
        if not isinstance(host, dict):
            kinds = sorted(k for k in volume if k != "name")
            raise ManifestError(f"{file}: volume {vname!r} is {kinds}; only hostPath volumes are simulated")
        path = host.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ManifestError(f"{file}: volume {vname!r}: hostPath.path must be an absolute path")
        htype = host.get("type") or ""
        if htype not in HOST_PATH_TYPES:
            raise ManifestError(f"{file}: volume {vname!r}: unsupported hostPath type {htype!r}")
        volumes[vname] = (path, htype)
    return volumes


def _container(
    raw: dict[str, Any],
    volumes: dict[str, tuple[str, str]],
    pod_security: dict[str, Any],
    fields: dict[str, str],
    file: str,
    node_address: str,
) -> Container:
    cname = raw.get("name")
    if not isinstance(cname, str) or not _DNS_LABEL.match(cname):
        raise ManifestError(f"{file}: container name {cname!r} is not a DNS label")
    where = f"{file}: container {cname}"
    if raw.get("envFrom"):
        raise ManifestError(f"{where}: envFrom needs ConfigMaps or Secrets, which a static pod cannot use")
    env = _env(raw.get("env") or [], fields, where)
    command = [*(_strings(raw.get("command") or [], f"{where}: command"))]
    args = _strings(raw.get("args") or [], f"{where}: args")
    if not command:
        raise ManifestError(f"{where}: no command; the image's entrypoint is unknown to this agent")
    env_map = dict(env)
    expanded = tuple(_expand(part, env_map) for part in [*command, *args])

    security = {**pod_security, **_mapping(raw.get("securityContext") or {}, f"{where}: securityContext")}
    caps = _mapping(security.get("capabilities") or {}, f"{where}: capabilities")
    drop = _capabilities(caps.get("drop"), f"{where}: capabilities.drop")
    add = _capabilities(caps.get("add"), f"{where}: capabilities.add")
    if "ALL" in add:
        raise ManifestError(f"{where}: capabilities.add ALL is not simulated")
    if security.get("privileged"):
        raise ManifestError(f"{where}: privileged containers are not simulated")
    run_as_user = _optional_int(security.get("runAsUser"), f"{where}: runAsUser")
    run_as_non_root = bool(security.get("runAsNonRoot"))
    if run_as_non_root and not run_as_user:
        # The kubelet refuses to start it (CreateContainerConfigError): the image's user is unknown or root.
        raise ManifestError(f"{where}: runAsNonRoot is set but runAsUser is {run_as_user!r}")
    working_dir = raw.get("workingDir") or ""
    if working_dir and not str(working_dir).startswith("/"):
        raise ManifestError(f"{where}: workingDir must be absolute")

    return Container(
        name=cname,
        image=str(raw.get("image") or ""),
        command=expanded,
        env=env,
        working_dir=str(working_dir),
        run_as_user=run_as_user,
        run_as_group=_optional_int(security.get("runAsGroup"), f"{where}: runAsGroup"),
        run_as_non_root=run_as_non_root,
        no_new_privs=security.get("allowPrivilegeEscalation") is False,
        drop_all_caps="ALL" in drop,
        add_caps=tuple(c.lower() for c in add),
        drop_caps=tuple(c.lower() for c in drop if c != "ALL"),
        read_only_root=bool(security.get("readOnlyRootFilesystem")),
        mounts=_mounts(raw.get("volumeMounts") or [], volumes, where),
        liveness=_probe(raw.get("livenessProbe"), raw, node_address, f"{where}: livenessProbe"),
        readiness=_probe(raw.get("readinessProbe"), raw, node_address, f"{where}: readinessProbe"),
        startup=_probe(raw.get("startupProbe"), raw, node_address, f"{where}: startupProbe"),
    )


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(f"{what} must be a list of strings")
    return list(value)


def _capabilities(value: Any, what: str) -> list[str]:
    """Capability names as the CRI takes them: CHOWN or CAP_CHOWN, any case; ALL stands for every one."""
    names = [name.upper().removeprefix("CAP_") for name in _strings(value or [], what)]
    for name in names:
        if not _CAPABILITY.match(name):
            raise ManifestError(f"{what}: {name!r} is not a capability name")
    return names


def _optional_int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ManifestError(f"{what} must be a non-negative integer")
    return value


def _env(raw: Any, fields: dict[str, str], where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list):
        raise ManifestError(f"{where}: env must be a list")
    env: dict[str, str] = {}
    for item in raw:
        entry = _mapping(item, f"{where}: env entry")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ManifestError(f"{where}: env entry without a name")
        if "valueFrom" in entry:
            ref = _mapping(entry["valueFrom"], f"{where}: env {name}.valueFrom").get("fieldRef")
            path = ref.get("fieldPath") if isinstance(ref, dict) else None
            if path not in FIELD_REFS:
                raise ManifestError(
                    f"{where}: env {name}: only fieldRef {sorted(FIELD_REFS)} resolve without an API server"
                )
            env[name] = fields[str(path)]
        else:
            value = entry.get("value", "")
            # Later entries may refer to earlier ones with $(NAME), as the kubelet expands them.
            env[name] = _expand(str(value), env)
    return tuple(env.items())


def _expand(text: str, env: dict[str, str]) -> str:
    """$(VAR) expansion as the kubelet does it: unknown references stay as written, $$ escapes a $."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(replace, text)


def _mounts(raw: Any, volumes: dict[str, tuple[str, str]], where: str) -> tuple[Mount, ...]:
    if not isinstance(raw, list):
        raise ManifestError(f"{where}: volumeMounts must be a list")
    mounts: list[Mount] = []
    seen: set[str] = set()
    for item in raw:
        entry = _mapping(item, f"{where}: volumeMount")
        vname = entry.get("name")
        if vname not in volumes:
            raise ManifestError(f"{where}: volumeMount refers to volume {vname!r}, which spec.volumes does not define")
        mount_path = entry.get("mountPath")
        if not isinstance(mount_path, str) or not mount_path.startswith("/"):
            raise ManifestError(f"{where}: volumeMount {vname}: mountPath must be absolute")
        mount_path = mount_path.rstrip("/") or "/"
        if mount_path in seen:
            raise ManifestError(f"{where}: mountPath {mount_path} is used twice")
        seen.add(mount_path)
        sub_path = str(entry.get("subPath") or "")
        if sub_path.startswith("/") or ".." in sub_path.split("/"):
            raise ManifestError(f"{where}: volumeMount {vname}: subPath must be relative, without '..'")
        host_path, htype = volumes[str(vname)]
        mounts.append(
            Mount(
                volume=str(vname),
                host_path=host_path,
                mount_path=mount_path,
                read_only=bool(entry.get("readOnly")),
                type=htype,
                sub_path=sub_path,
            )
        )
    return tuple(mounts)


def _probe(raw: Any, container: dict[str, Any], node_address: str, where: str) -> Probe | None:
    if raw is None:
        return None
    raw = _mapping(raw, where)
    kind = next((k for k in ("httpGet", "tcpSocket", "exec", "grpc") if k in raw), None)
    if kind is None:
        raise ManifestError(f"{where}: no probe handler (httpGet, tcpSocket, exec or grpc)")
    action = _mapping(raw[kind], f"{where}.{kind}")
    network = kind in ("httpGet", "tcpSocket")
    return Probe(
        kind=kind,
        # A hostNetwork pod's IP is the node's address: that is where the kubelet sends probes without a host.
        host=str(action.get("host") or node_address),
        port=_probe_port(action.get("port"), container, where) if network else 0,
        path=str(action.get("path") or "/"),
        scheme=str(action.get("scheme") or "HTTP").upper(),
        headers=tuple((str(h["name"]), str(h["value"])) for h in action.get("httpHeaders") or []),
        initial_delay=float(raw.get("initialDelaySeconds", 0)),
        period=float(raw.get("periodSeconds", 10)),
        timeout=float(raw.get("timeoutSeconds", 1)),
        failure_threshold=int(raw.get("failureThreshold", 3)),
        success_threshold=int(raw.get("successThreshold", 1)),
    )


def _probe_port(port: Any, container: dict[str, Any], where: str) -> int:
    if isinstance(port, int) and not isinstance(port, bool):
        return port
    if isinstance(port, str):
        if port.isdigit():
            return int(port)
        for declared in container.get("ports") or []:
            if isinstance(declared, dict) and declared.get("name") == port:
                return int(declared["containerPort"])
    raise ManifestError(f"{where}: port {port!r} is neither a number nor a named container port")
