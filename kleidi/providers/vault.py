"""Vault / OpenBao transit: data keys wrapped by a named transit key, key versions as KEK rotations."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from typing import Any

from kleidi.config import VaultConfig
from kleidi.errors import (
    AuthFailed,
    BackendUnavailable,
    ConfigError,
    IntegrityError,
    InvalidInput,
    KeyNotFound,
    KleidiError,
)
from kleidi.observability import Metrics
from kleidi.providers.base import Wrapped, reject_annotations
from kleidi.providers.vault_auth import VaultAuth
from kleidi.providers.vault_fast import FastTransit
from kleidi.providers.vault_http import Reply, VaultHttp

log = logging.getLogger("kleidi.vault")

# A transit ciphertext: "vault:v<version>:<base64>". The version says which key version made it.
_CIPHERTEXT = re.compile(r"vault:v([1-9][0-9]{0,9}):[A-Za-z0-9+/]+={0,2}")


def _final(reply: Reply) -> bool:
    """A transit answer that asking again, or logging in again, cannot change (400 bad input, 404 no key)."""
    return reply.status in (400, 404)


class VaultProvider:
    """KEKs are the versions of one transit key; the ciphertext is transit's own ``vault:vN:...`` string.

    key_id is ``vault:<hash of address, namespace, mount and key name>:v<version>:<hash of that version's
    creation time>``; the last part keeps a key deleted and re-created under the same name from reusing an old
    key_id. ``check`` reads the key's latest version, proves it and publishes it, so a rotation in Vault shows in
    Status within one health interval; Encrypt asks transit for exactly the published version, so its key_id
    always agrees with Status. Decrypt takes the version from the ciphertext, so data written under any version
    Vault still allows decrypts."""

    name = "vault"
    inline_safe = False  # every call is an HTTP round trip that can wait out its timeout

    def __init__(self, config: VaultConfig, metrics: Metrics) -> None:
        self._config = config
        self._http = VaultHttp(config, metrics)
        self._auth = VaultAuth(config, self._http, metrics)
        self._fast = FastTransit(self._http)
        self._metrics = metrics
        mount = config.transit_mount.strip("/")
        key = config.key_name
        self._describe = f"transit key {key} at {mount}/"
        self._read_path = f"{mount}/keys/{key}"
        self._encrypt_path = f"{mount}/encrypt/{key}"
        self._decrypt_path = f"{mount}/decrypt/{key}"
        identity = "|".join((self._http.address, config.namespace.strip("/"), mount, key))
        self._key_prefix = "vault:" + hashlib.sha256(identity.encode()).hexdigest()[:16] + ":v"
        self._version = 0
        self._key_id = ""
        # Creation time of each key version, as transit reports it: part of that version's key_id.
        self._created: dict[int, str] = {}
        self._key_lock = threading.Lock()
        self._seconds = {op: metrics.backend_seconds.labels(self.name, op) for op in ("encrypt", "decrypt", "check")}
        self._auth.start()

    # --- Provider --------------------------------------------------------------------------------------------

    def key_id(self) -> str:
        return self._key_id

    def key_id_for(self, version: int) -> str:
        """The key_id of one version of the configured transit key (known once the key has been read)."""
        created = self._created.get(version)
        if created is None:
            raise BackendUnavailable(f"{self._describe}: version {version} is not in the key's version list")
        return f"{self._key_prefix}{version}:{hashlib.sha256(created.encode()).hexdigest()[:8]}"

    def encrypt(self, plaintext: bytes, uid: str, deadline: float | None = None) -> Wrapped:
        started = time.perf_counter()
        try:
            return self._encrypt(plaintext, self._deadline(deadline))
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
        reject_annotations(annotations, self.name)
        started = time.perf_counter()
        try:
            return self._decrypt(ciphertext, self._deadline(deadline))
        except KleidiError as exc:
            self._metrics.backend_errors.labels(self.name, "decrypt", exc.kind).inc()
            raise
        finally:
            self._seconds["decrypt"].observe(time.perf_counter() - started)

    async def encrypt_fast(self, plaintext: bytes, deadline: float | None = None) -> Wrapped | None:
        """One attempt on the event loop; None sends the caller to ``encrypt`` (see vault_fast)."""
        token, version = self._auth.peek(), self._version
        if token is None or not version:
            return None
        payload = self._encrypt_payload(plaintext, version)
        started = time.perf_counter()
        reply = await self._fast.post(self._encrypt_path, "encrypt", token.value, payload, self._fast_timeout(deadline))
        if reply is None or reply.status != 200:
            if reply is not None and _final(reply) and "version" not in " ".join(reply.errors):
                raise self._error(reply, "encrypt")
            return None
        try:
            ciphertext, answered = self._transit_ciphertext(reply)
        except KleidiError:
            return None  # an odd answer: the regular path asks again and reports it
        if answered not in self._created:
            return None
        self._seconds["encrypt"].observe(time.perf_counter() - started)
        return Wrapped(ciphertext, self.key_id_for(answered))

    async def decrypt_fast(
        self, ciphertext: bytes, key_id: str, annotations: Mapping[str, bytes], deadline: float | None = None
    ) -> bytes | None:
        """One attempt on the event loop; None sends the caller to ``decrypt`` (see vault_fast)."""
        reject_annotations(annotations, self.name)
        payload = self._decrypt_payload(ciphertext)
        token = self._auth.peek()
        if token is None:
            return None
        started = time.perf_counter()
        reply = await self._fast.post(self._decrypt_path, "decrypt", token.value, payload, self._fast_timeout(deadline))
        if reply is None or reply.status != 200:
            if reply is not None and _final(reply):
                raise self._error(reply, "decrypt")  # tampered, unknown version: asking again would not help
            return None
        try:
            plaintext = self._plaintext(reply)
        except KleidiError:
            return None
        self._seconds["decrypt"].observe(time.perf_counter() - started)
        return plaintext

    def close_fast(self) -> None:
        self._fast.close()

    def _fast_timeout(self, deadline: float | None) -> float:
        # Half of what is left: a fast attempt that stalls still leaves the regular path time to retry.
        left = self._deadline(deadline) - time.monotonic()
        return max(min(self._config.timeout, left / 2), 0.001)

    def check(self) -> None:
        """Read the key's latest version, prove it with an encrypt+decrypt round trip, then publish it.

        Only here does the current version change, so Status (which the health loop builds right after this
        returns) and every Encrypt switch to a rotated version together."""
        started = time.perf_counter()
        deadline = time.monotonic() + self._config.timeout
        try:
            latest = self._refresh_key(deadline)
            probe = os.urandom(32)
            wrapped = self._encrypt(probe, deadline, latest)
            if not hmac.compare_digest(self._decrypt(wrapped.ciphertext, deadline), probe):
                raise KleidiError(f"Vault round trip through {self._describe} returned a different plaintext")
            self._publish(latest)
            left = self._auth.ttl_left()
            if left is not None and left != float("inf"):
                self._metrics.vault_token_ttl.set(left)
        except KleidiError as exc:
            self._metrics.backend_errors.labels(self.name, "check", exc.kind).inc()
            raise
        finally:
            self._seconds["check"].observe(time.perf_counter() - started)

    def close(self) -> None:
        self._auth.close()
        self._fast.close()
        self._http.close()

    # --- transit ---------------------------------------------------------------------------------------------

    def _deadline(self, deadline: float | None) -> float:
        return deadline if deadline is not None else time.monotonic() + self._config.timeout

    def _call(self, method: str, path: str, operation: str, payload: dict[str, Any] | None, deadline: float) -> Reply:
        return self._http.call(method, path, operation, payload, deadline, auth=self._auth)

    def _encrypt(self, plaintext: bytes, deadline: float, version: int = 0) -> Wrapped:
        """Encrypt under ``version``, by default the published one, so the key_id agrees with Status."""
        if not version:
            version = self._version or self._publish(self._refresh_key(deadline))
        payload = self._encrypt_payload(plaintext, version)
        reply = self._call("POST", self._encrypt_path, "encrypt", payload, deadline)
        if reply.status == 400 and "version" in " ".join(reply.errors):
            # The version Status reports can no longer encrypt (min_encryption_version raised): answering with
            # another key_id than Status would break the apiserver's rotation, so fail until the health check
            # (run at once: this is UNAVAILABLE) has proven and published the new version.
            raise BackendUnavailable(f"{self._describe}: version {version} may no longer encrypt; switching versions")
        if reply.status != 200:
            raise self._error(reply, "encrypt")
        ciphertext, answered = self._transit_ciphertext(reply)
        if answered not in self._created:
            self._refresh_key(deadline)
        return Wrapped(ciphertext, self.key_id_for(answered))

    def _encrypt_payload(self, plaintext: bytes, version: int) -> dict[str, Any]:
        return {"plaintext": base64.b64encode(plaintext).decode(), "key_version": version}

    def _transit_ciphertext(self, reply: Reply) -> tuple[bytes, int]:
        ciphertext = reply.data().get("ciphertext")
        match = _CIPHERTEXT.fullmatch(ciphertext) if isinstance(ciphertext, str) else None
        if match is None or not isinstance(ciphertext, str):
            raise BackendUnavailable(f"{self._describe}: encrypt answered without a transit ciphertext")
        return ciphertext.encode("ascii"), int(match.group(1))

    @staticmethod
    def _decrypt_payload(ciphertext: bytes) -> dict[str, Any]:
        """Checked locally first: garbage never costs a Vault round trip."""
        try:
            text = ciphertext.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidInput("ciphertext is not a Vault transit ciphertext (vault:v<N>:<base64>)") from None
        if _CIPHERTEXT.fullmatch(text) is None:
            raise InvalidInput("ciphertext is not a Vault transit ciphertext (vault:v<N>:<base64>)")
        return {"ciphertext": text}

    def _decrypt(self, ciphertext: bytes, deadline: float) -> bytes:
        reply = self._call("POST", self._decrypt_path, "decrypt", self._decrypt_payload(ciphertext), deadline)
        if reply.status != 200:
            raise self._error(reply, "decrypt")
        return self._plaintext(reply)

    def _plaintext(self, reply: Reply) -> bytes:
        encoded = reply.data().get("plaintext")
        if not isinstance(encoded, str):
            raise BackendUnavailable(f"{self._describe}: decrypt answered without a plaintext")
        try:
            return base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise BackendUnavailable(f"{self._describe}: decrypt answered with a malformed plaintext") from None

    def _publish(self, version: int) -> int:
        """Make ``version`` the one Status reports and Encrypt uses."""
        with self._key_lock:
            if version != self._version:
                if self._version:
                    log.info("transit key rotated", extra={"from_version": self._version, "to_version": version})
                self._version = version
                self._key_id = self.key_id_for(version)
        return version

    def _refresh_key(self, deadline: float) -> int:
        """Read the transit key: learn every version's creation time, and return the latest version."""
        reply = self._call("GET", self._read_path, "read_key", None, deadline)
        if reply.status != 200:
            raise self._error(reply, "read_key")
        data = reply.data()
        if data.get("derived"):
            raise ConfigError(f"{self._describe} is a derived key; kleidi needs a key created without derivation")
        if data.get("supports_encryption") is False or data.get("supports_decryption") is False:
            raise ConfigError(f"{self._describe} (type {data.get('type')}) cannot encrypt and decrypt")
        latest = data.get("latest_version")
        if not isinstance(latest, int) or latest < 1:
            raise BackendUnavailable(f"{self._describe}: key read answered without a latest_version")
        created = {}
        for number, info in (data.get("keys") or {}).items():
            # symmetric keys report a Unix time, asymmetric ones an object with creation_time
            stamp = info.get("creation_time") if isinstance(info, dict) else info
            if str(number).isdigit() and stamp is not None:
                created[int(number)] = str(stamp)
        if latest not in created:
            raise BackendUnavailable(f"{self._describe}: key read did not list version {latest}")
        with self._key_lock:
            self._created.update(created)
        return latest

    def _error(self, reply: Reply, operation: str) -> KleidiError:
        """The KleidiError for a final, non-200 transit answer."""
        reason = self._http.reason(reply)
        text = reason.lower()
        if reply.status in (401, 403):
            return AuthFailed(f"Vault refused {operation} on {self._describe}: {reason} (check the token's policy)")
        if reply.status == 404:
            return KeyNotFound(f"{self._describe} not found (is the transit engine mounted and the key created?)")
        if reply.status == 400 and operation == "decrypt":
            if "authentication failed" in text:
                return IntegrityError("ciphertext failed authentication: tampered, or made by another key")
            if "too new" in text or "too old" in text or "disallowed" in text or "not available" in text:
                return KeyNotFound(f"{self._describe} cannot decrypt this ciphertext's key version: {reason}")
            return InvalidInput(f"Vault rejected the ciphertext: {reason}")
        if reply.status == 400:
            return InvalidInput(f"Vault rejected {operation} on {self._describe}: {reason}")
        if 300 <= reply.status < 400:
            return BackendUnavailable(
                f"Vault redirected {operation} (HTTP {reply.status}): point address at the active node or a load"
                " balancer in front of it, or enable request forwarding on standbys"
            )
        if reply.status in (429,) or reply.status >= 500:
            return BackendUnavailable(self._http.transient_reason(reply))
        return BackendUnavailable(f"Vault answered {operation} on {self._describe} with HTTP {reply.status}: {reason}")
