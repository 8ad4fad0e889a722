"""Key server mode (serve_remote): this kleidi's provider, served to proxy-mode plugins over mutual TLS.

TLS ends here, in Python, rather than in gRPC core, so that every refused connection is logged with the peer's
identity and the certificate files can be re-read between connections. An accepted connection is spliced, bytes
both ways, to a gRPC server (KeyServerServicer) on a unix socket in a private directory: there is no plaintext
TCP listener. The splice costs a little per connection and nothing per call on the KMS socket."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import shutil
import socket
import ssl
import stat
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Any, cast

import grpc

from kleidi import remote_guard
from kleidi.api import remote_v1_pb2_grpc
from kleidi.config import ServeRemoteConfig
from kleidi.errors import ConfigError
from kleidi.observability import Metrics
from kleidi.remote_tls import ServerTls
from kleidi.rpc import KeyServerServicer

log = logging.getLogger("kleidi.remote")

# A client on the network finishes its handshake in milliseconds; one that has not after this is closed.
HANDSHAKE_TIMEOUT = 5.0
# Every connection is renewed within CONNECTION_AGE (±10%, gRPC's jitter): the gRPC server sends GOAWAY, which
# reaches the client through the splice, and the client reconnects with a new handshake. So a re-issued CA or an
# expired client certificate reaches a connection that is already open within this bound (a changed allow-list
# needs a restart, which closes every connection). Calls in flight at the GOAWAY get CONNECTION_AGE_GRACE to finish.
CONNECTION_AGE = 300.0
CONNECTION_AGE_GRACE = 30.0
# An empty private directory younger than this is left alone: a kleidi starting at this moment has made it and
# is about to lock it.
STALE_AFTER = 10.0
# The longest unix socket path the kernel takes (sun_path, less the terminating NUL).
_MAX_SOCKET_PATH = 107


def add_servicer(servicer: KeyServerServicer, server: grpc.aio.Server) -> None:
    remote_v1_pb2_grpc.add_KeyServerServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]


def grpc_options() -> list[tuple[str, int]]:
    """The internal gRPC server's options beyond the KMS socket's: connections renewed within CONNECTION_AGE."""
    return [
        ("grpc.max_connection_age_ms", int(CONNECTION_AGE * 1000)),
        ("grpc.max_connection_age_grace_ms", int(CONNECTION_AGE_GRACE * 1000)),
    ]


class _Pipe(asyncio.Protocol):
    """One side of a spliced connection: what it receives is written to the other side's transport. Until the
    two are linked, what arrives is kept (a client's first HTTP/2 frames come with the end of its handshake)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Pipe | None = None
        self.pending: list[bytes] = []
        self.closed: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.write(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool:
        return False  # TLS has no half-close, and HTTP/2 needs none: the end of one side ends both

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.close()  # after what is buffered for it has been written

    def pause_writing(self) -> None:  # this side's peer reads slower than the other side sends: hold the sender
        other = self.other
        if other is not None and other.transport is not None and not other.transport.is_closing():
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.other
        if other is not None and other.transport is not None and not other.transport.is_closing():
            other.transport.resume_reading()


def link(a: _Pipe, b: _Pipe) -> None:
    a.other, b.other = b, a
    for this, that in ((a, b), (b, a)):
        assert that.transport is not None
        for chunk in this.pending:
            that.transport.write(chunk)
        this.pending.clear()
        if this.closed.done():  # gone before the link: its connection_lost had nobody to close
            that.transport.close()


class _Accept(asyncio.Protocol):
    def __init__(self, front: RemoteFront) -> None:
        self._front = front

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        transport.pause_reading()  # nothing is read before start_tls takes over the connection
        self._front.spawn(transport)


def _host(peername: Any) -> str:
    if isinstance(peername, tuple) and peername:
        return str(peername[0])
    return str(peername)


def _address(peername: Any) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peername)


def _normal_name(name: str) -> str:
    """IP SANs in one spelling (Python writes IPv6 ones uncompressed), so an allow-list entry matches either way."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def peer_names(cert: Mapping[str, Any]) -> tuple[str, list[str]]:
    """(subject CN, the DNS, URI and IP subject alternative names) of a peer certificate as ssl decodes it."""
    common_name = ""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                common_name = value
    names = [
        _normal_name(value) for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "URI", "IP Address")
    ]
    return common_name, names


def handshake_reason(exc: BaseException) -> str:
    """Why a handshake failed, as an operator reads it, with OpenSSL's own word for it."""
    if isinstance(exc, TimeoutError | ConnectionAbortedError):  # asyncio's handshake timeout is the second
        return f"no TLS handshake within {HANDSHAKE_TIMEOUT:.0f}s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or exc)
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return f"no client certificate ({reason})"
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNKNOWN_PROTOCOL"):
            return f"not TLS ({reason})"
        if "ALERT" in reason:
            return f"the client gave up the handshake ({reason}); does it trust the key server's certificate?"
        return reason
    return f"connection lost during the TLS handshake ({type(exc).__name__})"


def _answers(path: str) -> bool:
    """Whether something listens on the unix socket ``path``; anything but a refusal counts as yes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError as exc:
            return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    return True


def _lock(directory: str) -> int | None:
    """An exclusive lock on a private directory, which its kleidi holds from just after making it until it
    removes it (the kernel lets go of it when the process dies, however it dies): the descriptor, or None when
    another process holds it."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_stale(directory: str) -> bool:
    """With its lock held: a directory of this user's with nothing in it but a socket that refuses a connect (or
    nothing at all, for longer than a kleidi takes from making it to locking it)."""
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        return False
    entries = os.listdir(directory)
    if not entries:
        return time.time() - info.st_mtime > STALE_AFTER
    path = os.path.join(directory, "s")
    return entries == ["s"] and stat.S_ISSOCK(os.lstat(path).st_mode) and not _answers(path)


def _remove_if_stale(directory: str) -> bool:
    try:
        fd = _lock(directory)
    except OSError:  # a symlink, gone meanwhile, not readable: not ours to touch
        return False
    if fd is None:  # a running kleidi's
        return False
    try:
        if not _is_stale(directory):
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, "s"))
        os.rmdir(directory)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def remove_stale_dirs(parent: str) -> None:
    """The private directories that kleidis killed without their stop (SIGKILL, the OOM killer) left in
    ``parent``. One that a running kleidi holds, or whose socket answers (a kleidi from before the lock), is kept,
    as is anything not certainly ours."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in sorted(names):
        directory = os.path.join(parent, name)
        if name.startswith("kleidi-remote-") and _remove_if_stale(directory):
            log.info("removed a private socket directory a stopped kleidi left", extra={"directory": directory})


class RemoteFront:
    """The TCP listener of serve_remote, on an event loop of its own thread: TLS handshake, allow-list, then the
    splice to the internal gRPC server's unix socket."""

    def __init__(self, cfg: ServeRemoteConfig, metrics: Metrics) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._tls = ServerTls(cfg, metrics)  # a missing or bad file stops the start here, naming the setting
        self._allowed = {_normal_name(name) for name in cfg.allowed_client_names}
        self._directory: str | None = None
        self._directory_lock: int | None = None
        self.socket_path = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kleidi-remote", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._open: set[tuple[_Pipe, _Pipe]] = set()
        # Counted on the loop's thread only. _connections are past the handshake, from the allow-list check on.
        self._handshakes = 0
        self._handshakes_from: dict[str, int] = {}
        self._connections = 0
        self._max_handshakes = remote_guard.MAX_HANDSHAKES
        self._max_handshakes_per_host = remote_guard.MAX_HANDSHAKES_PER_HOST
        self._max_connections = remote_guard.connection_limit(remote_guard.MAX_CONNECTIONS)
        self._refusals = remote_guard.RefusalLog(self._loop, remote_guard.REFUSAL_LOG_WINDOW)

    def make_socket_dir(self, near: str) -> str:
        """A private directory (0700) for the internal socket, in ``near`` (the KMS socket's directory, which is
        known to be writable even on a read-only root filesystem) or, when that path would be too long, in the
        temp directory. Returns the socket's path."""
        for parent in (near, None):
            if parent is not None and len(os.path.join(parent, "kleidi-remote-XXXXXXXX", "s")) > _MAX_SOCKET_PATH:
                continue
            remove_stale_dirs(parent if parent is not None else tempfile.gettempdir())
            try:
                self._directory = tempfile.mkdtemp(prefix="kleidi-remote-", dir=parent)
            except OSError as exc:
                if parent is None:
                    raise ConfigError(
                        f"serve_remote: cannot make a private directory for the internal socket: {exc.strerror}"
                    ) from None
                continue
            break
        assert self._directory is not None
        # Held until stop: it tells this directory from a stale one to any kleidi that starts meanwhile.
        self._directory_lock = _lock(self._directory)
        self.socket_path = os.path.join(self._directory, "s")
        return self.socket_path

    def start(self) -> None:
        """Listen on serve_remote.listen; a port that cannot be bound is a ConfigError."""
        self._thread.start()
        if self._max_connections < remote_guard.MAX_CONNECTIONS:
            log.info(
                "serve_remote holds fewer connections than it could: the open-file limit (RLIMIT_NOFILE) is low",
                extra={"max_connections": self._max_connections},
            )
        host, port = self._cfg.address
        try:
            asyncio.run_coroutine_threadsafe(self._listen(host, port), self._loop).result(30)
        except OSError as exc:  # asyncio's message repeats the address; the errno's words are enough
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConfigError(f"serve_remote.listen: cannot listen on {self._cfg.listen}: {reason}") from None

    async def _listen(self, host: str, port: int) -> None:
        self._server = await self._loop.create_server(lambda: _Accept(self), host, port, reuse_address=True)

    def spawn(self, raw: asyncio.Transport) -> None:
        peername = raw.get_extra_info("peername")
        host = _host(peername)
        over = self._over_limit(host)
        if over:  # closed before any TLS work: a flood costs an accept, a close and a count
            raw.abort()
            self._refuse(host, "over_limit", {"peer": _address(peername), "reason": over})
            return
        self._handshakes += 1
        self._handshakes_from[host] = self._handshakes_from.get(host, 0) + 1
        task = self._loop.create_task(self._handle(raw, host))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _over_limit(self, host: str) -> str:
        """Why a new connection from ``host`` is not taken now, or "" when it is."""
        if self._connections >= self._max_connections:
            return f"{self._connections} connections open, the most serve_remote holds"
        if self._handshakes >= self._max_handshakes:
            return f"{self._handshakes} TLS handshakes in progress, the most serve_remote holds"
        if self._handshakes_from.get(host, 0) >= self._max_handshakes_per_host:
            return f"{self._max_handshakes_per_host} TLS handshakes in progress from this address, the most from one"
        return ""

    def _handshake_ended(self, host: str) -> None:
        self._handshakes -= 1
        left = self._handshakes_from[host] - 1
        if left:
            self._handshakes_from[host] = left
        else:
            del self._handshakes_from[host]

    def _refuse(self, host: str, result: str, extra: dict[str, Any]) -> None:
        self._metrics.remote_connections.labels(result).inc()
        self._refusals.refused(host, result, extra)

    async def _handle(self, raw: asyncio.Transport, host: str) -> None:
        peer = _address(raw.get_extra_info("peername"))
        outer = _Pipe(self._loop)
        try:
            tls = await self._loop.start_tls(
                raw, outer, self._tls.context(), server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
            )
        except (OSError, TimeoutError, EOFError) as exc:  # ssl.SSLError is an OSError
            raw.abort()
            self._refuse(host, "handshake", {"peer": peer, "reason": handshake_reason(exc)})
            return
        finally:
            self._handshake_ended(host)
        if tls is None:  # the peer went away as the handshake ended
            return
        outer.transport = tls
        common_name, names = peer_names(tls.get_extra_info("peercert") or {})
        identity = {"peer": peer, "subject_cn": common_name, "names": names}
        if self._allowed and self._allowed.isdisjoint(names):
            tls.abort()
            self._refuse(host, "not_allowed", {**identity, "reason": "not on serve_remote.allowed_client_names"})
            return
        if self._connections >= self._max_connections:  # filled up while this one was in its handshake
            tls.abort()
            reason = f"{self._connections} connections open, the most serve_remote holds"
            self._refuse(host, "over_limit", {**identity, "reason": reason})
            return
        self._connections += 1
        try:
            await self._splice(tls, outer, identity)
        finally:
            self._connections -= 1

    async def _splice(self, tls: asyncio.Transport, outer: _Pipe, identity: dict[str, Any]) -> None:
        tls.pause_reading()  # until the other side is there
        try:
            _, inner = await self._loop.create_unix_connection(lambda: _Pipe(self._loop), self.socket_path)
        except OSError as exc:
            tls.abort()
            log.error("cannot reach the internal gRPC server", extra={**identity, "reason": str(exc)})
            return
        self._metrics.remote_connections.labels("accepted").inc()
        self._metrics.remote_connections_open.inc()
        log.info("remote connection accepted", extra=identity)
        pair = (outer, inner)
        self._open.add(pair)
        try:
            link(outer, inner)
            tls.resume_reading()
            await asyncio.gather(outer.closed, inner.closed)
        finally:
            self._open.discard(pair)
            self._metrics.remote_connections_open.dec()
            log.debug("remote connection closed", extra=identity)

    def close_listener(self) -> None:
        """No new connection from here on; the open ones keep being served."""
        if self._server is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._close_listener(), self._loop).result(10)

    async def _close_listener(self) -> None:
        assert self._server is not None
        self._server.close()

    def stop(self) -> None:
        """Close what is still open (after the drain), stop the loop, and remove the private directory."""
        if self._loop.is_running():
            self.close_listener()
            asyncio.run_coroutine_threadsafe(self._abort_all(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None
        if self._directory_lock is not None:
            os.close(self._directory_lock)
            self._directory_lock = None

    async def _abort_all(self) -> None:
        for pair in list(self._open):
            for pipe in pair:
                if pipe.transport is not None:
                    pipe.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._refusals.flush()
