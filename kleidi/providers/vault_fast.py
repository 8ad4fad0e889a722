"""The fast path for transit encrypt/decrypt: one attempt over asyncio keep-alive connections, on the gRPC
event loop itself.

Handing a call to a worker thread and back costs two thread wake-ups (docs/performance.md measures what this
path buys). So the common case (a valid token, a reachable Vault, a 200 answer) runs on
the loop without blocking it: the socket I/O is awaited. Anything else (no token yet, a refusal, a transport
error, a 4xx/5xx) returns None and the caller takes the regular path on a worker thread, which owns every
retry, re-login and error decision. There is one policy, and this is only its shortcut."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from typing import Any

from kleidi.providers.vault_http import Reply, VaultHttp

# Idle connections kept for the fast path (one loop thread uses them; a burst opens more, then trims).
_POOL_SIZE = 16
# Bigger answers are not transit encrypt/decrypt answers: refuse rather than buffer them.
_MAX_BODY = 64 * 1024
_LINE_BREAK = re.compile(r"[\r\n\0]")


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def usable(self) -> bool:
        # An idle keep-alive connection the server has closed shows EOF: not reusable.
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class FastTransit:
    """One attempt of a transit request over a pooled asyncio connection; None whenever it did not simply work."""

    def __init__(self, http: VaultHttp) -> None:
        self._http = http
        self._idle: list[_Connection] = []
        self._tls_generation = 0
        self._busy = 0

    async def post(
        self, path: str, operation: str, token: str, payload: dict[str, Any], timeout: float
    ) -> Reply | None:
        if self._busy >= _POOL_SIZE:
            return None  # a burst beyond the pool: the worker path (bounded by ``workers``) takes the rest
        http = self._http
        try:
            request = post_request(http.host, http.port, http.target(path), http.headers(token), payload)
        except ValueError:
            return None  # a header http.client would refuse too: the regular path reports it
        self._busy += 1
        started = time.perf_counter()
        status = "error"
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(timeout):
                conn = await self._connection()
                if conn is None:
                    return None
                conn.writer.write(request)
                code, keep_alive, data = await _read_response(conn.reader)
            status = str(code)
            if keep_alive and len(self._idle) < _POOL_SIZE:
                self._idle.append(conn)
            else:
                conn.close()
            return Reply.parse(code, data)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            status = "timeout" if isinstance(exc, TimeoutError) else "error"
            if conn is not None:
                conn.close()
            return None  # the regular path will try again, and report what is wrong
        except BaseException:  # cancelled (the caller's deadline): a half-read connection is never reused
            status = "cancelled"
            if conn is not None:
                conn.close()
            raise
        finally:
            self._busy -= 1
            http.record(operation, status, time.perf_counter() - started)

    async def _connection(self) -> _Connection | None:
        http = self._http
        if self._tls_generation != http.tls_generation:  # certificates were re-read (cert login): reconnect
            self._tls_generation = http.tls_generation
            self.close()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                return conn
            conn.close()
        tls = None
        if http.scheme == "https":
            # Loading certificate files is blocking work: the regular path does it on a worker, this path
            # only borrows the result, and steps aside until there is one.
            tls = http.built_tls_context()
            if tls is None:
                return None
        reader, writer = await asyncio.open_connection(
            http.host, http.port, ssl=tls, server_hostname=http.host if tls else None
        )
        return _Connection(reader, writer)

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(RuntimeError):  # the loop may be closed already at shutdown
                conn.close()


def post_request(host: str, port: int, target: str, headers: dict[str, str], payload: dict[str, Any]) -> bytes:
    """The bytes of one HTTP/1.1 POST with a JSON body. Raises ValueError for a line break in any header, which
    would otherwise write headers of its own (the checks http.client makes)."""
    body = json.dumps(payload).encode()
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 address is bracketed
    lines = [f"POST {target} HTTP/1.1", f"Host: {authority}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if any(_LINE_BREAK.search(line) for line in lines):
        raise ValueError("a line break in a request header")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """Status code, whether the connection may be reused, and the body of one HTTP/1.1 response."""
    status_line = await reader.readline()
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError("not an HTTP/1.x response")
    code = int(parts[1])
    length: int | None = None
    chunked = False
    keep_alive = parts[0] == b"HTTP/1.1"
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            break
        if not line:
            raise ValueError("connection closed in the headers")
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value
        elif name == b"connection":
            keep_alive = value == b"keep-alive" or (keep_alive and value != b"close")
    if chunked:
        body = bytearray()
        while True:
            size = int((await reader.readline()).split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            if len(body) + size > _MAX_BODY:
                raise ValueError("response too large")
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        return code, keep_alive, bytes(body)
    if length is None:  # delimited by the server closing the connection
        body = bytearray()
        while chunk := await reader.read(_MAX_BODY):
            body += chunk
            if len(body) > _MAX_BODY:
                raise ValueError("response too large")
        return code, False, bytes(body)
    if length > _MAX_BODY:
        raise ValueError("response too large")
    return code, keep_alive, await reader.readexactly(length)
