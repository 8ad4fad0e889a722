"""Proxy mode: the apiserver's KMS calls forwarded to kleidi key servers (serve_remote) over mutual TLS."""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import grpc

from kleidi import remote_tls
from kleidi.api import remote_v1_pb2, remote_v1_pb2_grpc
from kleidi.config import RemoteConfig
from kleidi.errors import (
    BackendUnavailable,
    ConfigError,
    DeadlinePassed,
    IntegrityError,
    InvalidInput,
    KeyNotFound,
    KleidiError,
)
from kleidi.observability import Metrics, key_id_hash
from kleidi.providers.base import DEADLINE_MARGIN, Wrapped

log = logging.getLogger("kleidi.remote")

# Answers every key server would give alike (they serve the same KEK): passed to the caller at once, never failed
# over. Anything else (no answer, TLS refused, a key server whose backend is down) is tried on the next endpoint;
# so is a NOT_FOUND, which may be one key server's alone (see _call).
_FINAL = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION})
# The trailing metadata key in which a key server names the error's kind (KleidiError.kind).
ERROR_KIND = "kleidi-error-kind"
# How old the last look at the certificate files may be before a call looks again (each health check looks too).
_FILES_EVERY = 5.0
# Channels replaced after a certificate change are closed this much later, so calls already on them can finish.
_RETIRE_AFTER = 30.0
_MAX_DETAILS = 200

_CHANNEL_OPTIONS = (
    # gRPC's default reconnect backoff grows to two minutes: a key server that comes back must be used again
    # within about a second, so clients recover by themselves well inside one health interval.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Connections belong to this provider only: after a certificate change, new channels make new TLS sessions
    # instead of sharing a process-wide subchannel that still presents the old certificate.
    ("grpc.use_local_subchannel_pool", 1),
)


class _Endpoint:
    """One key server: its channel and what the last health check (or a failed call since) learned of it."""

    def __init__(self, address: str, metrics: Metrics) -> None:
        self.address = address
        self.channel: Any = None
        self.stub: Any = None
        self.healthy = False  # answered the last check healthy, with the agreed key_id, and no call failed since
        self.mismatched = False  # reports another key_id than the agreed one: never used until it agrees
        # Reported the agreed key_id at some check since it was agreed: it votes on any change of the key_id, even
        # after it disagreed or went silent, so a key server that changes KEK cannot shrink the electorate.
        self.voter = False
        self.problem = "not checked yet"
        self._metrics = metrics
        self._calls: dict[tuple[str, grpc.StatusCode], Any] = {}
        self.up = metrics.remote_endpoint_up.labels(address)
        self.mismatch = metrics.remote_key_mismatch.labels(address)
        self.failovers = metrics.remote_failovers.labels(address)
        self.up.set(0)
        self.mismatch.set(0)

    @property
    def trusted(self) -> bool:
        """Agreed with the key_id and has not reported another since: calls may use it."""
        return self.voter and not self.mismatched

    def count(self, method: str, code: grpc.StatusCode) -> None:
        counter = self._calls.get((method, code))
        if counter is None:
            counter = self._calls[(method, code)] = self._metrics.remote_calls.labels(self.address, method, code.name)
        counter.inc()


class RemoteProvider:
    """Forwards Encrypt and Decrypt to the configured key servers, first to those the last check found healthy
    and agreeing, then to the others, each attempt bounded by ``remote.timeout`` and by an even share of the time
    left to the caller's deadline. Blobs, key_id and annotations are the key server's, unchanged, so a cluster can
    move between local and remote mode without re-encrypting.

    ``check`` asks every key server for its Status side by side. The first key_id agreed is one that a strict
    majority of the configured key servers report healthy, once a round trip proves it; after that it moves only
    when a strict majority of the key servers that agreed with it (answering or not) report the same new one, and a
    round trip proves it. A key server reporting another key_id is refused until it agrees, so the key_id the
    apiserver sees never flips because one key server changed KEK. Until a check has agreed on a key_id, Encrypt
    is refused."""

    name = "remote"
    inline_safe = False  # every call is a network round trip

    def __init__(self, config: RemoteConfig, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._material = remote_tls.load_client(config)
        self._endpoints = tuple(_Endpoint(address, metrics) for address in config.endpoints)
        self._order: tuple[_Endpoint, ...] = self._endpoints  # the call order; rebuilt, never changed in place
        self._key_id = ""
        # Why the last check could not agree on a first key_id (too few key servers report the same one); "" once
        # agreed, or when no check ran yet or the check failed otherwise (the endpoints' problems say why then).
        self._waiting = ""
        self._state_lock = threading.Lock()
        self._files_lock = threading.Lock()
        self._files_looked = time.monotonic()
        self._reload_problem = ""
        self._retired: list[tuple[float, Any]] = []
        self._seconds = {op: metrics.backend_seconds.labels(self.name, op) for op in ("encrypt", "decrypt", "check")}
        self._open_channels(self._material)
        log.info(
            "forwarding to key servers",
            extra={"endpoints": list(config.endpoints), "client": self._material.subject},
        )

    # --- Provider --------------------------------------------------------------------------------------------

    def key_id(self) -> str:
        return self._key_id

    def encrypt(self, plaintext: bytes, uid: str, deadline: float | None = None) -> Wrapped:
        started = time.perf_counter()
        try:
            request = remote_v1_pb2.EncryptRequest(plaintext=plaintext, uid=uid)
            answer = self._call("Encrypt", request, deadline)
            return Wrapped(bytes(answer.ciphertext), answer.key_id, dict(answer.annotations))
        except KleidiError as exc:
            self._metrics.backend_errors.labels(self.name, "encrypt", exc.kind).inc()
            raise
        finally:
            self._seconds["encrypt"].observe(time.perf_counter() - started)

    def decrypt(
        self,
        ciphertext: bytes,
        key_id: str,
        annotations: Mapping[str, bytes],
        uid: str,
        deadline: float | None = None,
    ) -> bytes:
        started = time.perf_counter()
        try:
            request = remote_v1_pb2.DecryptRequest(
                ciphertext=ciphertext, key_id=key_id, annotations=dict(annotations), uid=uid
            )
            return bytes(self._call("Decrypt", request, deadline).plaintext)
        except KleidiError as exc:
            self._metrics.backend_errors.labels(self.name, "decrypt", exc.kind).inc()
            raise
        finally:
            self._seconds["decrypt"].observe(time.perf_counter() - started)

    def check(self) -> None:
        """Re-read changed certificate files, ask every key server for its Status, settle the key_id, then prove
        it with one Encrypt+Decrypt round trip; only then publish what was learned."""
        started = time.perf_counter()
        try:
            self._look_at_files(force=True)
            found = self._survey()
            reference, waiting = self._vote(found)
            self._round_trip(reference, found)
            self._publish(reference, found, waiting)
            if not self._key_id:
                if waiting:
                    # Every check, as a refused key server is: a plugin that cannot encrypt needs an operator.
                    log.warning(
                        "no key_id agreed: too few of the configured key servers report the same one",
                        extra={"reason": waiting, "endpoints": self._problems()},
                    )
                raise BackendUnavailable(self._unagreed())
            usable = [e for e in self._endpoints if e.healthy]
            if not usable:
                raise BackendUnavailable("no key server is usable: " + self._problems())
        except KleidiError as exc:
            self._metrics.backend_errors.labels(self.name, "check", exc.kind).inc()
            raise
        finally:
            self._seconds["check"].observe(time.perf_counter() - started)

    def close(self) -> None:
        with self._state_lock:
            channels = [e.channel for e in self._endpoints] + [c for _, c in self._retired]
            self._retired = []
        for channel in channels:
            if channel is not None:
                channel.close()

    # --- calls -----------------------------------------------------------------------------------------------

    def _call(self, method: str, request: Any, deadline: float | None) -> Any:
        """One call, failed over across the endpoints in the current order within the caller's deadline."""
        if method == "Encrypt" and not self._key_id:
            # Any key server's answer would do, and the first to answer would set the key_id the apiserver sees.
            # UNAVAILABLE makes the server run a check at once.
            raise BackendUnavailable(self._unagreed())
        self._look_at_files(force=False)
        order = self._order
        if not order:
            raise BackendUnavailable("no key server may be used: " + self._problems())
        end = deadline if deadline is not None else time.monotonic() + self._config.timeout * len(order)
        problems: list[str] = []
        not_found: list[_Endpoint] = []
        for index, endpoint in enumerate(order):
            left = end - time.monotonic() - DEADLINE_MARGIN
            if left <= 0:
                if index == 0:
                    raise DeadlinePassed(f"the deadline passed before {method} could be sent to a key server")
                problems.append(f"{endpoint.address}: not tried, the deadline passed")
                break
            # An even share of what is left: a key server that hangs cannot take the time the next ones need.
            timeout = min(self._config.timeout, left / (len(order) - index))
            try:
                answer = getattr(endpoint.stub, method)(request, timeout=timeout)
            except grpc.RpcError as exc:
                code = exc.code()
                endpoint.count(method, code)
                reason = _reason(exc)
                if code == grpc.StatusCode.NOT_FOUND:
                    # Unlike tampering, an unknown key may be this key server's alone: on Decrypt its KEK changed
                    # since the check, on Encrypt the agreed KEK is gone from its backend (deleted, a token
                    # replaced). Another may still hold it. Demoted below, unless every key server says the same.
                    not_found.append(endpoint)
                    problems.append(f"{endpoint.address}: {reason}")
                    if index + 1 < len(order):
                        endpoint.failovers.inc()
                    continue
                if code in _FINAL:
                    raise _final_error(endpoint.address, method, exc) from None
            else:
                endpoint.count(method, grpc.StatusCode.OK)
                reason = self._disagreement(answer.key_id) if method == "Encrypt" else ""
                if not reason:
                    self._demote_not_found(not_found)
                    return answer
            problems.append(f"{endpoint.address}: {reason}")
            self._demote(endpoint, reason)
            if index + 1 < len(order):
                endpoint.failovers.inc()
        if not_found and len(not_found) == len(problems):
            raise KeyNotFound(f"no key server knows the key of this {method}: " + "; ".join(problems))
        self._demote_not_found(not_found)
        raise BackendUnavailable(f"no key server answered {method}: " + "; ".join(problems))

    def _demote_not_found(self, endpoints: list[_Endpoint]) -> None:
        for endpoint in endpoints:
            self._demote(endpoint, "answered NOT_FOUND for a key that another key server holds or may hold")

    def _disagreement(self, key_id: str) -> str:
        """Why an Encrypt answer cannot be used: its key_id is not the one Status reports (a key server rotated
        since the last check). When no endpoint answers with the agreed one, the call is UNAVAILABLE, on which the
        server runs the health check at once: it moves to the new key_id once a strict majority of the key servers
        that agreed on the old one report it."""
        if key_id != self._key_id:
            agreed = key_id_hash(self._key_id)
            return f"answered Encrypt with key_id {key_id_hash(key_id)}, not the agreed {agreed} (hashes)"
        return ""

    def _demote(self, endpoint: _Endpoint, reason: str) -> None:
        """A failed call is newer news than the last check: later calls try this endpoint after the others."""
        if not endpoint.healthy:
            return
        with self._state_lock:
            endpoint.healthy = False
            endpoint.problem = reason
            self._order = self._ordered()
        log.warning("key server failed a call; trying it last until the next check", extra=self._about(endpoint))

    def _ordered(self) -> tuple[_Endpoint, ...]:
        """Healthy endpoints first, then the others that may be used: once a key_id is agreed, only those that
        agree with it (one whose KEK is unknown or another could answer under another key_id); before that (a
        Decrypt names its key), every endpoint not known to disagree."""
        if self._key_id:
            usable = [e for e in self._endpoints if e.trusted]
        else:
            usable = [e for e in self._endpoints if not e.mismatched]
        return tuple([e for e in usable if e.healthy] + [e for e in usable if not e.healthy])

    # --- health ----------------------------------------------------------------------------------------------

    def _survey(self) -> dict[_Endpoint, Any]:
        """Every endpoint's Status, side by side: a StatusResponse, or the reason as a string."""
        request = remote_v1_pb2.StatusRequest()
        pending = [(e, e.stub.Status.future(request, timeout=self._config.timeout)) for e in self._endpoints]
        found: dict[_Endpoint, Any] = {}
        for endpoint, future in pending:
            try:
                found[endpoint] = future.result()
            except grpc.RpcError as exc:
                endpoint.count("Status", exc.code())
                found[endpoint] = _reason(exc)
            else:
                endpoint.count("Status", grpc.StatusCode.OK)
        return found

    def _vote(self, found: dict[_Endpoint, Any]) -> tuple[str, str]:
        """The key_id to check against, and when there is none, why. Only healthy answers with a key_id count (an
        empty one is a key server still starting). Before any key_id is agreed: one that a strict majority of the
        configured endpoints report, answering or not; whichever answer first at a (re)start may be the odd ones (a
        wrong token, an old backup), and a key_id taken from them would never move again while the other plugins
        refuse those key servers and cannot read what this one wrote. After: the agreed one, unless a strict
        majority of its voters (answering or not) report the same new one, which is a rotation. So neither a tie,
        nor a sole survivor, nor an endpoint that never agreed flips the key_id the apiserver sees, which would
        strand what it wrote meanwhile."""
        reported: dict[_Endpoint, str] = {}
        for endpoint in self._endpoints:
            answer = found[endpoint]
            if not isinstance(answer, str) and answer.healthz == "ok" and answer.key_id:
                reported[endpoint] = answer.key_id
        if not self._key_id:
            key_id, count = Counter(reported.values()).most_common(1)[0] if reported else ("", 0)
            needed = len(self._endpoints) // 2 + 1
            if count >= needed:
                return key_id, ""
            total = len(self._endpoints)
            return "", (
                f"{count} of the {total} configured key servers agree on a key_id, and a majority of the"
                f" configured ones ({needed}) must agree before the first Encrypt"
            )
        voters = [e for e in self._endpoints if e.voter]
        votes = Counter(reported[e] for e in voters if e in reported)
        for key_id, count in votes.items():
            if key_id != self._key_id and 2 * count > len(voters):
                return key_id, ""
        return self._key_id, ""

    def _round_trip(self, reference: str, found: dict[_Endpoint, Any]) -> None:
        """One Encrypt+Decrypt through the first good endpoint (the next one if it fails); an endpoint failing it
        is marked with the reason in ``found``."""
        probe = os.urandom(32)
        timeout = self._config.timeout
        for endpoint in self._endpoints:
            answer = found[endpoint]
            if isinstance(answer, str) or answer.healthz != "ok" or answer.key_id != reference:
                continue
            method = "Encrypt"
            try:
                wrapped = endpoint.stub.Encrypt(remote_v1_pb2.EncryptRequest(plaintext=probe), timeout=timeout)
                endpoint.count(method, grpc.StatusCode.OK)
                if wrapped.key_id != reference:
                    found[endpoint] = "its Encrypt answered another key_id than its Status"
                    continue
                method = "Decrypt"
                request = remote_v1_pb2.DecryptRequest(
                    ciphertext=wrapped.ciphertext, key_id=wrapped.key_id, annotations=dict(wrapped.annotations)
                )
                plain = endpoint.stub.Decrypt(request, timeout=timeout)
                endpoint.count(method, grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                endpoint.count(method, exc.code())
                found[endpoint] = f"health round trip ({method}) failed: {_reason(exc)}"
                continue
            if not hmac.compare_digest(bytes(plain.plaintext), probe):
                found[endpoint] = "health round trip returned a different plaintext"
                continue
            return

    def _publish(self, reference: str, found: dict[_Endpoint, Any], waiting: str) -> None:
        """Settle every endpoint against the agreed key_id: ``reference`` when an endpoint reporting it came through
        the round trip (a new key_id is never taken on Status alone), else the one agreed before."""
        proven = bool(reference) and any(
            not isinstance(a, str) and a.healthz == "ok" and a.key_id == reference for a in found.values()
        )
        agreed = reference if proven else self._key_id
        with self._state_lock:
            if agreed != self._key_id:
                if self._key_id:
                    log.info(
                        "key_id moved: a majority of the key servers that agreed on it report a new one",
                        extra={"key_id_hash": key_id_hash(agreed), "previous_key_id_hash": key_id_hash(self._key_id)},
                    )
                # A new electorate: those that report the new key_id. The others' KEK is unknown until they answer.
                for endpoint in self._endpoints:
                    endpoint.voter = endpoint.mismatched = False
            for endpoint in self._endpoints:
                self._settle(endpoint, agreed, found[endpoint])
            self._key_id = agreed
            self._waiting = "" if agreed else waiting
            self._order = self._ordered()

    def _settle(self, endpoint: _Endpoint, agreed: str, answer: Any) -> None:
        was_healthy, was_problem = endpoint.healthy, endpoint.problem
        if isinstance(answer, str):
            # Silent: whether it still serves another KEK is unknown, so a mismatch stays until it agrees.
            endpoint.healthy, endpoint.problem = False, answer
        elif answer.key_id and agreed and answer.key_id != agreed:
            endpoint.healthy, endpoint.mismatched = False, True
            endpoint.problem = (
                f"reports key_id {key_id_hash(answer.key_id)}, the others {key_id_hash(agreed)} (hashes):"
                " it serves another KEK and is not used"
            )
            # Every check, not only on change: a key server with the wrong KEK needs an operator.
            log.warning(
                "key server refused: it serves another KEK than the other endpoints",
                extra={
                    "endpoint": endpoint.address,
                    "key_id_hash": key_id_hash(answer.key_id),
                    "agreed_key_id_hash": key_id_hash(agreed),
                },
            )
        else:
            if answer.key_id and answer.key_id == agreed:
                endpoint.mismatched, endpoint.voter = False, True
            if answer.healthz != "ok":
                endpoint.healthy, endpoint.problem = False, f"reports unhealthy: {answer.healthz[:_MAX_DETAILS]}"
            elif not answer.key_id:
                # A key server still starting says nothing about its KEK.
                endpoint.healthy, endpoint.problem = False, "reports no key_id"
            elif not agreed:
                endpoint.healthy = False
                endpoint.problem = f"reports key_id {key_id_hash(answer.key_id)} (hash); no key_id agreed yet"
            else:
                endpoint.healthy, endpoint.problem = True, ""
        endpoint.up.set(1 if endpoint.healthy else 0)
        endpoint.mismatch.set(1 if endpoint.mismatched else 0)
        if endpoint.healthy and not was_healthy:
            version = "" if isinstance(answer, str) else answer.server_version
            log.info("key server usable", extra={"endpoint": endpoint.address, "server_version": version})
        elif not endpoint.healthy and not endpoint.mismatched and endpoint.problem != was_problem:
            log.warning("key server unusable", extra=self._about(endpoint))

    def _unagreed(self) -> str:
        if not self._waiting:
            return f"no key_id agreed with the key servers yet: {self._problems()}"
        return f"no key_id agreed with the key servers yet: {self._waiting}. Key servers: {self._problems()}"

    def _problems(self) -> str:
        return "; ".join(f"{e.address}: {e.problem}" for e in self._endpoints)

    @staticmethod
    def _about(endpoint: _Endpoint) -> dict[str, str]:
        return {"endpoint": endpoint.address, "reason": endpoint.problem}

    # --- certificates ----------------------------------------------------------------------------------------

    def _open_channels(self, material: remote_tls.Material) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=material.ca, private_key=material.key, certificate_chain=material.cert
        )
        now = time.monotonic()
        with self._state_lock:
            for endpoint in self._endpoints:
                old = endpoint.channel
                endpoint.channel = grpc.secure_channel(endpoint.address, credentials, options=_CHANNEL_OPTIONS)
                endpoint.stub = remote_v1_pb2_grpc.KeyServerStub(endpoint.channel)  # type: ignore[no-untyped-call]
                if old is not None:
                    self._retired.append((now, old))

    def _look_at_files(self, force: bool) -> None:
        """Re-read the CA, certificate and key when their files changed, and put new channels in place. Files that
        cannot be used (a rotation half written) are reported and the ones in use kept; they are tried again at
        the next look."""
        now = time.monotonic()
        if not force and now - self._files_looked < _FILES_EVERY:
            return
        if not self._files_lock.acquire(blocking=force):
            return  # another call is looking right now
        try:
            self._files_looked = now
            self._close_retired(now)
            if remote_tls.signature(remote_tls.client_files(self._config)) == self._material.signature:
                return
            try:
                material = remote_tls.load_client(self._config)
            except ConfigError as exc:
                self._metrics.tls_reloads.labels("client", "error").inc()
                if str(exc) != self._reload_problem:
                    log.warning(
                        "cannot use the changed certificate files; keeping the ones in use", extra={"reason": str(exc)}
                    )
                    self._reload_problem = str(exc)
                return
            self._reload_problem = ""
            self._open_channels(material)
            self._material = material
            self._metrics.tls_reloads.labels("client", "ok").inc()
            log.info("certificate files re-read; new connections use them", extra={"client": material.subject})
        finally:
            self._files_lock.release()

    def _close_retired(self, now: float) -> None:
        with self._state_lock:
            old = [c for since, c in self._retired if now - since >= _RETIRE_AFTER]
            self._retired = [(since, c) for since, c in self._retired if now - since < _RETIRE_AFTER]
        for channel in old:
            channel.close()


def _kind(exc: grpc.RpcError) -> str:
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_KIND:
            return str(value)
    return ""


def _reason(exc: grpc.RpcError) -> str:
    """A failed attempt in a few words: the status, the key server's error kind if it sent one, its details."""
    kind = _kind(exc)
    details = " ".join(str(exc.details() or "").split())[:_MAX_DETAILS]
    return f"{exc.code().name}{f' ({kind})' if kind else ''}: {details}"


def _final_error(address: str, method: str, exc: grpc.RpcError) -> KleidiError:
    """The error a key server's final answer (one another key server would give too) becomes here."""
    code = exc.code()
    message = f"key server {address} refused {method}: {str(exc.details() or code.name)[:_MAX_DETAILS]}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return IntegrityError(message) if _kind(exc) == IntegrityError.kind else InvalidInput(message)
    return ConfigError(message)
