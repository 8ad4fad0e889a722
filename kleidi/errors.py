"""The one error hierarchy every kleidi component raises, and its gRPC mapping."""

from __future__ import annotations

import grpc


class KleidiError(Exception):
    """Root of kleidi's errors. Messages are safe to log and to return to a client:
    they never carry a PIN, a token, plaintext or key material."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    kind: str = "internal"


class ConfigError(KleidiError):
    """The configuration is missing, malformed or names something that does not exist."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    kind = "config"


class InvalidInput(KleidiError):
    """The request is malformed: garbage or truncated ciphertext, bad annotations, oversize."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    kind = "invalid_input"


class IntegrityError(InvalidInput):
    """The ciphertext failed authentication: tampered, or made by a different key."""

    kind = "integrity"


class KeyNotFound(KleidiError):
    """The key a ciphertext or key_id refers to is not (or no longer) in the backend."""

    code = grpc.StatusCode.NOT_FOUND
    kind = "key_not_found"


class BackendUnavailable(KleidiError):
    """The backend cannot be reached or is not ready (token gone, Vault sealed, timeout)."""

    code = grpc.StatusCode.UNAVAILABLE
    kind = "backend_unavailable"


class AuthFailed(KleidiError):
    """The backend refused kleidi's credentials (wrong PIN, expired or revoked token)."""

    code = grpc.StatusCode.UNAVAILABLE
    kind = "auth_failed"


class WouldBlock(BackendUnavailable):
    """An inline call (on the server's event loop) would have to wait; the server hands it to a worker instead."""

    kind = "would_block"


class DeadlinePassed(BackendUnavailable):
    """The caller's deadline passed before its request reached the backend: load, not a backend failure."""

    kind = "deadline_passed"
