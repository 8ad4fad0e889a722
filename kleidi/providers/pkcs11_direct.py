"""The token calls of a request (AES-GCM, AES-CBC, HMAC-SHA256) and session copies of keys, made straight
through the module's PKCS#11 function list with ctypes.

PyKCS11 stays in charge of everything else (loading, slots, login, sessions, finding objects, attributes).
Its Session.encrypt makes a size-query call before the real one, wraps every argument, and hands back a result
that can only be read one byte at a time; and it holds the GIL while the token works. Here one call fills a
buffer of the known size, and the GIL is released, so calls on other sessions run in parallel.
docs/performance.md measures what this buys (bench/launch.py takes it out for the comparison).

A ``Direct`` belongs to one connection: the function pointers stay valid exactly as long as PyKCS11
keeps that module loaded, which the token pool guarantees while a session of the connection is out."""

from __future__ import annotations

import _ctypes
import ctypes
import os
from typing import Any

import PyKCS11

from kleidi.errors import ConfigError

_ULONG = ctypes.c_ulong  # CK_ULONG is unsigned long on every platform PKCS#11 modules ship for here


class _Mechanism(ctypes.Structure):
    _fields_ = (("mechanism", _ULONG), ("pParameter", ctypes.c_void_p), ("ulParameterLen", _ULONG))


class _GcmParams(ctypes.Structure):
    # PKCS#11 2.40 / 3.0 layout (with ulIvBits), as PyKCS11 and SoftHSM use.
    _fields_ = (
        ("pIv", ctypes.c_char_p),
        ("ulIvLen", _ULONG),
        ("ulIvBits", _ULONG),
        ("pAAD", ctypes.c_char_p),
        ("ulAADLen", _ULONG),
        ("ulTagBits", _ULONG),
    )


# CK_FUNCTION_LIST up to the last entry used here; the order is fixed by the standard (2.x and 3.0).
_FUNCTIONS = [
    "C_Initialize",
    "C_Finalize",
    "C_GetInfo",
    "C_GetFunctionList",
    "C_GetSlotList",
    "C_GetSlotInfo",
    "C_GetTokenInfo",
    "C_GetMechanismList",
    "C_GetMechanismInfo",
    "C_InitToken",
    "C_InitPIN",
    "C_SetPIN",
    "C_OpenSession",
    "C_CloseSession",
    "C_CloseAllSessions",
    "C_GetSessionInfo",
    "C_GetOperationState",
    "C_SetOperationState",
    "C_Login",
    "C_Logout",
    "C_CreateObject",
    "C_CopyObject",
    "C_DestroyObject",
    "C_GetObjectSize",
    "C_GetAttributeValue",
    "C_SetAttributeValue",
    "C_FindObjectsInit",
    "C_FindObjects",
    "C_FindObjectsFinal",
    "C_EncryptInit",
    "C_Encrypt",
    "C_EncryptUpdate",
    "C_EncryptFinal",
    "C_DecryptInit",
    "C_Decrypt",
    "C_DecryptUpdate",
    "C_DecryptFinal",
    "C_DigestInit",
    "C_Digest",
    "C_DigestUpdate",
    "C_DigestKey",
    "C_DigestFinal",
    "C_SignInit",
    "C_Sign",
]


_USED = ("C_EncryptInit", "C_Encrypt", "C_DecryptInit", "C_Decrypt", "C_CopyObject", "C_SignInit", "C_Sign")


class _FunctionList(ctypes.Structure):
    _fields_ = (("version", ctypes.c_ubyte * 2), *((name, ctypes.c_void_p) for name in _FUNCTIONS))


class _Attribute(ctypes.Structure):
    _fields_ = (("type", _ULONG), ("pValue", ctypes.c_void_p), ("ulValueLen", _ULONG))


_FALSE = ctypes.c_ubyte(0)
_SESSION_OBJECT = (_Attribute * 1)(_Attribute(PyKCS11.CKA_TOKEN, ctypes.addressof(_FALSE), 1))

_CRYPT_INIT = ctypes.CFUNCTYPE(_ULONG, _ULONG, ctypes.POINTER(_Mechanism), _ULONG)
_CRYPT = ctypes.CFUNCTYPE(_ULONG, _ULONG, ctypes.c_char_p, _ULONG, ctypes.c_char_p, ctypes.POINTER(_ULONG))
_COPY = ctypes.CFUNCTYPE(_ULONG, _ULONG, _ULONG, ctypes.POINTER(_Attribute), _ULONG, ctypes.POINTER(_ULONG))


_HMAC_SHA256 = _Mechanism(PyKCS11.CKM_SHA256_HMAC, None, 0)


def _check(rv: int) -> None:
    if rv:
        raise PyKCS11.PyKCS11Error(rv)


def _call(init: Any, run: Any, session: int, mechanism: Any, key: int, data: bytes, size: int) -> bytes:
    """One single-part operation: Init, then one call into a buffer of ``size`` bytes (no size query).
    What the mechanism points into belongs to the caller's arguments, alive until this returns."""
    _check(init(session, ctypes.byref(mechanism), key))
    out = ctypes.create_string_buffer(max(size, 1))
    length = _ULONG(len(out))
    rv = run(session, data, len(data), out, ctypes.byref(length))
    if rv == PyKCS11.CKR_BUFFER_TOO_SMALL and length.value > len(out):
        # A token that wants more room than the result needs has said how much; the operation is still active.
        out = ctypes.create_string_buffer(length.value)
        rv = run(session, data, len(data), out, ctypes.byref(length))
    _check(rv)
    return out.raw[: length.value]


class Direct:
    """The token calls of a request (AES-GCM, AES-CBC, HMAC-SHA256) and session copies of keys, on the module
    PyKCS11 has loaded for a connection."""

    __slots__ = ("_copy", "_decrypt", "_decrypt_init", "_encrypt", "_encrypt_init", "_sign", "_sign_init")

    def __init__(self, module: str) -> None:
        # RTLD_NOLOAD: the module PyKCS11 loaded, never a second copy; the reference taken here is dropped
        # right away, so PyKCS11's unload still unloads it (a reconnect needs a fresh load).
        try:
            handle = _ctypes.dlopen(module, os.RTLD_NOW | os.RTLD_NOLOAD)
        except OSError:
            raise ConfigError(f"pkcs11.module: {module} is not loaded; cannot bind its function list") from None
        try:
            get_list = ctypes.CFUNCTYPE(_ULONG, ctypes.POINTER(ctypes.POINTER(_FunctionList)))(
                _ctypes.dlsym(handle, "C_GetFunctionList")
            )
            functions = ctypes.POINTER(_FunctionList)()
            _check(get_list(ctypes.byref(functions)))
            table = functions.contents
        finally:
            _ctypes.dlclose(handle)
        missing = [name for name in _USED if getattr(table, name) is None]
        if missing:
            raise ConfigError(f"pkcs11.module: {module} does not provide {', '.join(missing)}")
        self._encrypt_init = _CRYPT_INIT(table.C_EncryptInit)
        self._encrypt = _CRYPT(table.C_Encrypt)
        self._decrypt_init = _CRYPT_INIT(table.C_DecryptInit)
        self._decrypt = _CRYPT(table.C_Decrypt)
        self._copy = _COPY(table.C_CopyObject)
        self._sign_init = _CRYPT_INIT(table.C_SignInit)
        self._sign = _CRYPT(table.C_Sign)

    def gcm_encrypt(self, session: int, key: int, iv: bytes, aad: bytes, tag_bits: int, data: bytes) -> bytes:
        gcm = _gcm(iv, aad, tag_bits)
        return _call(self._encrypt_init, self._encrypt, session, gcm.mechanism, key, data, len(data) + tag_bits // 8)

    def gcm_decrypt(self, session: int, key: int, iv: bytes, aad: bytes, tag_bits: int, data: bytes) -> bytes:
        gcm = _gcm(iv, aad, tag_bits)
        # the plaintext is never longer than the input
        return _call(self._decrypt_init, self._decrypt, session, gcm.mechanism, key, data, len(data))

    def cbc(self, session: int, key: int, iv: bytes, data: bytes, *, encrypt: bool) -> bytes:
        """CKM_AES_CBC on whole blocks: the output is as long as the input."""
        mechanism = _Mechanism(PyKCS11.CKM_AES_CBC, ctypes.cast(ctypes.c_char_p(iv), ctypes.c_void_p), len(iv))
        init, run = (self._encrypt_init, self._encrypt) if encrypt else (self._decrypt_init, self._decrypt)
        return _call(init, run, session, mechanism, key, data, len(data))

    def hmac_sha256(self, session: int, key: int, data: bytes) -> bytes:
        return _call(self._sign_init, self._sign, session, _HMAC_SHA256, key, data, 32)

    def session_copy(self, session: int, key: int) -> int:
        """C_CopyObject into a session object: the same key with the same attributes, kept by the token for
        as long as ``session`` is open."""
        copy = _ULONG()
        _check(self._copy(session, key, _SESSION_OBJECT, 1, ctypes.byref(copy)))
        return copy.value


class _Gcm(ctypes.Structure):
    """The mechanism and its parameters in one allocation, which keeps both alive for the call."""

    _fields_ = (("mechanism", _Mechanism), ("params", _GcmParams))


def _gcm(iv: bytes, aad: bytes, tag_bits: int) -> Any:
    gcm = _Gcm()
    gcm.params.pIv, gcm.params.ulIvLen, gcm.params.ulIvBits = iv, len(iv), len(iv) * 8
    gcm.params.pAAD, gcm.params.ulAADLen, gcm.params.ulTagBits = aad, len(aad), tag_bits
    mech = gcm.mechanism
    mech.mechanism = PyKCS11.CKM_AES_GCM
    mech.pParameter = ctypes.addressof(gcm.params)
    mech.ulParameterLen = ctypes.sizeof(_GcmParams)
    return gcm
