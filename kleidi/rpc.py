"""The request path: every RPC kleidi serves, from the servicer of its API to the provider, in the order a call
takes it.

1. A servicer per API: KMS v2 and v1beta1 on the plugin's unix socket, kleidi.remote.v1 behind a key server's TLS
   front (kleidi/remote_server.py). Status and Version answer from memory, on the event loop.
2. ``KeyCalls`` (v2 and remote, whose messages have the same fields) and the v1beta1 servicer check the request and
   give ``Call.run`` the work to do.
3. ``Call.run`` holds what every Encrypt and Decrypt shares: the deadline, metrics, the error-to-status mapping and
   the request log line. It runs the work one of three ways, and only one of them per call:
   - the provider's fast path, awaited on the loop (Vault: one transit attempt on keep-alive connections);
   - inline on the loop, for a provider that is ``inline_safe`` at that moment (SoftHSM2: microseconds, no wait);
   - otherwise on the worker pool (``_offload``), which every slow, blocking or retrying call takes.
   docs/performance.md measures what the first two buy; docs/architecture.md says why the loop and the pool.
4. The provider's answer is checked against the KMS contract before it leaves (``check_wrapped``).

The gRPC servers, sockets and lifecycle are in kleidi/server.py."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent import futures
from typing import Any, Generic, TypeVar

import grpc

from kleidi import __version__, contract
from kleidi.api import remote_v1_pb2, remote_v1_pb2_grpc, v1beta1_pb2, v1beta1_pb2_grpc, v2_pb2, v2_pb2_grpc
from kleidi.errors import DeadlinePassed, InvalidInput, KleidiError, WouldBlock
from kleidi.health import HealthMonitor, HealthState
from kleidi.observability import Metrics
from kleidi.providers.base import INLINE, Provider, Wrapped, fast_path

log = logging.getLogger("kleidi.server")

# Data keys are 32 bytes (KMS v2 seeds, KMS v1 DEKs). The limit leaves every provider's wrapped form under
# the apiserver's 1 kB ciphertext limit, so an oversized request is the caller's error, not a broken answer.
_MAX_PLAINTEXT = 512
# The trailing metadata key that carries a failed call's KleidiError.kind (kleidi/api/remote_v1.proto).
ERROR_KIND = "kleidi-error-kind"

T = TypeVar("T")
E = TypeVar("E")
D = TypeVar("D")
S = TypeVar("S")


class _StatusCache(Generic[S]):
    """A Status answer rebuilt only when the health loop publishes a new state: Status is answered from memory."""

    def __init__(self, health: HealthMonitor, make: Callable[[HealthState], S]) -> None:
        self._health = health
        self._make = make
        self._for: HealthState | None = None
        self._answer: S | None = None

    def get(self) -> S:
        state = self._health.state
        if state is not self._for or self._answer is None:
            self._answer = self._make(state)
            self._for = state
        return self._answer


class KmsV2Servicer(v2_pb2_grpc.KeyManagementServiceServicer):
    """v2.KeyManagementService: Status from the cached health state; Encrypt/Decrypt through the provider."""

    def __init__(self, provider: Provider, health: HealthMonitor, call: Call) -> None:
        self._calls = KeyCalls(provider, call, v2_pb2.EncryptResponse, v2_pb2.DecryptResponse)
        self._status = _StatusCache(
            health,
            lambda state: v2_pb2.StatusResponse(version=contract.KMS_V2, healthz=state.reason, key_id=state.key_id),
        )

    async def Status(self, request: v2_pb2.StatusRequest, context: grpc.aio.ServicerContext) -> v2_pb2.StatusResponse:
        return self._status.get()

    async def Encrypt(
        self, request: v2_pb2.EncryptRequest, context: grpc.aio.ServicerContext
    ) -> v2_pb2.EncryptResponse:
        return await self._calls.encrypt(request, context)

    async def Decrypt(
        self, request: v2_pb2.DecryptRequest, context: grpc.aio.ServicerContext
    ) -> v2_pb2.DecryptResponse:
        return await self._calls.decrypt(request, context)


class KeyServerServicer(remote_v1_pb2_grpc.KeyServerServicer):
    """kleidi.remote.v1.KeyServer: what the KMS v2 servicer does, for proxy-mode plugins. The provider's blobs,
    key_id and annotations go out exactly as it made them."""

    def __init__(self, provider: Provider, health: HealthMonitor, call: Call) -> None:
        self._calls = KeyCalls(provider, call, remote_v1_pb2.EncryptResponse, remote_v1_pb2.DecryptResponse)
        # the same key_id and reason the key server's own KMS socket answers
        self._status = _StatusCache(
            health,
            lambda state: remote_v1_pb2.StatusResponse(
                healthz=state.reason, key_id=state.key_id, server_version=__version__
            ),
        )

    async def Status(
        self, request: remote_v1_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> remote_v1_pb2.StatusResponse:
        return self._status.get()

    async def Encrypt(
        self, request: remote_v1_pb2.EncryptRequest, context: grpc.aio.ServicerContext
    ) -> remote_v1_pb2.EncryptResponse:
        return await self._calls.encrypt(request, context)

    async def Decrypt(
        self, request: remote_v1_pb2.DecryptRequest, context: grpc.aio.ServicerContext
    ) -> remote_v1_pb2.DecryptResponse:
        return await self._calls.decrypt(request, context)


class KmsV1Servicer(v1beta1_pb2_grpc.KeyManagementServiceServicer):
    """v1beta1.KeyManagementService, for clusters migrating off KMS v1 plugins: no key_id, annotations or uid."""

    def __init__(self, provider: Provider, call: Call) -> None:
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
            check_plaintext(request.plain)
            return v1beta1_pb2.EncryptResponse(cipher=self._provider.encrypt(request.plain, "", deadline).ciphertext)

        async def fast(deadline: float | None) -> v1beta1_pb2.EncryptResponse | None:
            assert self._fast is not None
            check_plaintext(request.plain)
            wrapped = await self._fast.encrypt_fast(request.plain, deadline)
            return None if wrapped is None else v1beta1_pb2.EncryptResponse(cipher=wrapped.ciphertext)

        return await self._call.run("Encrypt", "", context, body, fast if self._fast else None)

    async def Decrypt(self, request: v1beta1_pb2.DecryptRequest, context: grpc.aio.ServicerContext) -> Any:
        def body(deadline: float | None) -> v1beta1_pb2.DecryptResponse:
            check_ciphertext(request.cipher)
            return v1beta1_pb2.DecryptResponse(plain=self._provider.decrypt(request.cipher, "", {}, "", deadline))

        async def fast(deadline: float | None) -> v1beta1_pb2.DecryptResponse | None:
            assert self._fast is not None
            check_ciphertext(request.cipher)
            plaintext = await self._fast.decrypt_fast(request.cipher, "", {}, deadline)
            return None if plaintext is None else v1beta1_pb2.DecryptResponse(plain=plaintext)

        return await self._call.run("Decrypt", "", context, body, fast if self._fast else None)


class KeyCalls(Generic[E, D]):
    """Encrypt and Decrypt as the KMS v2 API and the remote protocol both carry them: the same request and response
    fields (plaintext and uid in; ciphertext, key_id, annotations and uid back and forth), in message classes of
    their own. The servicers of both hand their Encrypt and Decrypt here."""

    def __init__(
        self, provider: Provider, call: Call, encrypt_response: Callable[..., E], decrypt_response: Callable[..., D]
    ) -> None:
        self._provider = provider
        self._call = call
        self._fast = fast_path(provider)
        self._encrypt_response = encrypt_response
        self._decrypt_response = decrypt_response

    def _answer(self, wrapped: Wrapped) -> E:
        wrapped = check_wrapped(wrapped)
        if not wrapped.annotations:  # an empty map given to the message costs twice what the rest of it does
            return self._encrypt_response(ciphertext=wrapped.ciphertext, key_id=wrapped.key_id)
        return self._encrypt_response(
            ciphertext=wrapped.ciphertext, key_id=wrapped.key_id, annotations=dict(wrapped.annotations)
        )

    async def encrypt(self, request: Any, context: grpc.aio.ServicerContext) -> E:
        def body(deadline: float | None) -> E:
            check_plaintext(request.plaintext)
            return self._answer(self._provider.encrypt(request.plaintext, request.uid, deadline))

        async def fast(deadline: float | None) -> E | None:
            assert self._fast is not None
            check_plaintext(request.plaintext)
            wrapped = await self._fast.encrypt_fast(request.plaintext, deadline)
            return None if wrapped is None else self._answer(wrapped)

        return await self._call.run("Encrypt", request.uid, context, body, fast if self._fast else None)

    async def decrypt(self, request: Any, context: grpc.aio.ServicerContext) -> D:
        annotations: Mapping[str, bytes] = request.annotations

        def body(deadline: float | None) -> D:
            check_decrypt_request(request.ciphertext, annotations)
            plaintext = self._provider.decrypt(request.ciphertext, request.key_id, annotations, request.uid, deadline)
            return self._decrypt_response(plaintext=plaintext)

        async def fast(deadline: float | None) -> D | None:
            assert self._fast is not None
            check_decrypt_request(request.ciphertext, annotations)
            plaintext = await self._fast.decrypt_fast(request.ciphertext, request.key_id, annotations, deadline)
            return None if plaintext is None else self._decrypt_response(plaintext=plaintext)

        return await self._call.run("Decrypt", request.uid, context, body, fast if self._fast else None)


class Call:
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
            await context.abort(code, str(exc), ((ERROR_KIND, exc.kind),))
            raise AssertionError("unreachable") from None  # abort() always raises
        except asyncio.CancelledError:  # the caller's deadline passed or it went away
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.error("request crashed", exc_info=True, extra={"api": self._api, "method": method, "uid": uid})
            await context.abort(code, "internal error; see the plugin log", ((ERROR_KIND, KleidiError.kind),))
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


def _settle(done: asyncio.Future[T], result: T | None, exc: BaseException | None) -> None:
    if done.cancelled():  # the caller went away (deadline, cancellation) while the backend worked
        return
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(result)  # type: ignore[arg-type]


def check_plaintext(plaintext: bytes) -> None:
    if not plaintext:
        raise InvalidInput("plaintext is empty")
    if len(plaintext) > _MAX_PLAINTEXT:
        raise InvalidInput(f"plaintext is {len(plaintext)} bytes; data keys are at most {_MAX_PLAINTEXT}")


def check_ciphertext(ciphertext: bytes) -> None:
    if not ciphertext:
        raise InvalidInput("ciphertext is empty")
    # Every blob kleidi makes fits the apiserver's limit: a larger one is not ours, and never reaches the backend.
    if len(ciphertext) > contract.MAX_CIPHERTEXT_BYTES:
        raise InvalidInput(
            f"ciphertext is {len(ciphertext)} bytes; kleidi's are at most {contract.MAX_CIPHERTEXT_BYTES}"
        )


def check_decrypt_request(ciphertext: bytes, annotations: Mapping[str, bytes]) -> None:
    check_ciphertext(ciphertext)
    if annotations:
        problems = contract.annotation_problems(annotations)
        if problems:
            raise InvalidInput("; ".join(problems))


def check_wrapped(wrapped: Wrapped) -> Wrapped:
    """A provider's Encrypt answer, as the apiserver will judge it."""
    problems = (
        contract.ciphertext_problems(wrapped.ciphertext)
        + contract.key_id_problems(wrapped.key_id)
        + contract.annotation_problems(wrapped.annotations)
    )
    if problems:  # a provider bug; the apiserver would reject the answer anyway
        raise KleidiError("provider answer breaks the KMS contract: " + "; ".join(problems))
    return wrapped
