"""kleidi's encrypted backup file: a tar of a KEK store, sealed with AES-256-GCM under a key derived from the
operator's passphrase with scrypt. Used on the nodes by the kleidi_backup role's modules; the store is encrypted
before it leaves the node and decrypted only on the node it is restored to.

Why this construction (docs/rotation.md, "Backing up the KEK store"): `openssl enc` has no authenticated mode (it
refuses GCM) and takes an HMAC key only as an argument, and the `cryptography` package is on no node by default.
The node's Python already links OpenSSL's libcrypto (hashlib), so this calls libcrypto's AES-256-GCM through ctypes,
as kleidi's own PKCS#11 fast path calls its module, and takes scrypt from hashlib. Nothing secret is ever in a
process's arguments or environment: the passphrase reaches the module as a (no_log) module argument.

File layout (all integers big-endian):

    MAGIC (8 bytes) | header length (4 bytes) | header (JSON, UTF-8) | ciphertext | GCM tag (16 bytes)

The header holds no secret: the cipher, the KDF and its parameters and salt, the GCM nonce, a 16-byte passphrase
check value and ``meta`` (what the backup holds: backend, node, token serial, key labels...). Everything before
the ciphertext is the GCM additional data, so the header cannot be changed without the tag failing. The check value
is HMAC-SHA256 under the second half of the scrypt output: a wrong passphrase is told apart from a damaged file.
It gives an attacker nothing that decrypting with a guessed passphrase would not: each guess costs one scrypt."""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import hashlib
import hmac
import io
import json
import os
import posixpath
import struct
import tarfile

MAGIC = b"KLDIBAK1"
_TAG = 16
_NONCE = 12
# scrypt with N=2^16, r=8, p=1 takes 64 MiB and about half a second: a guessed passphrase costs as much.
SCRYPT = {"n": 1 << 16, "r": 8, "p": 1}
_MAX_SCRYPT_N = 1 << 20
_MAX_HEADER = 1 << 20
MAX_ARCHIVE = 256 << 20
_CHECK_LABEL = b"kleidi backup passphrase check"

# EVP_CTRL_AEAD_SET_IVLEN, EVP_CTRL_AEAD_GET_TAG, EVP_CTRL_AEAD_SET_TAG (the same values in OpenSSL 1.1 and 3).
_SET_IVLEN, _GET_TAG, _SET_TAG = 0x9, 0x10, 0x11


class BackupError(Exception):
    """A backup that cannot be opened; the message says why and never holds a secret."""


class WrongPassphrase(BackupError):
    pass


class Damaged(BackupError):
    pass


def _libcrypto():
    """The libcrypto this Python's hashlib uses (so no second OpenSSL is loaded), else the system's."""
    import _hashlib  # noqa: F401  (loads libcrypto into the process)

    path = None
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                name = line.split()[-1] if line.split() else ""
                if posixpath.basename(name).startswith("libcrypto.so"):
                    path = name
                    break
    except OSError:
        path = None
    path = path or ctypes.util.find_library("crypto")
    if not path:
        raise BackupError("OpenSSL's libcrypto is not found on this node (python3 uses it for hashlib)")
    lib = ctypes.CDLL(path)
    vp, cp, ip = ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)
    lib.EVP_CIPHER_CTX_new.restype = vp
    lib.EVP_CIPHER_CTX_new.argtypes = []
    lib.EVP_CIPHER_CTX_free.restype = None
    lib.EVP_CIPHER_CTX_free.argtypes = [vp]
    lib.EVP_aes_256_gcm.restype = vp
    lib.EVP_aes_256_gcm.argtypes = []
    for name in ("EVP_EncryptInit_ex", "EVP_DecryptInit_ex"):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = [vp, vp, vp, cp, cp]
    for name in ("EVP_EncryptUpdate", "EVP_DecryptUpdate"):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = [vp, vp, ip, cp, ctypes.c_int]
    for name in ("EVP_EncryptFinal_ex", "EVP_DecryptFinal_ex"):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = [vp, vp, ip]
    lib.EVP_CIPHER_CTX_ctrl.restype = ctypes.c_int
    lib.EVP_CIPHER_CTX_ctrl.argtypes = [vp, ctypes.c_int, ctypes.c_int, vp]
    return lib


def _gcm(key, nonce, aad, data, tag=None):
    """AES-256-GCM. Without ``tag``: encrypt, returns ciphertext + tag. With it: decrypt, returns the plaintext or
    raises Damaged when the tag does not verify."""
    if len(key) != 32 or len(nonce) != _NONCE:
        raise ValueError("AES-256-GCM takes a 32-byte key and a 12-byte nonce")
    if len(data) > MAX_ARCHIVE + _TAG:
        raise BackupError(f"more than {MAX_ARCHIVE} bytes: not a KEK store")
    lib = _libcrypto()
    encrypt = tag is None
    init = lib.EVP_EncryptInit_ex if encrypt else lib.EVP_DecryptInit_ex
    update = lib.EVP_EncryptUpdate if encrypt else lib.EVP_DecryptUpdate
    final = lib.EVP_EncryptFinal_ex if encrypt else lib.EVP_DecryptFinal_ex
    ctx = lib.EVP_CIPHER_CTX_new()
    if not ctx:
        raise BackupError("libcrypto could not allocate a cipher context")
    try:
        length = ctypes.c_int(0)
        ok = init(ctx, lib.EVP_aes_256_gcm(), None, None, None)
        ok = ok and lib.EVP_CIPHER_CTX_ctrl(ctx, _SET_IVLEN, _NONCE, None)
        ok = ok and init(ctx, None, None, key, nonce)
        ok = ok and update(ctx, None, ctypes.byref(length), aad, len(aad))
        out = ctypes.create_string_buffer(len(data) + _TAG)
        ok = ok and update(ctx, ctypes.addressof(out), ctypes.byref(length), data, len(data))
        if not ok:
            raise BackupError("libcrypto's AES-256-GCM failed")
        produced = length.value
        if not encrypt:
            expected = ctypes.create_string_buffer(bytes(tag), _TAG)
            if not lib.EVP_CIPHER_CTX_ctrl(ctx, _SET_TAG, _TAG, ctypes.addressof(expected)):
                raise BackupError("libcrypto's AES-256-GCM refused the tag")
        if not final(ctx, ctypes.addressof(out) + produced, ctypes.byref(length)):
            if encrypt:
                raise BackupError("libcrypto's AES-256-GCM failed")
            raise Damaged(
                "the backup failed its integrity check (AES-256-GCM tag): it was altered or damaged after it was "
                "written; nothing was restored"
            )
        produced += length.value
        result = out.raw[:produced]
        if encrypt:
            got = ctypes.create_string_buffer(_TAG)
            if not lib.EVP_CIPHER_CTX_ctrl(ctx, _GET_TAG, _TAG, ctypes.addressof(got)):
                raise BackupError("libcrypto's AES-256-GCM did not give its tag")
            result += got.raw
        return result
    finally:
        lib.EVP_CIPHER_CTX_free(ctx)


def _keys(passphrase, salt, n, r, p):
    if not (1 < n <= _MAX_SCRYPT_N and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        raise Damaged("the backup's scrypt parameters are out of range: the file is damaged")
    derived = hashlib.scrypt(passphrase.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 << 20, dklen=64)
    key, check_key = derived[:32], derived[32:]
    return key, hmac.new(check_key, _CHECK_LABEL, hashlib.sha256).digest()[:16]


def seal(plaintext, passphrase, meta, scrypt=None):
    """The backup file's bytes: ``plaintext`` (the tar) encrypted under ``passphrase``, with ``meta`` in the header."""
    params = dict(SCRYPT if scrypt is None else scrypt)
    salt, nonce = os.urandom(16), os.urandom(_NONCE)
    key, check = _keys(passphrase, salt, params["n"], params["r"], params["p"])
    header = {
        "format": 1,
        "cipher": "aes-256-gcm",
        "kdf": {"name": "scrypt", **params, "salt": base64.b64encode(salt).decode()},
        "nonce": base64.b64encode(nonce).decode(),
        "check": base64.b64encode(check).decode(),
        "content": "tar",
        "meta": meta,
    }
    raw_header = json.dumps(header, sort_keys=True).encode("utf-8")
    aad = MAGIC + struct.pack(">I", len(raw_header)) + raw_header
    return aad + _gcm(key, nonce, aad, plaintext)


def read_header(blob):
    """The header and the additional data of a backup file's bytes, without the passphrase. Raises Damaged."""
    if len(blob) < len(MAGIC) + 4 or blob[: len(MAGIC)] != MAGIC:
        raise Damaged("not a kleidi backup file (its first bytes are not " + MAGIC.decode() + ")")
    (size,) = struct.unpack(">I", blob[len(MAGIC) : len(MAGIC) + 4])
    end = len(MAGIC) + 4 + size
    if size > _MAX_HEADER or len(blob) < end + _TAG:
        raise Damaged("the backup file is truncated or damaged (its header length is impossible)")
    try:
        header = json.loads(blob[len(MAGIC) + 4 : end].decode("utf-8"))
        if header["format"] != 1 or header["cipher"] != "aes-256-gcm" or header["kdf"]["name"] != "scrypt":
            raise Damaged(f"unknown backup format {header.get('format')!r} / {header.get('cipher')!r}")
        for field in ("salt",):
            base64.b64decode(header["kdf"][field], validate=True)
        for field in ("nonce", "check"):
            base64.b64decode(header[field], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise Damaged(f"the backup file's header is damaged ({type(exc).__name__})") from None
    return header, blob[:end]


def open_sealed(blob, passphrase):
    """(header, plaintext) of a backup file's bytes. Raises WrongPassphrase or Damaged; never unverified data."""
    header, aad = read_header(blob)
    kdf = header["kdf"]
    key, check = _keys(passphrase, base64.b64decode(kdf["salt"]), int(kdf["n"]), int(kdf["r"]), int(kdf["p"]))
    if not hmac.compare_digest(check, base64.b64decode(header["check"])):
        raise WrongPassphrase(
            "kleidi_backup_passphrase does not open this backup (it is not the passphrase the backup was made with); "
            "nothing was restored"
        )
    body = blob[len(aad) :]
    plaintext = _gcm(key, base64.b64decode(header["nonce"]), aad, body[:-_TAG], tag=body[-_TAG:])
    return header, plaintext


# --- the tar inside -------------------------------------------------------------------------------------------------


def make_tar(files):
    """A tar of ``files`` ({relative path: bytes}); directories are implied, owners and times normalised, so the
    archive says nothing but names and contents."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({posixpath.dirname(name) for name in files} - {""})
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o700
            tar.addfile(info)
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(files[name]), 0o600
            tar.addfile(info, io.BytesIO(files[name]))
    return out.getvalue()


def safe_name(name):
    """A member name that stays inside the directory it is extracted to, else None."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(part in ("", ".", "..") for part in parts):
        return None
    return name


def read_tar(data):
    """{relative path: bytes} of the regular files in a tar made by make_tar. Raises Damaged on anything else
    (links, devices, absolute or escaping names)."""
    files = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar.getmembers():
                name = safe_name(member.name.rstrip("/") if member.isdir() else member.name)
                if name is None or not (member.isfile() or member.isdir()):
                    raise Damaged(
                        f"the backup holds an entry kleidi never writes ({member.name!r}); nothing was restored"
                    )
                if member.isfile():
                    handle = tar.extractfile(member)
                    files[name] = handle.read() if handle is not None else b""
    except tarfile.TarError as exc:
        raise Damaged(f"the backup's archive is damaged ({exc}); nothing was restored") from None
    return files
