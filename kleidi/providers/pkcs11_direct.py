"""The per-request AES-GCM calls, made straight through the module's PKCS#11 function list with ctypes.

PyKCS11 stays in charge of everything else (loading, slots, login, sessions, objects, CBC and HMAC).
Its Session.encrypt costs about three times the token's own work on SoftHSM: a size-query call before
the real one, a Python wrapper per argument, and a result that can only be read one byte at a time
(about 0.3 µs per byte). Here one call fills a buffer of the known size, and the GIL is released while
the token works, so calls on other sessions run in parallel.

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
]


class _FunctionList(ctypes.Structure):
    _fields_ = (("version", ctypes.c_ubyte * 2), *((name, ctypes.c_void_p) for name in _FUNCTIONS))


class _Attribute(ctypes.Structure):
    _fields_ = (("type", _ULONG), ("pValue", ctypes.c_void_p), ("ulValueLen", _ULONG))


_FALSE = ctypes.c_ubyte(0)
_SESSION_OBJECT = (_Attribute * 1)(_Attribute(PyKCS11.CKA_TOKEN, ctypes.addressof(_FALSE), 1))

_CRYPT_INIT = ctypes.CFUNCTYPE(_ULONG, _ULONG, ctypes.POINTER(_Mechanism), _ULONG)
_CRYPT = ctypes.CFUNCTYPE(_ULONG, _ULONG, ctypes.c_char_p, _ULONG, ctypes.c_char_p, ctypes.POINTER(_ULONG))
_COPY = ctypes.CFUNCTYPE(_ULONG, _ULONG, _ULONG, ctypes.POINTER(_Attribute), _ULONG, ctypes.POINTER(_ULONG))


def _check(rv: int) -> None:
    if rv:
        raise PyKCS11.PyKCS11Error(rv)


class Direct:
    """GCM encrypt/decrypt and session copies of keys, on the module PyKCS11 has loaded for a connection."""

    __slots__ = ("_copy", "_decrypt", "_decrypt_init", "_encrypt", "_encrypt_init")

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
        self._encrypt_init = _CRYPT_INIT(table.C_EncryptInit)
        self._encrypt = _CRYPT(table.C_Encrypt)
        self._decrypt_init = _CRYPT_INIT(table.C_DecryptInit)
        self._decrypt = _CRYPT(table.C_Decrypt)
        self._copy = _COPY(table.C_CopyObject)

    def gcm_encrypt(self, session: int, key: int, iv: bytes, aad: bytes, tag_bits: int, data: bytes) -> bytes:
        gcm = _gcm(iv, aad, tag_bits)
        _check(self._encrypt_init(session, ctypes.byref(gcm.mechanism), key))
        out = ctypes.create_string_buffer(len(data) + tag_bits // 8)
        size = _ULONG(len(out))
        _check(self._encrypt(session, data, len(data), out, ctypes.byref(size)))
        return out.raw[: size.value]

    def gcm_decrypt(self, session: int, key: int, iv: bytes, aad: bytes, tag_bits: int, data: bytes) -> bytes:
        gcm = _gcm(iv, aad, tag_bits)
        _check(self._decrypt_init(session, ctypes.byref(gcm.mechanism), key))
        out = ctypes.create_string_buffer(max(len(data), 1))  # the plaintext is never longer than the input
        size = _ULONG(len(out))
        _check(self._decrypt(session, data, len(data), out, ctypes.byref(size)))
        return out.raw[: size.value]

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
