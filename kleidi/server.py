"""The plugin process: its gRPC servers (KMS v2 and v1beta1 on one unix socket), probes, health loop, lifecycle
and signals. What a call does once it arrives is in kleidi/rpc.py."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from types import FrameType
from typing import TYPE_CHECKING

import grpc

from kleidi import __version__, contract, unixsocket
from kleidi.api import v1beta1_pb2_grpc, v2_pb2_grpc
from kleidi.config import Config
from kleidi.errors import ConfigError, KleidiError
from kleidi.health import HealthMonitor
from kleidi.observability import Metrics, ProbeServer
from kleidi.providers import build
from kleidi.providers.base import FastPath, Provider, fast_path
from kleidi.rpc import Call, KeyServerServicer, KmsV1Servicer, KmsV2Servicer

if TYPE_CHECKING:
    from kleidi.remote_server import RemoteFront

log = logging.getLogger("kleidi.server")

# How often, at most, the socket's presence is checked (health_interval when that is shorter).
_SOCKET_CHECK = 5.0


async def _close_fast(fast: FastPath) -> None:
    fast.close_fast()
    await asyncio.sleep(0)  # let the transports run their close callbacks


async def _stop_all(servers: list[grpc.aio.Server], grace: float) -> None:
    await asyncio.gather(*(server.stop(grace) for server in servers))


class KleidiServer:
    """The plugin process: provider, health loop, probes and the gRPC server on the unix socket."""

    def __init__(self, config: Config, provider: Provider | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.provider = provider if provider is not None else build(config, self.metrics)
        self.health = HealthMonitor(self.provider, config.health_interval, self.metrics, config.health_timeout)
        # The gRPC servers: one per time the socket was bound. A server whose socket was removed keeps serving the
        # connections it has (an apiserver's stay open), so it is stopped only with the plugin.
        self._grpc: list[grpc.aio.Server] = []
        self._probes: ProbeServer | None = None
        self._pool: futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._inode = 0
        self._stopped = threading.Event()
        self._servicers: tuple[KmsV2Servicer, KmsV1Servicer] | None = None
        self._watchdog: threading.Thread | None = None
        self._binding = threading.Lock()  # a re-bind and stop() never interleave
        # Until start() has every listener up (the probes come first), readiness says so: a key server must not
        # look ready before its serve_remote port listens.
        self._socket_problem: str | None = "starting"
        self._remote: RemoteFront | None = None
        self._remote_grpc: grpc.aio.Server | None = None

    def start(self) -> None:
        cfg = self.config
        path = cfg.socket_path
        if cfg.serve_remote is not None:
            from kleidi.remote_server import RemoteFront

            # First: a certificate file that is missing or bad stops the start before anything listens.
            self._remote = RemoteFront(cfg.serve_remote, self.metrics)
        gid = unixsocket.group_id(cfg.socket_group)
        unixsocket.prepare(path, gid)
        address = cfg.metrics_address
        if address is not None:
            try:
                self._probes = ProbeServer(address[0], address[1], self.metrics, self._probe_health)
            except OSError as exc:
                raise ConfigError(f"metrics_listen: cannot listen on {cfg.metrics_listen}: {exc.strerror}") from None
            self._probes.start()
        self.health.start()
        self._pool = futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="kleidi-backend")
        self._servicers = (  # shared by every gRPC server bound to the socket (a re-created socket gets a new one)
            KmsV2Servicer(self.provider, self.health, self._new_call(contract.KMS_V2, self._pool)),
            KmsV1Servicer(self.provider, self._new_call(contract.KMS_V1, self._pool)),
        )
        # gRPC runs on an asyncio loop of its own thread; the caller keeps a plain blocking API (start/stop).
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="kleidi-grpc", daemon=True)
        self._loop_thread.start()
        self._grpc.append(self._bind(path, gid))
        self._watchdog = threading.Thread(target=self._watch_socket, args=(gid,), name="kleidi-socket", daemon=True)
        self._watchdog.start()
        if self._remote is not None:
            self._start_remote(self._remote, self._pool)
        self._socket_problem = None
        log.info(
            "serving",
            extra={
                "socket": path,
                "provider": self.provider.name,
                "version": __version__,
                "metrics": "{}:{}".format(*self._probes.address) if self._probes is not None else "disabled",
                "remote": cfg.serve_remote.listen if cfg.serve_remote is not None else "disabled",
            },
        )

    def _start_remote(self, remote: RemoteFront, pool: futures.ThreadPoolExecutor) -> None:
        """The key server: its gRPC server on a private unix socket, then the mutual TLS listener in front."""
        from kleidi.remote_server import add_servicer, grpc_options

        assert self._loop is not None
        servicer = KeyServerServicer(self.provider, self.health, self._new_call("remote", pool))
        path = remote.make_socket_dir(os.path.dirname(self.config.socket_path))
        self._remote_grpc = asyncio.run_coroutine_threadsafe(
            self._start_grpc(path, lambda server: add_servicer(servicer, server), grpc_options()), self._loop
        ).result(30)
        remote.start()

    def _bind(self, path: str, gid: int | None) -> grpc.aio.Server:
        """A gRPC server listening on ``path`` (prepared first), with the configured mode and group."""
        assert self._loop is not None
        # The socket must never exist with a wider mode than configured, not even for an instant.
        old_umask = os.umask(0o177)
        try:
            server = asyncio.run_coroutine_threadsafe(self._start_grpc(path, self._add_kms), self._loop).result(30)
        finally:
            os.umask(old_umask)
        self._inode = os.lstat(path).st_ino
        unixsocket.secure(path, self.config.socket_mode, gid)
        return server

    def _watch_socket(self, gid: int | None) -> None:
        """The socket, or its directory, removed under a running plugin: no new connection can reach it.
        Readiness says so within one health interval (at most _SOCKET_CHECK), and the socket is made again on a
        new gRPC server, while the old one keeps serving the connections it has (an apiserver's stay open). An
        apiserver that bind-mounted the removed directory sees only the old, empty one: to connect again, it
        must be restarted (docs/operations.md)."""
        path = self.config.socket_path
        every = min(self.config.health_interval, _SOCKET_CHECK)
        while not self._stopped.wait(every):
            if unixsocket.is_ours(path, self._inode):
                continue
            if self._socket_problem is None:
                log.warning(
                    "socket gone: no new connection can reach the plugin; re-creating it", extra={"socket": path}
                )
                self._socket_problem = f"socket {path} is gone; re-creating it"
            try:
                unixsocket.prepare(path, gid)
                with self._binding:
                    if self._stopped.is_set():
                        return
                    self._grpc.append(self._bind(path, gid))
            except (KleidiError, OSError) as exc:
                problem = f"socket {path} is gone and cannot be re-created: {exc}"
                if problem != self._socket_problem:
                    log.error("cannot re-create the socket", extra={"socket": path, "reason": str(exc)})
                    self._socket_problem = problem
                continue
            self._socket_problem = None
            log.warning(
                "socket re-created; an apiserver that mounted the removed directory must be restarted to reach it",
                extra={"socket": path},
            )

    def _add_kms(self, server: grpc.aio.Server) -> None:
        assert self._servicers is not None
        v2, v1 = self._servicers
        v2_pb2_grpc.add_KeyManagementServiceServicer_to_server(v2, server)  # type: ignore[no-untyped-call]
        v1beta1_pb2_grpc.add_KeyManagementServiceServicer_to_server(v1, server)  # type: ignore[no-untyped-call]

    async def _start_grpc(
        self, path: str, add: Callable[[grpc.aio.Server], None], options: Sequence[tuple[str, int]] = ()
    ) -> grpc.aio.Server:
        cfg = self.config
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.max_request_bytes),
                ("grpc.max_send_message_length", cfg.max_request_bytes),
                ("grpc.so_reuseport", 0),
                *options,
            ],
        )
        add(server)
        try:
            server.add_insecure_port(f"unix:{path}")
        except RuntimeError as exc:  # grpc reports a failed bind this way, with no errno
            raise ConfigError(f"listen: cannot bind {path}: {exc}") from None
        await server.start()
        return server

    def _new_call(self, api: str, pool: futures.ThreadPoolExecutor) -> Call:
        return Call(self.metrics, self.health, api, pool, self.provider)

    def _probe_health(self) -> tuple[bool, str]:
        problem = self._socket_problem  # "starting", or the socket is gone
        if problem is not None:
            return False, problem
        state = self.health.state
        return state.ok, state.reason

    def stop(self) -> None:
        """Drain in-flight calls (up to shutdown_grace), then remove the socket and release the backend."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._watchdog is not None:
            self._watchdog.join(40)  # it checks _stopped before and after any re-bind, which takes at most 30 s
        remote = self._remote
        if remote is not None:
            remote.close_listener()  # no new proxy-mode connection; the open ones drain with the gRPC servers
        loop = self._loop
        if loop is not None:
            servers = self._grpc + ([self._remote_grpc] if self._remote_grpc is not None else [])
            if servers:
                grace = self.config.shutdown_grace
                asyncio.run_coroutine_threadsafe(_stop_all(servers, grace), loop).result(grace + 10)
            if self._grpc:
                unixsocket.remove(self.config.socket_path, self._inode)
            fast = fast_path(self.provider)
            if fast is not None:  # its connections belong to the loop: close them there, while it still runs
                asyncio.run_coroutine_threadsafe(_close_fast(fast), loop).result(5)
            loop.call_soon_threadsafe(loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(10)
            if not loop.is_running():
                loop.close()
        if remote is not None:
            remote.stop()  # what the drain left open is closed; the private socket directory is removed
        self.health.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._probes is not None:
            self._probes.stop()
        self.provider.close()  # a call still running on a worker finishes; none can reconnect after this
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
