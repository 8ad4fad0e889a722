"""The wrapped-key format the PKCS#11 provider writes: self-describing, versioned, under 1 kB.

    header = "kl" | version | mechanism | (len | key label) ... | key fingerprint (8 bytes)
    aes-gcm:      header | IV (12) | ciphertext | tag (16)     -- AAD = header
    aes-cbc-hmac: header | IV (16) | ciphertext | MAC (32)     -- MAC = HMAC-SHA256(header | IV | ciphertext)

The header names the key by label and fingerprint, so a blob finds its KEK after a rotation
and a key that merely reuses a label is never mistaken for the one that wrapped the data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from kleidi.errors import InvalidInput

MAGIC: Final = b"kl"
VERSION: Final = 1
FINGERPRINT_BYTES: Final = 8
GCM_IV_BYTES: Final = 12
GCM_TAG_BYTES: Final = 16
CBC_IV_BYTES: Final = 16
AES_BLOCK: Final = 16
MAC_BYTES: Final = 32

Mechanism = Literal["aes-gcm", "aes-cbc-hmac"]
_MECH_CODE: Final[dict[str, int]] = {"aes-gcm": 1, "aes-cbc-hmac": 2}
_MECH_NAME: Final[dict[int, Mechanism]] = {1: "aes-gcm", 2: "aes-cbc-hmac"}
# How many key labels each mechanism's header carries: the AES key, plus the HMAC key for aes-cbc-hmac.
_LABELS: Final[dict[str, int]] = {"aes-gcm": 1, "aes-cbc-hmac": 2}


@dataclass(frozen=True, slots=True)
class KeyRef:
    """Which KEK (one AES key, or an AES key plus an HMAC key) wrapped a blob."""

    mechanism: Mechanism
    labels: tuple[str, ...]
    fingerprint: bytes

    def header(self) -> bytes:
        parts = [MAGIC, bytes((VERSION, _MECH_CODE[self.mechanism]))]
        for label in self.labels:
            raw = label.encode()
            parts.append(bytes((len(raw),)) + raw)
        parts.append(self.fingerprint)
        return b"".join(parts)

    @property
    def key_id(self) -> str:
        """Derived from the key material (through the fingerprint), so it is stable and never reused."""
        return f"pkcs11:{self.mechanism}:{'+'.join(self.labels)}:{self.fingerprint.hex()}"


@dataclass(frozen=True, slots=True)
class Blob:
    ref: KeyRef
    header: bytes
    iv: bytes
    ciphertext: bytes  # for aes-gcm this includes the tag
    mac: bytes  # aes-cbc-hmac only


def parse(blob: bytes) -> Blob:
    """Split a blob into its parts, rejecting anything kleidi could not have written."""
    if len(blob) < 4 or blob[:2] != MAGIC:
        raise InvalidInput("ciphertext was not made by kleidi's pkcs11 provider (bad magic)")
    if blob[2] != VERSION:
        raise InvalidInput(f"ciphertext format version {blob[2]} is not supported (this kleidi reads {VERSION})")
    mechanism = _MECH_NAME.get(blob[3])
    if mechanism is None:
        raise InvalidInput(f"ciphertext names unknown mechanism {blob[3]}")
    pos = 4
    labels = []
    for _ in range(_LABELS[mechanism]):
        if pos >= len(blob):
            raise InvalidInput("ciphertext is truncated (in the key reference)")
        size = blob[pos]
        label = blob[pos + 1 : pos + 1 + size]
        if size == 0 or len(label) != size:
            raise InvalidInput("ciphertext is truncated (in the key reference)")
        try:
            labels.append(label.decode())
        except UnicodeDecodeError:
            raise InvalidInput("ciphertext key reference is not valid UTF-8") from None
        pos += 1 + size
    fingerprint = blob[pos : pos + FINGERPRINT_BYTES]
    pos += FINGERPRINT_BYTES
    if len(fingerprint) != FINGERPRINT_BYTES:
        raise InvalidInput("ciphertext is truncated (in the key reference)")
    header, rest = blob[:pos], blob[pos:]
    ref = KeyRef(mechanism, tuple(labels), fingerprint)
    if mechanism == "aes-gcm":
        if len(rest) < GCM_IV_BYTES + GCM_TAG_BYTES + 1:
            raise InvalidInput("ciphertext is truncated (shorter than IV and tag)")
        return Blob(ref, header, rest[:GCM_IV_BYTES], rest[GCM_IV_BYTES:], b"")
    body = rest[CBC_IV_BYTES:-MAC_BYTES]
    if len(rest) < CBC_IV_BYTES + AES_BLOCK + MAC_BYTES or len(body) % AES_BLOCK:
        raise InvalidInput("ciphertext is truncated (not IV, whole AES blocks and a MAC)")
    return Blob(ref, header, rest[:CBC_IV_BYTES], body, rest[-MAC_BYTES:])
