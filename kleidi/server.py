"""The gRPC server: KMS v2 and v1beta1 on one unix socket, its lifecycle and signals."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from types import FrameType
from typing import Any, TypeVar

import grpc

from kleidi import __version__, contract, unixsocket
from kleidi.api import v1beta1_pb2, v1beta1_pb2_grpc, v2_pb2, v2_pb2_grpc
from kleidi.config import Config
from kleidi.errors import ConfigError, InvalidInput, KleidiError
from kleidi.health import HealthMonitor
from kleidi.observability import Metrics, ProbeServer
from kleidi.providers import build
from kleidi.providers.base import Provider

log = logging.getLogger("kleidi.server")

# Data keys are 32 bytes for KMS v2; KMS v1 DEKs are small too. Anything bigger is not a data key.
_MAX_PLAINTEXT = 4096

T = TypeVar("T")


class _Call:
    """Runs one RPC: deadline, metrics, the error-to-status mapping and the request log line."""

    def __init__(self, metrics: Metrics, health: HealthMonitor, api: str) -> None:
        self._metrics = metrics
        self._health = health
        self._api = api
        self._latency = {m: metrics.request_seconds.labels(api, m) for m in ("Encrypt", "Decrypt", "Status", "Version")}

    def run(self, method: str, uid: str, context: grpc.ServicerContext, body: Callable[[float | None], T]) -> T:
        started = time.perf_counter()
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        code = grpc.StatusCode.OK
        try:
            return body(deadline)
        except KleidiError as exc:
            code = exc.code
            log.warning(
                "request failed",
                extra={"api": self._api, "method": method, "uid": uid, "error": exc.kind, "reason": str(exc)},
            )
            if code == grpc.StatusCode.UNAVAILABLE:
                self._health.poke()
            context.abort(code, str(exc))
            raise AssertionError("unreachable") from None  # abort() always raises
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.error("request crashed", exc_info=True, extra={"api": self._api, "method": method, "uid": uid})
            context.abort(code, "internal error; see the plugin log")
            raise AssertionError("unreachable") from None
        finally:
            elapsed = time.perf_counter() - started
            self._latency[method].observe(elapsed)
            self._metrics.requests.labels(self._api, method, code.name).inc()
            # One line per request only at debug: KMS v2 calls are rare in real life, but a decrypt burst
            # after an apiserver restart should not be slowed down by logging.
            if code == grpc.StatusCode.OK and log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "request", extra={"api": self._api, "method": method, "uid": uid, "ms": round(elapsed * 1000, 3)}
                )


def _check_plaintext(plaintext: bytes) -> None:
    if not plaintext:
        raise InvalidInput("plaintext is empty")
    if len(plaintext) > _MAX_PLAINTEXT:
        raise InvalidInput(f"plaintext is {len(plaintext)} bytes; data keys are at most {_MAX_PLAINTEXT}")


def _check_ciphertext(ciphertext: bytes) -> None:
    if not ciphertext:
        raise InvalidInput("ciphertext is empty")


class KmsV2Servicer(v2_pb2_grpc.KeyManagementServiceServicer):
    """v2.KeyManagementService: Status from the cached health state; Encrypt/Decrypt through the provider."""

    def __init__(self, provider: Provider, health: HealthMonitor, metrics: Metrics) -> None:
        self._provider = provider
        self._health = health
        self._call = _Call(metrics, health, contract.KMS_V2)
        self._status_for: Any = None
        self._status: v2_pb2.StatusResponse = v2_pb2.StatusResponse()

    def Status(self, request: v2_pb2.StatusRequest, context: grpc.ServicerContext) -> v2_pb2.StatusResponse:
        state = self._health.state
        if state is not self._status_for:  # rebuilt only when the health loop publishes a new state
            self._status = v2_pb2.StatusResponse(version=contract.KMS_V2, healthz=state.reason, key_id=state.key_id)
            self._status_for = state
        return self._status

    def Encrypt(self, request: v2_pb2.EncryptRequest, context: grpc.ServicerContext) -> v2_pb2.EncryptResponse:
        def body(deadline: float | None) -> v2_pb2.EncryptResponse:
            _check_plaintext(request.plaintext)
            wrapped = self._provider.encrypt(request.plaintext, request.uid, deadline)
            problems = (
                contract.ciphertext_problems(wrapped.ciphertext)
                + contract.key_id_problems(wrapped.key_id)
                + contract.annotation_problems(wrapped.annotations)
            )
            if problems:  # a provider bug; the apiserver would reject the answer anyway
                raise KleidiError("provider answer breaks the KMS contract: " + "; ".join(problems))
            return v2_pb2.EncryptResponse(
                ciphertext=wrapped.ciphertext, key_id=wrapped.key_id, annotations=dict(wrapped.annotations)
            )

        return self._call.run("Encrypt", request.uid, context, body)

    def Decrypt(self, request: v2_pb2.DecryptRequest, context: grpc.ServicerContext) -> v2_pb2.DecryptResponse:
        def body(deadline: float | None) -> v2_pb2.DecryptResponse:
            _check_ciphertext(request.ciphertext)
            annotations: Mapping[str, bytes] = request.annotations
            if annotations:
                problems = contract.annotation_problems(annotations)
                if problems:
                    raise InvalidInput("; ".join(problems))
            plaintext = self._provider.decrypt(request.ciphertext, request.key_id, annotations, request.uid, deadline)
            return v2_pb2.DecryptResponse(plaintext=plaintext)

        return self._call.run("Decrypt", request.uid, context, body)


class KmsV1Servicer(v1beta1_pb2_grpc.KeyManagementServiceServicer):
    """v1beta1.KeyManagementService, for clusters migrating off KMS v1 plugins."""

    def __init__(self, provider: Provider, health: HealthMonitor, metrics: Metrics) -> None:
        self._provider = provider
        self._call = _Call(metrics, health, contract.KMS_V1)
        self._version = v1beta1_pb2.VersionResponse(
            version=contract.KMS_V1, runtime_name="kleidi", runtime_version=__version__
        )

    def Version(self, request: v1beta1_pb2.VersionRequest, context: grpc.ServicerContext) -> Any:
        return self._version

    def Encrypt(self, request: v1beta1_pb2.EncryptRequest, context: grpc.ServicerContext) -> Any:
        def body(deadline: float | None) -> v1beta1_pb2.EncryptResponse:
            _check_plaintext(request.plain)
            wrapped = self._provider.encrypt(request.plain, "", deadline)
            return v1beta1_pb2.EncryptResponse(cipher=wrapped.ciphertext)

        return self._call.run("Encrypt", "", context, body)

    def Decrypt(self, request: v1beta1_pb2.DecryptRequest, context: grpc.ServicerContext) -> Any:
        def body(deadline: float | None) -> v1beta1_pb2.DecryptResponse:
            _check_ciphertext(request.cipher)
            return v1beta1_pb2.DecryptResponse(plain=self._provider.decrypt(request.cipher, "", {}, "", deadline))

        return self._call.run("Decrypt", "", context, body)


class KleidiServer:
    """The plugin process: provider, health loop, probes and the gRPC server on the unix socket."""

    def __init__(self, config: Config, provider: Provider | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.provider = provider if provider is not None else build(config, self.metrics)
        self.health = HealthMonitor(self.provider, config.health_interval, self.metrics)
        self._grpc: grpc.Server | None = None
        self._probes: ProbeServer | None = None
        self._inode = 0
        self._stopped = threading.Event()

    def start(self) -> None:
        cfg = self.config
        path = cfg.socket_path
        unixsocket.prepare(path)
        gid = unixsocket.group_id(cfg.socket_group)
        address = cfg.metrics_address
        if address is not None:
            try:
                self._probes = ProbeServer(address[0], address[1], self.metrics, self._probe_health)
            except OSError as exc:
                raise ConfigError(f"metrics_listen: cannot listen on {cfg.metrics_listen}: {exc.strerror}") from None
            self._probes.start()
        self.health.start()
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="kleidi-rpc"),
            options=[
                ("grpc.max_receive_message_length", cfg.max_request_bytes),
                ("grpc.max_send_message_length", cfg.max_request_bytes),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=cfg.workers * 16,
        )
        v2_pb2_grpc.add_KeyManagementServiceServicer_to_server(  # type: ignore[no-untyped-call]
            KmsV2Servicer(self.provider, self.health, self.metrics), server
        )
        v1beta1_pb2_grpc.add_KeyManagementServiceServicer_to_server(  # type: ignore[no-untyped-call]
            KmsV1Servicer(self.provider, self.health, self.metrics), server
        )
        # The socket must never exist with a wider mode than configured, not even for an instant.
        old_umask = os.umask(0o177)
        try:
            server.add_insecure_port(f"unix:{path}")
            server.start()
            self._grpc = server
        finally:
            os.umask(old_umask)
        self._inode = os.lstat(path).st_ino
        unixsocket.secure(path, cfg.socket_mode, gid)
        log.info(
            "serving",
            extra={
                "socket": path,
                "provider": self.provider.name,
                "version": __version__,
                "metrics": "{}:{}".format(*self._probes.address) if self._probes is not None else "disabled",
            },
        )

    def _probe_health(self) -> tuple[bool, str]:
        state = self.health.state
        return state.ok, state.reason

    @property
    def probe_address(self) -> tuple[str, int] | None:
        return self._probes.address if self._probes is not None else None

    def stop(self) -> None:
        """Drain in-flight calls (up to shutdown_grace), then remove the socket and release the backend."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._grpc is not None:
            self._grpc.stop(self.config.shutdown_grace).wait()
            unixsocket.remove(self.config.socket_path, self._inode)
        if self._probes is not None:
            self._probes.stop()
        self.health.stop()
        self.provider.close()
        log.info("stopped")


def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT."""
    server = KleidiServer(config)
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal received; draining", extra={"signal": signal.Signals(signum).name})
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except BaseException:
        server.stop()  # whatever did start (probes, health loop, the backend) must not keep the process alive
        raise
    # Give the first health check a moment so the apiserver's first Status is already truthful.
    server.health.wait_first(min(config.health_interval, 3.0))
    try:
        while not done.wait(3600):
            pass
    finally:
        server.stop()
