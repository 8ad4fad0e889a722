"""The gRPC server: KMS v2 and v1beta1 on one unix socket, its lifecycle and signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent import futures
from types import FrameType
from typing import Any, TypeVar

import grpc

from kleidi import __version__, contract, unixsocket
from kleidi.api import v1beta1_pb2, v1beta1_pb2_grpc, v2_pb2, v2_pb2_grpc
from kleidi.config import Config
from kleidi.errors import ConfigError, DeadlinePassed, InvalidInput, KleidiError, WouldBlock
from kleidi.health import HealthMonitor
from kleidi.observability import Metrics, ProbeServer
from kleidi.providers import build
from kleidi.providers.base import INLINE, FastPath, Provider, Wrapped, fast_path

log = logging.getLogger("kleidi.server")

# Data keys are 32 bytes (KMS v2 seeds, KMS v1 DEKs). The limit leaves every provider's wrapped form under
# the apiserver's 1 kB ciphertext limit, so an oversized request is the caller's error, not a broken answer.
_MAX_PLAINTEXT = 512
# How often, at most, the socket's presence is checked (health_interval when that is shorter).
_SOCKET_CHECK = 5.0

T = TypeVar("T")


class _Call:
    """Runs one RPC: deadline, metrics, the error-to-status mapping and the request log line.

    The backend work runs on the worker pool, so a slow or hung backend never delays Status or other
    callers' RPCs; only a provider that is ``inline_safe`` (microsecond calls that cannot block) runs on
    the loop itself, which saves the two thread wake-ups of the hop."""

    def __init__(
        self,
        metrics: Metrics,
        health: HealthMonitor,
        api: str,
        pool: futures.ThreadPoolExecutor,
        provider: Provider,
    ) -> None:
        self._provider = provider
        self._metrics = metrics
        self._health = health
        self._api = api
        self._pool = pool
        self._latency = {m: metrics.request_seconds.labels(api, m) for m in ("Encrypt", "Decrypt")}
        self._ok = {m: metrics.requests.labels(api, m, "OK") for m in ("Encrypt", "Decrypt")}

    async def run(
        self,
        method: str,
        uid: str,
        context: grpc.aio.ServicerContext,
        body: Callable[[float | None], T],
        fast: Callable[[float | None], Awaitable[T | None]] | None = None,
    ) -> T:
        """``body`` does the work on a worker thread (or inline, for an inline-safe provider); ``fast``, when
        given, is tried first on the loop and answers None to fall back to ``body``."""
        started = time.perf_counter()
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        code = grpc.StatusCode.OK
        try:
            if fast is not None:
                answer = await fast(deadline)
                if answer is not None:
                    return answer
            if self._provider.inline_safe:  # asked per call: the provider may say no while busy or reconnecting
                token = INLINE.set(True)
                try:
                    return body(deadline)
                except WouldBlock:
                    pass  # it would have waited (no free session, a reconnect): a worker does it instead
                finally:
                    INLINE.reset(token)
            return await _offload(self._pool, body, deadline)
        except KleidiError as exc:
            code = exc.code
            # A request that expired in the queue says the plugin is overloaded, not that the backend failed:
            # no health check is forced, and one line per request would only flood the log.
            overloaded = isinstance(exc, DeadlinePassed)
            log.log(
                logging.DEBUG if overloaded else logging.WARNING,
                "request failed",
                extra={"api": self._api, "method": method, "uid": uid, "error": exc.kind, "reason": str(exc)},
            )
            if code == grpc.StatusCode.UNAVAILABLE and not overloaded:
                self._health.poke()
            await context.abort(code, str(exc))
            raise AssertionError("unreachable") from None  # abort() always raises
        except asyncio.CancelledError:  # the caller's deadline passed or it went away
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.error("request crashed", exc_info=True, extra={"api": self._api, "method": method, "uid": uid})
            await context.abort(code, "internal error; see the plugin log")
            raise AssertionError("unreachable") from None
        finally:
            elapsed = time.perf_counter() - started
            self._latency[method].observe(elapsed)
            if code == grpc.StatusCode.OK:
                self._ok[method].inc()
            else:
                self._metrics.requests.labels(self._api, method, code.name).inc()
            # One line per request only at debug: KMS v2 calls are rare in real life, but a decrypt burst
            # after an apiserver restart should not be slowed down by logging.
            if code == grpc.StatusCode.OK and log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "request", extra={"api": self._api, "method": method, "uid": uid, "ms": round(elapsed * 1000, 3)}
                )


async def _offload(pool: futures.ThreadPoolExecutor, body: Callable[[float | None], T], deadline: float | None) -> T:
    """Run ``body(deadline)`` on the worker pool and await it. Leaner than run_in_executor (no
    concurrent.futures.Future chained to an asyncio one): this hop is on every Encrypt and Decrypt."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def job() -> None:
        # Queued behind slow calls: a request whose caller has given up must not cost the backend anything.
        if done.cancelled() or (deadline is not None and time.monotonic() >= deadline):
            loop.call_soon_threadsafe(_settle, done, None, DeadlinePassed("deadline passed while queued"))
            return
        try:
            result = body(deadline)
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle, done, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, done, result, None)

    pool.submit(job)
    return await done


async def _close_fast(fast: FastPath) -> None:
    fast.close_fast()
    await asyncio.sleep(0)  # let the transports run their close callbacks


async def _stop_all(servers: list[grpc.aio.Server], grace: float) -> None:
    await asyncio.gather(*(server.stop(grace) for server in servers))


def _settle(done: asyncio.Future[T], result: T | None, exc: BaseException | None) -> None:
    if done.cancelled():  # the caller went away (deadline, cancellation) while the backend worked
        return
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(result)  # type: ignore[arg-type]


def _check_plaintext(plaintext: bytes) -> None:
    if not plaintext:
        raise InvalidInput("plaintext is empty")
    if len(plaintext) > _MAX_PLAINTEXT:
        raise InvalidInput(f"plaintext is {len(plaintext)} bytes; data keys are at most {_MAX_PLAINTEXT}")


def _check_ciphertext(ciphertext: bytes) -> None:
    if not ciphertext:
        raise InvalidInput("ciphertext is empty")
    # Every blob kleidi makes fits the apiserver's limit: a larger one is not ours, and never reaches the backend.
    if len(ciphertext) > contract.MAX_CIPHERTEXT_BYTES:
        raise InvalidInput(
            f"ciphertext is {len(ciphertext)} bytes; kleidi's are at most {contract.MAX_CIPHERTEXT_BYTES}"
        )


def _check_decrypt_request(ciphertext: bytes, annotations: Mapping[str, bytes]) -> None:
    _check_ciphertext(ciphertext)
    if annotations:
        problems = contract.annotation_problems(annotations)
        if problems:
            raise InvalidInput("; ".join(problems))


def _encrypt_response(wrapped: Wrapped) -> v2_pb2.EncryptResponse:
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


class KmsV2Servicer(v2_pb2_grpc.KeyManagementServiceServicer):
    """v2.KeyManagementService: Status from the cached health state; Encrypt/Decrypt through the provider."""

    def __init__(self, provider: Provider, health: HealthMonitor, call: _Call) -> None:
        self._provider = provider
        self._health = health
        self._call = call
        self._fast = fast_path(provider)
        self._status_for: Any = None
        self._status: v2_pb2.StatusResponse = v2_pb2.StatusResponse()

    async def Status(self, request: v2_pb2.StatusRequest, context: grpc.aio.ServicerContext) -> v2_pb2.StatusResponse:
        state = self._health.state
        if state is not self._status_for:  # rebuilt only when the health loop publishes a new state
            self._status = v2_pb2.StatusResponse(version=contract.KMS_V2, healthz=state.reason, key_id=state.key_id)
            self._status_for = state
        return self._status

    async def Encrypt(
        self, request: v2_pb2.EncryptRequest, context: grpc.aio.ServicerContext
    ) -> v2_pb2.EncryptResponse:
        def body(deadline: float | None) -> v2_pb2.EncryptResponse:
            _check_plaintext(request.plaintext)
            return _encrypt_response(self._provider.encrypt(request.plaintext, request.uid, deadline))

        async def fast(deadline: float | None) -> v2_pb2.EncryptResponse | None:
            assert self._fast is not None
            _check_plaintext(request.plaintext)
            wrapped = await self._fast.encrypt_fast(request.plaintext, deadline)
            return None if wrapped is None else _encrypt_response(wrapped)

        return await self._call.run("Encrypt", request.uid, context, body, fast if self._fast else None)

    async def Decrypt(
        self, request: v2_pb2.DecryptRequest, context: grpc.aio.ServicerContext
    ) -> v2_pb2.DecryptResponse:
        annotations: Mapping[str, bytes] = request.annotations

        def body(deadline: float | None) -> v2_pb2.DecryptResponse:
            _check_decrypt_request(request.ciphertext, annotations)
            plaintext = self._provider.decrypt(request.ciphertext, request.key_id, annotations, request.uid, deadline)
            return v2_pb2.DecryptResponse(plaintext=plaintext)

        async def fast(deadline: float | None) -> v2_pb2.DecryptResponse | None:
            assert self._fast is not None
            _check_decrypt_request(request.ciphertext, annotations)
            plaintext = await self._fast.decrypt_fast(request.ciphertext, request.key_id, annotations, deadline)
            return None if plaintext is None else v2_pb2.DecryptResponse(plaintext=plaintext)

        return await self._call.run("Decrypt", request.uid, context, body, fast if self._fast else None)


class KmsV1Servicer(v1beta1_pb2_grpc.KeyManagementServiceServicer):
    """v1beta1.KeyManagementService, for clusters migrating off KMS v1 plugins."""

    def __init__(self, provider: Provider, call: _Call) -> None:
        self._provider = provider
        self._call = call
        self._fast = fast_path(provider)
        self._version = v1beta1_pb2.VersionResponse(
            version=contract.KMS_V1, runtime_name="kleidi", runtime_version=__version__
        )

    async def Version(self, request: v1beta1_pb2.VersionRequest, context: grpc.aio.ServicerContext) -> Any:
        return self._version

    async def Encrypt(self, request: v1beta1_pb2.EncryptRequest, context: grpc.aio.ServicerContext) -> Any:
        def body(deadline: float | None) -> v1beta1_pb2.EncryptResponse:
            _check_plaintext(request.plain)
            return v1beta1_pb2.EncryptResponse(cipher=self._provider.encrypt(request.plain, "", deadline).ciphertext)

        async def fast(deadline: float | None) -> v1beta1_pb2.EncryptResponse | None:
            assert self._fast is not None
            _check_plaintext(request.plain)
            wrapped = await self._fast.encrypt_fast(request.plain, deadline)
            return None if wrapped is None else v1beta1_pb2.EncryptResponse(cipher=wrapped.ciphertext)

        return await self._call.run("Encrypt", "", context, body, fast if self._fast else None)

    async def Decrypt(self, request: v1beta1_pb2.DecryptRequest, context: grpc.aio.ServicerContext) -> Any:
        def body(deadline: float | None) -> v1beta1_pb2.DecryptResponse:
            _check_ciphertext(request.cipher)
            return v1beta1_pb2.DecryptResponse(plain=self._provider.decrypt(request.cipher, "", {}, "", deadline))

        async def fast(deadline: float | None) -> v1beta1_pb2.DecryptResponse | None:
            assert self._fast is not None
            _check_ciphertext(request.cipher)
            plaintext = await self._fast.decrypt_fast(request.cipher, "", {}, deadline)
            return None if plaintext is None else v1beta1_pb2.DecryptResponse(plain=plaintext)

        return await self._call.run("Decrypt", "", context, body, fast if self._fast else None)


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
        self._socket_problem: str | None = None

    def start(self) -> None:
        cfg = self.config
        path = cfg.socket_path
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
        log.info(
            "serving",
            extra={
                "socket": path,
                "provider": self.provider.name,
                "version": __version__,
                "metrics": "{}:{}".format(*self._probes.address) if self._probes is not None else "disabled",
            },
        )

    def _bind(self, path: str, gid: int | None) -> grpc.aio.Server:
        """A gRPC server listening on ``path`` (prepared first), with the configured mode and group."""
        assert self._loop is not None
        # The socket must never exist with a wider mode than configured, not even for an instant.
        old_umask = os.umask(0o177)
        try:
            server = asyncio.run_coroutine_threadsafe(self._start_grpc(path), self._loop).result(30)
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

    async def _start_grpc(self, path: str) -> grpc.aio.Server:
        cfg = self.config
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.max_request_bytes),
                ("grpc.max_send_message_length", cfg.max_request_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        assert self._servicers is not None
        v2, v1 = self._servicers
        v2_pb2_grpc.add_KeyManagementServiceServicer_to_server(v2, server)  # type: ignore[no-untyped-call]
        v1beta1_pb2_grpc.add_KeyManagementServiceServicer_to_server(v1, server)  # type: ignore[no-untyped-call]
        try:
            server.add_insecure_port(f"unix:{path}")
        except RuntimeError as exc:  # grpc reports a failed bind this way, with no errno
            raise ConfigError(f"listen: cannot bind {path}: {exc}") from None
        await server.start()
        return server

    def _new_call(self, api: str, pool: futures.ThreadPoolExecutor) -> _Call:
        return _Call(self.metrics, self.health, api, pool, self.provider)

    def _probe_health(self) -> tuple[bool, str]:
        problem = self._socket_problem
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
        loop = self._loop
        if loop is not None:
            if self._grpc:
                grace = self.config.shutdown_grace
                asyncio.run_coroutine_threadsafe(_stop_all(self._grpc, grace), loop).result(grace + 10)
                unixsocket.remove(self.config.socket_path, self._inode)
            fast = fast_path(self.provider)
            if fast is not None:  # its connections belong to the loop: close them there, while it still runs
                asyncio.run_coroutine_threadsafe(_close_fast(fast), loop).result(5)
            loop.call_soon_threadsafe(loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(10)
            if not loop.is_running():
                loop.close()
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
