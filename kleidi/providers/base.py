"""The Provider protocol every backend implements."""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol, cast

from kleidi.errors import InvalidInput

# Set by the server while it runs a call inline on its event loop: the provider must then never wait or
# reconnect, and raises kleidi.errors.WouldBlock instead, so the server hands the call to a worker.
INLINE: ContextVar[bool] = ContextVar("kleidi_inline", default=False)

# A provider that retries or fails over gives up this long before the caller's deadline, so the caller gets
# kleidi's reason rather than a bare DEADLINE_EXCEEDED.
DEADLINE_MARGIN = 0.025


@dataclass(frozen=True, slots=True)
class Wrapped:
    """What Encrypt returns: the wrapped blob, the KEK that made it, and clear-text annotations."""

    ciphertext: bytes
    key_id: str
    annotations: Mapping[str, bytes] = field(default_factory=dict)


class Provider(Protocol):
    """A key-encryption-key backend.

    Contract (docs/kms-contract.md):
    - ``key_id()`` names the KEK new encryptions use; stable while the KEK is the same,
      different for a different key, never reused. It is answered from memory.
    - ``encrypt`` returns a ``Wrapped`` whose key_id equals ``key_id()`` at the time of the call.
    - ``decrypt`` works for every KEK that ever produced data still stored, not only the current one,
      and never returns a wrong plaintext: tampering raises ``IntegrityError``.
    - ``check`` does a real round trip against the backend and refreshes ``key_id()``;
      the server calls it from its health loop, never from a request.
    - Every failure is a ``kleidi.errors.KleidiError`` subclass.
    """

    name: str

    @property
    def inline_safe(self) -> bool:
        """True only while an encrypt/decrypt would finish in well under a millisecond and cannot block on
        a network, a device or a lock: the server then runs it on its event loop instead of a worker thread.
        Read before every call, so a provider can say no while it is reconnecting or busy."""
        ...

    def key_id(self) -> str:
        """The current KEK identity, from memory."""
        ...

    def encrypt(self, plaintext: bytes, uid: str, deadline: float | None = None) -> Wrapped:
        """Wrap a data key under the current KEK.

        ``deadline`` is a ``time.monotonic()`` instant (the caller's gRPC deadline): retries stop there."""
        ...

    def decrypt(
        self,
        ciphertext: bytes,
        key_id: str,
        annotations: Mapping[str, bytes],
        uid: str,
        deadline: float | None = None,
    ) -> bytes:
        """Unwrap a blob made by any KEK this backend still holds. ``key_id`` is empty for KMS v1."""
        ...

    def check(self) -> None:
        """A real encrypt+decrypt round trip against the backend; raises on failure."""
        ...

    def close(self) -> None:
        """Release sessions, connections and background work."""
        ...


class FastPath(Protocol):
    """Optional, for backends reached over the network: one attempt of Encrypt/Decrypt awaited on the server's
    event loop, skipping the hand-off to a worker thread. None means "not now": the server then calls the
    regular ``encrypt``/``decrypt`` on a worker, which owns retries and errors. May raise InvalidInput."""

    async def encrypt_fast(self, plaintext: bytes, deadline: float | None = None) -> Wrapped | None: ...

    async def decrypt_fast(
        self, ciphertext: bytes, key_id: str, annotations: Mapping[str, bytes], deadline: float | None = None
    ) -> bytes | None: ...

    def close_fast(self) -> None:
        """Close what the fast path holds; called on the event loop before it stops."""
        ...


def reject_annotations(annotations: Mapping[str, bytes], provider: str) -> None:
    """For providers that write no annotations: any on a Decrypt request did not come from them."""
    if annotations:
        names = ", ".join(sorted(annotations))[:200]
        raise InvalidInput(f"unexpected annotations ({names}): kleidi's {provider} provider writes none")


def fast_path(provider: Provider) -> FastPath | None:
    """The provider's fast path, if it has one."""
    return cast(FastPath, provider) if callable(getattr(provider, "encrypt_fast", None)) else None
