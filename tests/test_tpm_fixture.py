"""The software TPM fixture, proven with raw PyKCS11 against tpm2-pkcs11.

These tests also pin the tpm2-pkcs11 behaviour the aes-cbc-hmac provider is built on: which mechanisms
work, the key attributes tpm2_ptool creates, that new keys need a module re-initialisation, and that a
TPM outage needs one too. If Debian ships a tpm2-pkcs11 that changes any of this, these tests say so.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import PyKCS11
import pytest

from tests.backends.tpm import MODULE, SoftwareTPM

pytestmark = pytest.mark.integration

BLOCK = 16
RW = PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION
HMAC = PyKCS11.Mechanism(PyKCS11.CKM_SHA256_HMAC, None)


def pkcs7_pad(data: bytes) -> bytes:
    n = BLOCK - len(data) % BLOCK
    return data + bytes([n]) * n


def pkcs7_unpad(data: bytes) -> bytes:
    n = data[-1]
    if not 1 <= n <= BLOCK or data[-n:] != bytes([n]) * n:
        raise ValueError("bad padding")
    return data[:-n]


def cbc(iv: bytes) -> PyKCS11.Mechanism:
    return PyKCS11.Mechanism(PyKCS11.CKM_AES_CBC, iv)


class Token:
    """PyKCS11 on the fixture's token: the module initialised with the fixture's environment."""

    def __init__(self, tpm: SoftwareTPM) -> None:
        self.tpm = tpm
        self.lib = PyKCS11.PyKCS11Lib()
        with tpm.environ():
            self.lib.load(MODULE)
        self.login()

    def slot(self) -> int:
        for slot in self.lib.getSlotList(tokenPresent=True):
            if self.lib.getTokenInfo(slot).label.strip() == self.tpm.token_label:
                return int(slot)
        raise AssertionError(f"token {self.tpm.token_label} not found")

    def open(self) -> PyKCS11.Session:
        return self.lib.openSession(self.slot(), RW)

    def login(self) -> None:
        self.session = self.open()
        self.session.login(self.tpm.pin)

    def reinitialize(self) -> None:
        """C_Finalize + C_Initialize (the env is read again at C_Initialize), then log in again."""
        with self.tpm.environ():
            assert self.lib.lib.C_Finalize() == PyKCS11.CKR_OK
            assert self.lib.lib.C_Initialize() == PyKCS11.CKR_OK
        self.login()

    def key(self, label: str, session: PyKCS11.Session | None = None) -> int:
        found = (session or self.session).findObjects(
            [(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY), (PyKCS11.CKA_LABEL, label)]
        )
        assert len(found) == 1, f"{len(found)} keys labelled {label}"
        return found[0]

    def attrs(self, handle: int, *names: str) -> dict[str, object]:
        values = self.session.getAttributeValue(handle, [getattr(PyKCS11, n) for n in names])
        return dict(zip(names, values, strict=True))

    def close(self) -> None:
        self.lib.unload()


@pytest.fixture(scope="module")
def tpm() -> Iterator[SoftwareTPM]:
    with SoftwareTPM(aes_key_label="fx-kek-1", hmac_key_label="fx-mac-1") as software_tpm:
        yield software_tpm


@pytest.fixture(scope="module")
def token(tpm: SoftwareTPM) -> Iterator[Token]:
    tok = Token(tpm)
    try:
        yield tok
    finally:
        tok.close()


def test_pin_file_is_private_and_the_pin_is_in_no_command_line(tpm: SoftwareTPM) -> None:
    mode = stat.S_IMODE(tpm.pin_file.stat().st_mode)
    assert mode == 0o600
    assert tpm.pin_file.read_text() == tpm.pin
    assert len(tpm.pids) == 3
    for pid in tpm.pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert tpm.pin.encode() not in cmdline


def test_env_points_at_the_private_bus_store_and_resource_manager(tpm: SoftwareTPM) -> None:
    env = tpm.env
    assert env["TPM2_PKCS11_TCTI"] == env["TPM2TOOLS_TCTI"] == "tabrmd:bus_type=session"
    assert Path(env["TPM2_PKCS11_STORE"]).is_relative_to(tpm.dir)
    assert any(Path(env["TPM2_PKCS11_STORE"]).iterdir()), "tpm2_ptool init wrote no store"
    assert str(tpm.dir) in env["DBUS_SESSION_BUS_ADDRESS"]
    assert tpm.pkcs11_config()["pin_file"] == str(tpm.pin_file)


def test_keys_found_by_label_with_the_attributes_the_provider_relies_on(token: Token, tpm: SoftwareTPM) -> None:
    aes = token.attrs(
        token.key(tpm.aes_key_label),
        "CKA_KEY_TYPE", "CKA_VALUE_LEN", "CKA_ENCRYPT", "CKA_DECRYPT", "CKA_SIGN",
        "CKA_VERIFY", "CKA_SENSITIVE", "CKA_EXTRACTABLE", "CKA_TOKEN", "CKA_PRIVATE", "CKA_ID",
    )  # fmt: skip
    assert aes["CKA_KEY_TYPE"] == PyKCS11.CKK_AES
    assert aes["CKA_VALUE_LEN"] == 32
    assert aes["CKA_ENCRYPT"] is True and aes["CKA_DECRYPT"] is True
    assert aes["CKA_SIGN"] is False and aes["CKA_VERIFY"] is False
    assert aes["CKA_SENSITIVE"] is True and aes["CKA_EXTRACTABLE"] is False
    assert aes["CKA_TOKEN"] is True and aes["CKA_PRIVATE"] is True

    mac = token.attrs(
        token.key(tpm.hmac_key_label),
        "CKA_KEY_TYPE", "CKA_VALUE_LEN", "CKA_SIGN", "CKA_VERIFY", "CKA_ENCRYPT", "CKA_EXTRACTABLE", "CKA_ID",
    )  # fmt: skip
    # tpm2-pkcs11 types HMAC keys CKK_SHA256_HMAC, not CKK_GENERIC_SECRET as SoftHSM does.
    assert mac["CKA_KEY_TYPE"] == PyKCS11.CKK_SHA256_HMAC
    assert mac["CKA_VALUE_LEN"] == 32
    assert mac["CKA_SIGN"] is True and mac["CKA_VERIFY"] is True
    assert mac["CKA_ENCRYPT"] is False and mac["CKA_EXTRACTABLE"] is False
    # tpm2_ptool picks a random CKA_ID per key.
    assert aes["CKA_ID"] and mac["CKA_ID"] and aes["CKA_ID"] != mac["CKA_ID"]


def test_token_is_initialised_and_requires_login(token: Token) -> None:
    info = token.lib.getTokenInfo(token.slot())
    assert info.flags & PyKCS11.CKF_LOGIN_REQUIRED
    assert info.flags & PyKCS11.CKF_TOKEN_INITIALIZED


def test_mechanisms_offered(token: Token) -> None:
    offered = set(token.lib.getMechanismList(token.slot()))
    assert {"CKM_AES_CBC", "CKM_SHA256_HMAC"} <= offered
    assert "CKM_AES_GCM" not in offered


def test_aes_cbc_round_trip_with_software_pkcs7_padding(token: Token, tpm: SoftwareTPM) -> None:
    aes = token.key(tpm.aes_key_label)
    seed = os.urandom(32)
    iv = os.urandom(16)
    padded = pkcs7_pad(seed)
    assert len(padded) == 48
    ciphertext = bytes(token.session.encrypt(aes, padded, cbc(iv)))
    assert len(ciphertext) == 48
    assert seed not in ciphertext
    assert pkcs7_unpad(bytes(token.session.decrypt(aes, ciphertext, cbc(iv)))) == seed
    # Another IV, another ciphertext; decrypting with a wrong IV garbles only the first block (CBC).
    assert bytes(token.session.encrypt(aes, padded, cbc(os.urandom(16)))) != ciphertext
    wrong = bytes(token.session.decrypt(aes, ciphertext, cbc(bytes(16))))
    assert wrong[:16] != padded[:16] and wrong[16:] == padded[16:]


def test_aes_cbc_pad_on_tpm2_pkcs11_cannot_unwrap_a_32_byte_seed(token: Token, tpm: SoftwareTPM) -> None:
    """Why the provider pads in software: CKM_AES_CBC_PAD is advertised but broken in tpm2-pkcs11 1.9.

    Encrypting a 32-byte seed sometimes fails and sometimes gives CBC(seed + PKCS#7 pad); decrypting those
    48 bytes with CBC_PAD always fails ('Internal buffer too small'). Each failure leaves its session with
    the operation still active, so every attempt uses a throwaway session."""
    assert "CKM_AES_CBC_PAD" in token.lib.getMechanismList(token.slot())
    aes = token.key(tpm.aes_key_label)
    seed, iv = os.urandom(32), os.urandom(16)
    reference = bytes(token.session.encrypt(aes, pkcs7_pad(seed), cbc(iv)))
    pad = PyKCS11.Mechanism(PyKCS11.CKM_AES_CBC_PAD, iv)

    encrypting = token.open()
    try:
        wrapped = bytes(encrypting.encrypt(aes, seed, pad))
    except PyKCS11.PyKCS11Error as failed:
        assert failed.value == PyKCS11.CKR_GENERAL_ERROR
    else:
        assert wrapped == reference  # same bytes as CBC over a software-padded seed
    finally:
        encrypting.closeSession()

    decrypting = token.open()
    try:
        with pytest.raises(PyKCS11.PyKCS11Error) as failed:
            decrypting.decrypt(aes, reference, pad)
        assert failed.value.value == PyKCS11.CKR_GENERAL_ERROR
        with pytest.raises(PyKCS11.PyKCS11Error) as stuck:
            decrypting.encrypt(aes, bytes(16), cbc(bytes(16)))
        assert stuck.value.value == PyKCS11.CKR_OPERATION_ACTIVE
    finally:
        decrypting.closeSession()


def test_aes_cbc_with_unaligned_input_returns_nothing_instead_of_an_error(token: Token, tpm: SoftwareTPM) -> None:
    """Callers must check block alignment themselves: tpm2-pkcs11 answers CKR_OK with no output."""
    aes = token.key(tpm.aes_key_label)
    session = token.open()
    try:
        try:
            out = bytes(session.encrypt(aes, os.urandom(17), cbc(os.urandom(16))))
        except PyKCS11.PyKCS11Error:
            out = b""
        assert out == b""
    finally:
        session.closeSession()


def test_hmac_sha256_sign_and_verify_on_the_token(token: Token, tpm: SoftwareTPM) -> None:
    mac_key = token.key(tpm.hmac_key_label)
    message = b"header" + os.urandom(16) + os.urandom(48)
    mac = bytes(token.session.sign(mac_key, message, HMAC))
    assert len(mac) == 32
    assert bytes(token.session.sign(mac_key, message, HMAC)) == mac
    assert token.session.verify(mac_key, message, mac, HMAC) is True
    tampered = bytes([message[0] ^ 1]) + message[1:]
    assert bytes(token.session.sign(mac_key, tampered, HMAC)) != mac
    assert token.session.verify(mac_key, tampered, mac, HMAC) is False


def test_keys_refuse_the_other_mechanism(token: Token, tpm: SoftwareTPM) -> None:
    session = token.open()
    try:
        with pytest.raises(PyKCS11.PyKCS11Error):
            session.sign(token.key(tpm.aes_key_label), b"x", HMAC)
        with pytest.raises(PyKCS11.PyKCS11Error):
            session.encrypt(token.key(tpm.hmac_key_label), bytes(16), cbc(bytes(16)))
    finally:
        session.closeSession()


def test_generate_random_on_the_token(token: Token) -> None:
    first = bytes(token.session.generateRandom(32))
    second = bytes(token.session.generateRandom(32))
    assert len(first) == len(second) == 32
    assert first != second


def test_parallel_sessions_encrypt_and_mac_correctly(token: Token, tpm: SoftwareTPM) -> None:
    aes = token.key(tpm.aes_key_label)
    mac_key = token.key(tpm.hmac_key_label)
    sessions = [token.open() for _ in range(8)]
    errors: list[BaseException] = []

    def work(session: PyKCS11.Session) -> None:
        try:
            for _ in range(5):
                seed, iv = os.urandom(32), os.urandom(16)
                body = bytes(session.encrypt(aes, pkcs7_pad(seed), cbc(iv)))
                mac = bytes(session.sign(mac_key, iv + body, HMAC))
                assert session.verify(mac_key, iv + body, mac, HMAC)
                assert pkcs7_unpad(bytes(session.decrypt(aes, body, cbc(iv)))) == seed
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for session in sessions:
        session.closeSession()
    assert not errors, errors


def test_a_key_added_later_needs_a_module_reinitialisation(token: Token, tpm: SoftwareTPM) -> None:
    tpm.add_aes_key("fx-kek-2")
    assert token.session.findObjects([(PyKCS11.CKA_LABEL, "fx-kek-2")]) == []
    fresh = token.open()
    assert fresh.findObjects([(PyKCS11.CKA_LABEL, "fx-kek-2")]) == []
    fresh.closeSession()
    token.reinitialize()
    new = token.key("fx-kek-2")
    old = token.key(tpm.aes_key_label)
    iv = os.urandom(16)
    block = os.urandom(16)
    assert bytes(token.session.encrypt(new, block, cbc(iv))) != bytes(token.session.encrypt(old, block, cbc(iv)))


def test_tpm2_ptool_accepts_a_duplicate_label(token: Token, tpm: SoftwareTPM) -> None:
    """The provider must refuse an ambiguous label: tpm2_ptool does not."""
    tpm.add_hmac_key("fx-mac-dup")
    tpm.add_hmac_key("fx-mac-dup")
    token.reinitialize()
    found = token.session.findObjects([(PyKCS11.CKA_LABEL, "fx-mac-dup")])
    assert len(found) == 2
    ids = {bytes(token.session.getAttributeValue(h, [PyKCS11.CKA_ID])[0]) for h in found}
    assert len(ids) == 2


def test_tpm_outage_fails_fast_and_recovery_needs_reinitialisation(token: Token, tpm: SoftwareTPM) -> None:
    aes = token.key(tpm.aes_key_label)
    iv, block = os.urandom(16), os.urandom(16)
    before = bytes(token.session.encrypt(aes, block, cbc(iv)))
    tpm.stop_tpm()
    assert not tpm.tpm_running
    try:
        with pytest.raises(PyKCS11.PyKCS11Error):
            token.open().encrypt(aes, block, cbc(iv))
    finally:
        tpm.start_tpm()
    assert tpm.tpm_running
    # The initialised module does not reconnect on its own, even in a new session ...
    with pytest.raises(PyKCS11.PyKCS11Error):
        token.open().encrypt(aes, block, cbc(iv))
    # ... C_Finalize + C_Initialize does, and the key (kept in the swtpm state + store) is the same.
    token.reinitialize()
    aes = token.key(tpm.aes_key_label)
    assert bytes(token.session.encrypt(aes, block, cbc(iv))) == before


def _running(pid: int) -> bool:
    """True if pid is still one of our daemons (a reaped pid may be reused by an unrelated process)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return any(name in cmdline for name in (b"swtpm", b"tpm2-abrmd", b"dbus-daemon"))


def test_close_stops_every_process_and_removes_the_directory() -> None:
    tpm = SoftwareTPM()
    with tpm:
        pids = tpm.pids
        directory = tpm.dir
        assert len(pids) == 3
        tpm.stop_tpm()
        tpm.start_tpm()
        pids += tpm.pids
    assert [pid for pid in pids if _running(pid)] == []
    assert not directory.exists()


def test_a_failing_test_body_still_stops_everything() -> None:
    tpm = SoftwareTPM()
    pids: list[int] = []
    with pytest.raises(ZeroDivisionError), tpm:
        pids = tpm.pids
        _ = 1 / 0
    assert len(pids) == 3
    assert [pid for pid in pids if _running(pid)] == []


def test_a_failing_start_stops_what_was_started(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []

    def provisioning_fails(self: SoftwareTPM) -> None:
        started.extend(self.pids)
        raise RuntimeError("provisioning failed")

    monkeypatch.setattr(SoftwareTPM, "_provision", provisioning_fails)
    tpm = SoftwareTPM()
    with pytest.raises(RuntimeError, match="provisioning failed"), tpm:
        pass
    assert len(started) == 3
    assert [pid for pid in started if _running(pid)] == []
    assert not tpm.dir.exists()


def test_the_same_imported_key_material_works_on_two_tpms(token: Token, tpm: SoftwareTPM) -> None:
    """The multi-node pattern docs/tpm.md describes: one AES and one HMAC key, imported into each node's TPM."""
    aes_material, mac_material = os.urandom(32), os.urandom(32)
    tpm.import_aes_key("fx-shared-kek", aes_material)
    tpm.import_hmac_key("fx-shared-mac", mac_material)
    token.reinitialize()
    iv, seed = os.urandom(16), os.urandom(32)
    wrapped = bytes(token.session.encrypt(token.key("fx-shared-kek"), pkcs7_pad(seed), cbc(iv)))
    mac = bytes(token.session.sign(token.key("fx-shared-mac"), iv + wrapped, HMAC))
    imported = token.attrs(token.key("fx-shared-kek"), "CKA_EXTRACTABLE", "CKA_LOCAL", "CKA_SENSITIVE")
    # Honest attributes: the key did not originate in the TPM and its TPM object is not fixedTPM.
    assert imported == {"CKA_EXTRACTABLE": True, "CKA_LOCAL": False, "CKA_SENSITIVE": True}

    with SoftwareTPM(token_label="other-node", aes_key_label="own-kek", hmac_key_label="own-mac") as other:
        other.import_aes_key("fx-shared-kek", aes_material)
        other.import_hmac_key("fx-shared-mac", mac_material)
        # The other node is another process (one tpm2-pkcs11 initialisation per process).
        result = subprocess.run(
            [sys.executable, "-c", OTHER_NODE, other.token_label, (iv + wrapped + mac).hex()],
            input=other.pin.encode(),
            env={**os.environ, **other.env},
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        verified, unwrapped, own_key_unwrapped = result.stdout.decode().split()
        assert verified == "True"
        assert pkcs7_unpad(bytes.fromhex(unwrapped)) == seed
        # keys generated inside each TPM differ: what one node wraps with them, another cannot read
        assert bytes.fromhex(own_key_unwrapped) != pkcs7_pad(seed)


OTHER_NODE = """
import sys, PyKCS11
label, blob = sys.argv[1], bytes.fromhex(sys.argv[2])
iv, wrapped, mac = blob[:16], blob[16:-32], blob[-32:]
lib = PyKCS11.PyKCS11Lib()
lib.load("/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so")
slot = next(s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).label.strip() == label)
session = lib.openSession(slot)
session.login(sys.stdin.read())
key = lambda name: session.findObjects([(PyKCS11.CKA_LABEL, name)])[0]
hmac = PyKCS11.Mechanism(PyKCS11.CKM_SHA256_HMAC, None)
cbc = PyKCS11.Mechanism(PyKCS11.CKM_AES_CBC, iv)
print(session.verify(key("fx-shared-mac"), iv + wrapped, mac, hmac))
print(bytes(session.decrypt(key("fx-shared-kek"), wrapped, cbc)).hex())
print(bytes(session.decrypt(key("own-kek"), wrapped, cbc)).hex())
session.logout()
"""


HOLDER = """
import sys, time
from tests.backends.tpm import SoftwareTPM
tpm = SoftwareTPM(base_dir=sys.argv[1])
tpm.start()
print(" ".join(str(p) for p in tpm.pids), flush=True)
time.sleep(600)
"""


def test_a_killed_test_process_leaves_no_daemons(tmp_path: Path) -> None:
    """Even SIGKILL of the process that owns the fixture (a CI timeout) stops swtpm, abrmd and dbus."""
    deep = tmp_path / ("d" * 60)  # also longer than a unix socket path allows for the bus
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(deep)], stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent
    )
    try:
        assert holder.stdout is not None
        pids = [int(p) for p in holder.stdout.readline().split()]
        assert len(pids) == 3 and all(_running(p) for p in pids)
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in pids if _running(p)] == []
