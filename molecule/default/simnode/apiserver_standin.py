#!/usr/bin/env python3
"""A stand-in for kube-apiserver, run by the node agent for the kube-apiserver static pod, inside that pod's
mounts and with that manifest's own flags.

It does what the apiserver does with encryption at rest up to the point where etcd would be needed: it refuses to
start on a missing or invalid --encryption-provider-config, checks every KMS provider the way the real health
checks do (Status, and Encrypt of a DEK seed when the key_id is new), at load, in the background every 60 s (10 s
while failing) and on health requests, reloads the file when automatic reload is on, and serves /livez, /readyz,
/healthz (anonymous allowed, as system:public-info-viewer) and the individual checks, /version and /metrics (client
certificate of a cluster admin; the envelope-encryption and reload metrics the real one exports) over HTTPS on
<advertise-address>:<secure-port>.
README.md beside this file lists what it does not do."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import encryption_config
from kms_health import EnvelopeMetrics, KmsChecks, Timing, family, get_hash, go_float

log = logging.getLogger("kube-apiserver")

# Files the apiserver reads at start when their flag is given: a wrong mount of /etc/kubernetes/pki fails here.
FILE_FLAGS = (
    "tls-cert-file",
    "tls-private-key-file",
    "client-ca-file",
    "service-account-key-file",
    "service-account-signing-key-file",
    "requestheader-client-ca-file",
    "proxy-client-cert-file",
    "proxy-client-key-file",
    "kubelet-client-certificate",
    "kubelet-client-key",
    "etcd-cafile",
    "etcd-certfile",
    "etcd-keyfile",
)
# Paths anonymous users may GET (the system:public-info-viewer ClusterRole).
PUBLIC_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/version", "/version/"})
# Groups bound to cluster-admin on a kubeadm cluster.
ADMIN_GROUPS = frozenset({"system:masters", "kubeadm:cluster-admins"})
HEALTH_ENDPOINTS = ("healthz", "livez", "readyz")
RELOAD_POLL = 1.0
RELOAD_CONTROLLER = "encryption-provider-config-automatic-reload-controller"
PROCESS_START = time.time()
NEW_CONFIG_HEALTH_WAIT = 10.0  # validateNewTransformersHealth polls a new config's providers this long
_TRUE = {"1", "t", "T", "true", "TRUE", "True"}
_FALSE = {"0", "f", "F", "false", "FALSE", "False"}


class StartupError(Exception):
    pass


def parse_flags(argv: list[str]) -> dict[str, str]:
    """pflag style: --name=value, --name value, or a bare --name (a boolean). Later flags win."""
    flags: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise StartupError(f"unexpected argument {arg!r}")
        name, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            else:
                value = "true"
        flags[name] = value
        i += 1
    return flags


def parse_bool(flags: dict[str, str], name: str, default: bool = False) -> bool:
    value = flags.get(name)
    if value is None:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise StartupError(
        f'invalid argument "{value}" for "--{name}" flag: strconv.ParseBool: parsing "{value}": invalid syntax'
    )


def feature_gates(flags: dict[str, str]) -> dict[str, bool]:
    gates: dict[str, bool] = {}
    for item in filter(None, flags.get("feature-gates", "").split(",")):
        name, _, value = item.partition("=")
        gates[name.strip()] = value.strip() in _TRUE
    return gates


def apiserver_identity(hostname: str) -> str:
    """The apiserver's identity (its Lease name in kube-system), from server.NewConfig with APIServerIdentity on
    (the default since 1.26): "apiserver-" + base32 of the first 16 bytes of SHA-256 over the hostname and
    "kube-apiserver", each prefixed with its 16-bit length (cryptobyte)."""
    data = b"".join(len(part).to_bytes(2, "big") + part for part in (hostname.encode(), b"kube-apiserver"))
    digest = hashlib.sha256(data).digest()[:16]
    return "apiserver-" + base64.b32encode(digest).decode().rstrip("=").lower()


def node_hostname() -> str:
    """What os.Hostname() gives the apiserver of a node (its pod has the host's network, so the node's hostname).
    The simulated nodes share this machine's hostname, so the node name the agent puts in HOSTNAME stands for it:
    each node's stand-in gets an identity of its own, the same across its restarts."""
    return os.environ.get("HOSTNAME") or socket.gethostname()


@dataclass
class ReloadMetrics:
    """encryptionconfig/metrics: a series appears with the first reload of its status, as a Go vector's child."""

    counts: dict[str, int] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)

    def record(self, status: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1
        self.last[status] = time.time()


class StandIn:
    """The state the HTTP handlers read: the active encryption config's checks, swapped whole on reload."""

    def __init__(self, flags: dict[str, str]) -> None:
        self.flags = flags
        self.reload = parse_bool(flags, "encryption-provider-config-automatic-reload")
        self.anonymous = parse_bool(flags, "anonymous-auth", default=True)
        self.config_path = flags.get("encryption-provider-config", "")
        self.kms_v1 = feature_gates(flags).get("KMSv1", False)
        self.metrics = ReloadMetrics()
        self.image = os.environ.get("SIMNODE_IMAGE", "")
        self.apiserver_id = apiserver_identity(node_hostname())
        self.envelope_metrics = EnvelopeMetrics(self.apiserver_id)
        try:
            self.timing = Timing.from_env()
        except ValueError as err:
            raise StartupError(str(err)) from err
        if self.timing.scale != 1:
            log.warning(
                "test knob: KMS poll intervals %gs/%gs and health TTLs %gs/%gs (scaled by %g; the real apiserver's "
                "are 60s/10s and 20s/3s)",
                self.timing.positive_interval,
                self.timing.negative_interval,
                self.timing.positive_ttl,
                self.timing.negative_ttl,
                self.timing.scale,
            )
        self.checks = KmsChecks(None, False)
        self._stop = threading.Event()

    def start_checks(self) -> None:
        """Load the encryption config (exits on error, as the real one does) and prime the KMS probes."""
        if self.reload and not self.config_path:
            raise StartupError(
                "--encryption-provider-config-automatic-reload must be set with --encryption-provider-config"
            )
        if not self.config_path:
            log.info("no --encryption-provider-config: resources are stored unencrypted")
            return
        try:
            config = encryption_config.load(self.config_path, self.reload, self.kms_v1)
        except encryption_config.ConfigError as err:
            raise StartupError(str(err)) from err
        log.info("apiserver identity %s (apiserver_id_hash %s)", self.apiserver_id, get_hash(self.apiserver_id))
        checks = self._new_checks(config, self.reload)
        # Each KMS v2 probe is primed inline, then polled in the background; the server starts even when the
        # plugin is not up yet.
        checks.prime()
        self._adopt(config, checks)

    def _new_checks(self, config: encryption_config.EncryptionConfig, reload: bool) -> KmsChecks:
        return KmsChecks(config, reload, self.envelope_metrics, self.timing)

    def _adopt(self, config: encryption_config.EncryptionConfig, checks: KmsChecks) -> None:
        for warning in config.warnings:
            log.warning("%s", warning)
        for line in config.summary:
            log.info("encryption config %s: %s", config.path, line)
        old, self.checks = self.checks, checks
        # The replaced providers are closed after their grace period (DynamicTransformers.Set); their polls end then.
        closer = threading.Timer(old.close_grace_period, old.stop)
        closer.daemon = True
        closer.start()

    def watch_config(self) -> None:
        """--encryption-provider-config-automatic-reload: apply a changed file once it is valid and its KMS
        providers are healthy; until then keep the old one (and count a reload failure, as the real metric)."""
        assert self.checks.config is not None
        failed_digest, retry_at = "", 0.0
        while not self._stop.wait(RELOAD_POLL):
            try:
                data = Path(self.config_path).read_bytes()
            except OSError as err:
                data, digest = b"", f"unreadable: {err}"
            else:
                digest = hashlib.sha256(data).hexdigest()
            if digest == self.checks.config.digest or (digest == failed_digest and time.monotonic() < retry_at):
                continue
            error = self._try_reload()
            if error:
                log.error("error processing encryption config file %s: %s", self.config_path, error)
                self.metrics.record("failure")
                failed_digest, retry_at = digest, time.monotonic() + 5
            else:
                log.info("Loaded new kms encryption config content name=%s", RELOAD_CONTROLLER)
                self.metrics.record("success")
                failed_digest = ""

    def _try_reload(self) -> str | None:
        try:
            config = encryption_config.load(self.config_path, True, self.kms_v1)
        except encryption_config.ConfigError as err:
            return str(err)
        if self.checks.config is not None and config.digest == self.checks.config.digest:
            return None
        candidate = self._new_checks(config, True)
        candidate.prime()  # LoadEncryptionConfig primes and starts polling the new providers at once
        deadline = time.monotonic() + NEW_CONFIG_HEALTH_WAIT
        while True:
            error = candidate.run("kms-providers")
            if error is None:
                break
            if time.monotonic() >= deadline or self._stop.is_set():
                candidate.stop()  # a refused config's providers are closed at once
                return f"health check for new transformers failed: {error}"
            time.sleep(0.5)
        self._adopt(config, candidate)
        return None

    def stop(self) -> None:
        """Shutdown: the reload watch and every KMS poll end (a check under way ends within its timeout)."""
        self._stop.set()
        self.checks.stop()

    def join(self) -> None:
        self.checks.join(max((p.provider.timeout for p in self.checks.probes), default=0.0) + 1.0)

    # -- what the handlers ask -----------------------------------------------------------------------------
    def check_names(self, endpoint: str) -> list[str]:
        names = ["ping", "log"]
        if endpoint != "livez":  # KMS checks are added to healthz and readyz only
            names += self.checks.names()
        return names

    def run_check(self, name: str) -> str | None:
        if name in ("ping", "log"):
            return None
        return self.checks.run(name)

    def version(self) -> dict[str, str]:
        tag = self.image.rsplit(":", 1)[1] if ":" in self.image.rsplit("/", 1)[-1] else "v0.0.0-unknown"
        match = re.match(r"v(\d+)\.(\d+)", tag)
        major, minor = match.groups() if match else ("", "")
        return {
            "major": major,
            "minor": minor,
            "gitVersion": tag,
            "gitCommit": "simnode-apiserver-standin",
            "gitTreeState": "clean",
            "goVersion": "none (python stand-in)",
            "compiler": "none",
            "platform": "linux/amd64",
        }

    def metrics_text(self) -> str:
        """The families the real apiserver would show here, sorted by name as the Go registry does, each only once
        it has a series."""
        lines: list[str] = []
        identity = f'apiserver_id_hash="{get_hash(self.apiserver_id)}"'
        if self.metrics.last:
            lines += family(
                "apiserver_encryption_config_controller_automatic_reload_last_timestamp_seconds",
                "[ALPHA] Timestamp of the last successful or failed automatic reload of encryption configuration "
                "split by apiserver identity.",
                "gauge",
                [
                    (f'{identity},status="{status}"', go_float(stamp))
                    for status, stamp in sorted(self.metrics.last.items())
                ],
            )
        if self.metrics.counts:
            lines += family(
                "apiserver_encryption_config_controller_automatic_reloads_total",
                "[ALPHA] Total number of reload successes and failures of encryption configuration split by apiserver "
                "identity.",
                "counter",
                [
                    (f'{identity},status="{status}"', str(count))
                    for status, count in sorted(self.metrics.counts.items())
                ],
            )
        lines += self.envelope_metrics.lines()
        # The Go process collector's gauge: how a client tells that the apiserver restarted after a change.
        lines += family(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            "gauge",
            [("", go_float(PROCESS_START))],
        )
        return "\n".join(lines) + "\n"


class Handler(BaseHTTPRequestHandler):
    server: TLSServer
    protocol_version = "HTTP/1.1"
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _identity(self) -> tuple[str, set[str]] | None:
        """(user, groups) from a client certificate the client CA verified; None for anonymous."""
        cert = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        if not cert:
            return None
        user, groups = "", set[str]()
        subject = cast(tuple[tuple[tuple[str, str], ...], ...], cert.get("subject", ()))
        for rdn in subject:
            for key, value in rdn:
                if key == "commonName":
                    user = value
                elif key == "organizationName":
                    groups.add(value)
        return user, groups

    def _send(self, code: int, body: str, content_type: str = "text/plain; charset=utf-8") -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "details": {},
            "code": code,
        }
        self._send(code, json.dumps(body) + "\n", "application/json")

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query, keep_blank_values=True)
        identity = self._identity()
        if identity is None and not self.server.standin.anonymous:
            self._status(401, "Unauthorized", "Unauthorized")
            return
        user, groups = identity if identity else ("system:anonymous", {"system:unauthenticated"})
        if path not in PUBLIC_PATHS and not (groups & ADMIN_GROUPS):
            self._status(403, "Forbidden", f'forbidden: User "{user}" cannot get path "{path}"')
            return
        parts = path.strip("/").split("/")
        if parts[0] in HEALTH_ENDPOINTS and len(parts) <= 2:
            self._health(parts[0], parts[1] if len(parts) == 2 else None, query)
        elif path in ("/version", "/version/"):
            self._send(200, json.dumps(self.server.standin.version(), indent=2) + "\n", "application/json")
        elif path == "/metrics":
            self._send(200, self.server.standin.metrics_text(), "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._status(404, "NotFound", "the server could not find the requested resource")

    def _health(self, endpoint: str, check: str | None, query: dict[str, list[str]]) -> None:
        standin = self.server.standin
        names = standin.check_names(endpoint)
        if check is not None:
            if check not in names:
                self._send(404, "404 page not found\n")
                return
            error = standin.run_check(check)
            if error:
                self._send(500, f"internal server error: {error}\n")
            else:
                self._send(200, "ok")
            return
        excluded = {name for value in query.get("exclude", []) for name in value.split(",") if name}
        lines, failed, details = [], [], []
        for name in names:
            if name in excluded:
                lines.append(f"[+]{name} excluded: ok")
                continue
            error = standin.run_check(name)
            if error:
                # The public endpoint withholds the reason; the log has it (as healthz.go does).
                lines.append(f"[-]{name} failed: reason withheld")
                details.append(f"[-]{name} failed: {error}")
                failed.append(name)
            else:
                lines.append(f"[+]{name} ok")
        if failed:
            log.info("%s check failed: %s\n%s", endpoint, ",".join(failed), "\n".join(details))
            self._send(500, "\n".join(lines) + f"\n{endpoint} check failed\n")
        elif "verbose" in query:
            self._send(200, "\n".join(lines) + f"\n{endpoint} check passed\n")
        else:
            self._send(200, "ok")


class TLSServer(ThreadingHTTPServer):
    """HTTPS with the handshake in the request's own thread, so a slow client never blocks accept()."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext, standin: StandIn) -> None:
        self.context = context
        self.standin = standin
        super().__init__(address, Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(10)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as err:
            log.info("http: TLS handshake error from %s:%s: %s", client_address[0], client_address[1], err)
            return
        try:
            Handler(tls, client_address, self)
        finally:
            tls.close()


def tls_context(flags: dict[str, str]) -> ssl.SSLContext:
    cert, key = flags.get("tls-cert-file"), flags.get("tls-private-key-file")
    if not cert or not key:
        raise StartupError("this stand-in needs --tls-cert-file and --tls-private-key-file (kubeadm always sets them)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        raise StartupError(f"failed to load serving certificate {cert} / key {key}: {err}") from err
    client_ca = flags.get("client-ca-file")
    if client_ca:
        try:
            context.load_verify_locations(client_ca)
        except (OSError, ssl.SSLError) as err:
            raise StartupError(f"unable to load client CA file {client_ca!r}: {err}") from err
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def check_files(flags: dict[str, str]) -> None:
    for name in FILE_FLAGS:
        path = flags.get(name)
        if path and not os.access(path, os.R_OK):
            reason = "no such file or directory" if not os.path.exists(path) else "permission denied"
            raise StartupError(f"--{name}: open {path}: {reason}")


def listen_address(flags: dict[str, str]) -> tuple[str, int]:
    """The real server binds --bind-address (default 0.0.0.0); three simulated nodes share this machine's network,
    so the stand-in binds the node's own address instead of every address."""
    bind = flags.get("bind-address", "")
    host = bind if bind not in ("", "0.0.0.0", "::") else flags.get("advertise-address", "")  # noqa: S104
    if not host:
        raise StartupError(
            "this stand-in needs --advertise-address (or a specific --bind-address) to know where to listen"
        )
    try:
        port = int(flags.get("secure-port", "6443"))
    except ValueError as err:
        raise StartupError(f"invalid --secure-port {flags.get('secure-port')!r}") from err
    return host, port


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(levelname).1s%(asctime)s %(process)d apiserver-standin] %(message)s",
        datefmt="%m%d %H:%M:%S",
    )
    try:
        flags = parse_flags(sys.argv[1:] if argv is None else argv)
        if not flags.get("etcd-servers"):
            raise StartupError("--etcd-servers must be specified")
        check_files(flags)
        context = tls_context(flags)
        address = listen_address(flags)
        standin = StandIn(flags)
        log.info("Version: %s (stand-in for %s)", standin.version()["gitVersion"], standin.image or "an unknown image")
        standin.start_checks()
        server = TLSServer(address, context, standin)
    except (StartupError, OSError) as err:
        print(
            f'E{time.strftime("%m%d %H:%M:%S")} {os.getpid()} run.go:72] "command failed" err="{err}"', file=sys.stderr
        )
        return 1

    def on_term(signum: int, _frame: Any) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        standin.stop()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    if standin.reload and standin.checks.config is not None:
        threading.Thread(target=standin.watch_config, name="encryption-config-reload", daemon=True).start()
    log.info("Serving securely on %s", f"{address[0]}:{address[1]}")
    server.serve_forever(poll_interval=0.2)
    server.server_close()
    standin.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
