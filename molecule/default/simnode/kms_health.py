"""The apiserver's health checks of its KMS providers (encryptionconfig/config.go), driven through kleidi's client.

KMS v2: Status must say healthz "ok", version "v2" and give a valid key_id; when that key_id is new to the probe,
the apiserver makes a DEK seed with Encrypt and requires the answer's key_id to equal Status' (DEK rotation):
a plugin whose Encrypt fails or disagrees with Status is unhealthy too. KMS v1: an Encrypt/Decrypt round trip.
Results are cached like the real probes: 20 s after a success, 3 s after a failure. Each KMS v2 probe is primed
once at load and then polled in the background (primeAndProbeKMSv2): every 60 s, and every 10 s while failing;
the polls go through the same cached check as /healthz and /readyz. Every valid key_id a Status returns is
recorded in the envelope-encryption metrics (EnvelopeMetrics)."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal

import grpc
from encryption_config import EncryptionConfig, KmsProvider

from kleidi.client import KmsClient

log = logging.getLogger("kube-apiserver")

MAX_KEY_ID = 1024
MAX_CIPHERTEXT = 1024
MAX_ANNOTATIONS = 32 * 1024
_FQDN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+$")
# A test knob, never set by molecule: scales every interval and TTL below by one factor, so their relations stay
# the real ones (a healthy poll always outlives the positive TTL, so each poll really calls Status).
TIME_SCALE_ENV = "SIMNODE_TEST_KMS_TIME_SCALE"
# k8s.io/apiserver envelope/metrics: the label sets of the Status gauge are kept in an LRU of this size; a label set
# pushed out of it has its series deleted.
STATUS_SERIES_CACHE = 100


@dataclass(frozen=True)
class Timing:
    """encryptionconfig/config.go's constants, in seconds."""

    positive_interval: float = 60.0  # kmsv2PluginHealthzPositiveInterval: the background poll while healthy
    negative_interval: float = 10.0  # kmsv2PluginHealthzNegativeInterval: the poll after a failed check
    positive_ttl: float = 20.0  # kmsPluginHealthzPositiveTTL: a successful check is reused this long
    negative_ttl: float = 3.0  # kmsPluginHealthzNegativeTTL: a failed one this long
    scale: float = 1.0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Timing:
        """The real timing, unless the test knob SIMNODE_TEST_KMS_TIME_SCALE gives a factor in (0, 1]."""
        value = (os.environ if environ is None else environ).get(TIME_SCALE_ENV, "")
        if not value:
            return cls()
        try:
            scale = float(value)
        except ValueError:
            scale = math.nan
        if not 0 < scale <= 1:
            raise ValueError(f"{TIME_SCALE_ENV}={value!r}: expected a factor in (0, 1] (a test knob)")
        real = cls()
        return cls(
            real.positive_interval * scale,
            real.negative_interval * scale,
            real.positive_ttl * scale,
            real.negative_ttl * scale,
            scale,
        )


REAL_TIMING = Timing()


def get_hash(data: str) -> str:
    """getHash / GetHashIfNotEmpty: how the apiserver shows a key_id or an identity in metrics and logs."""
    return f"sha256:{hashlib.sha256(data.encode()).hexdigest()}" if data else ""


def go_float(value: float) -> str:
    """strconv.FormatFloat(value, 'g', -1, 64): how the Prometheus Go client writes a sample value."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    _, digits, exponent = Decimal(repr(value)).as_tuple()
    assert isinstance(exponent, int)
    digits = tuple(digits)
    while len(digits) > 1 and digits[-1] == 0:
        digits, exponent = digits[:-1], exponent + 1
    point = len(digits) + exponent  # where the decimal point sits after the digits' first one
    if point - 1 < -4 or point - 1 >= 6:
        return f"{value:.{len(digits) - 1}e}"
    return f"{value:.{max(len(digits) - point, 0)}f}"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class EnvelopeMetrics:
    """What the KMS v2 health check records in k8s.io/apiserver's envelope-encryption metrics, shared by every
    probe of the process (old and new configurations alike, as the real registry is).

    Only the series the check itself feeds: the Status gauge and the invalid key_id counter. The per-transformation
    key_id_hash_total and key_id_hash_last_timestamp_seconds series come from storage reads and writes
    (TransformFromStorage / TransformToStorage), which this stand-in never performs: the DEK rotation's Encrypt
    goes to the plugin directly and is not counted there, so those series never appear, as on an apiserver that
    has not read or written an encrypted object yet."""

    def __init__(self, apiserver_id: str) -> None:
        self.apiserver_id_hash = get_hash(apiserver_id)
        self._lock = threading.Lock()
        self._status: OrderedDict[tuple[str, str], float] = OrderedDict()  # (provider, key_id hash) -> unix time
        self._invalid: dict[tuple[str, str], int] = {}  # (provider, error code) -> count

    def record_key_id_from_status(self, provider: str, key_id: str) -> None:
        """RecordKeyIDFromStatus: the gauge set to now, its label set refreshed in the LRU."""
        with self._lock:
            series = (provider, get_hash(key_id))
            self._status[series] = time.time()
            self._status.move_to_end(series)
            while len(self._status) > STATUS_SERIES_CACHE:
                self._status.popitem(last=False)

    def record_invalid_key_id_from_status(self, provider: str, code: str) -> None:
        with self._lock:
            self._invalid[(provider, code)] = self._invalid.get((provider, code), 0) + 1

    def status_series(self) -> dict[tuple[str, str], float]:
        with self._lock:
            return dict(self._status)

    def lines(self) -> list[str]:
        """The text exposition, families by name and series by labels, as the Go registry sorts them; a family
        without series is left out (the registry drops it)."""
        with self._lock:
            status, invalid = sorted(self._status.items()), sorted(self._invalid.items())
        lines: list[str] = []
        if invalid:
            lines += family(
                "apiserver_envelope_encryption_invalid_key_id_from_status_total",
                "[ALPHA] Number of times an invalid keyID is returned by the Status RPC call split by error.",
                "counter",
                [
                    (f'error="{_label(code)}",provider_name="{_label(provider)}"', str(count))
                    for (provider, code), count in sorted(invalid, key=lambda item: (item[0][1], item[0][0]))
                ],
            )
        if status:
            lines += family(
                "apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds",
                "[ALPHA] The last time in seconds when a keyID was returned by the Status RPC call.",
                "gauge",
                [
                    (
                        f'apiserver_id_hash="{self.apiserver_id_hash}",key_id_hash="{key_hash}",'
                        f'provider_name="{_label(provider)}"',
                        go_float(stamp),
                    )
                    for (provider, key_hash), stamp in sorted(status, key=lambda item: (item[0][1], item[0][0]))
                ],
            )
        return lines


def family(name: str, help_text: str, kind: str, samples: list[tuple[str, str]]) -> list[str]:
    """One metric family in the text exposition: HELP, TYPE, then a line per (labels, value); no labels, no braces."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    return lines + [f"{name}{{{labels}}} {value}" if labels else f"{name} {value}" for labels, value in samples]


class ProbeError(Exception):
    pass


def _rpc_error(err: grpc.RpcError) -> str:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    return f"rpc error: code = {code.name.title().replace('_', '') if code else 'Unknown'} desc = {details}"


def validate_key_id(key_id: str) -> tuple[str, str] | None:
    """ValidateKeyID: None, or (error code for the metric, reason)."""
    if not key_id:
        return "empty", "keyID is empty"
    if len(key_id.encode()) > MAX_KEY_ID:
        return "too_long", f"keyID is {len(key_id.encode())} bytes, which exceeds the max size of {MAX_KEY_ID}"
    return None


def _ticks(stop: threading.Event, interval: float) -> Iterator[None]:
    """wait.PollUntilWithContext's ticker: the first tick one interval from now, then one every interval; ticks
    that pass while the caller is busy are dropped, as a Go ticker's are. Ends when stop is set."""
    next_at = time.monotonic() + interval
    while not stop.wait(max(0.0, next_at - time.monotonic())):
        yield
        now = time.monotonic()
        next_at += interval
        while next_at <= now:
            next_at += interval


class KmsProbe:
    """One kms provider's health, as kmsv2PluginProbe / kmsPluginProbe compute it."""

    def __init__(
        self, provider: KmsProvider, metrics: EnvelopeMetrics | None = None, timing: Timing = REAL_TIMING
    ) -> None:
        self.provider = provider
        self.metrics = metrics
        self.timing = timing
        self.key_id = ""  # key_id of the current DEK seed (empty: no seed yet)
        self.rotations = 0  # DEK seeds made (successful rotations)
        self._lock = threading.Lock()
        self._last_error: str | None = None
        self._valid_until = 0.0
        self._threads: list[threading.Thread] = []

    @property
    def name(self) -> str:
        return self.provider.name

    def check(self) -> str | None:
        """None when healthy, else the reason. Health requests and the background polls both come here, and both
        get the cached answer while it is younger than its TTL (the real check() serves both the same way)."""
        with self._lock:
            now = time.monotonic()
            if now < self._valid_until:
                return self._last_error
            try:
                if self.provider.api_version == "v2":
                    self._check_v2()
                else:
                    self._check_v1()
            except ProbeError as err:
                self._last_error = str(err)
                self._valid_until = time.monotonic() + self.timing.negative_ttl
            else:
                self._last_error, self._valid_until = None, time.monotonic() + self.timing.positive_ttl
            return self._last_error

    # -- primeAndProbeKMSv2 ------------------------------------------------------------------------------------
    def prime(self, stop: threading.Event) -> str | None:
        """At load: one check inline, then the background polls until stop is set. KMS v1 probes are neither
        primed nor polled (only health requests check them), as in the real apiserver."""
        if self.provider.api_version != "v2":
            return None
        error = self._poll_check()
        if error is not None:  # start getting to a valid state at once, every negative interval
            self._spawn(self._fast_until_success, stop, "prime")
        self._spawn(self._poll, stop, "poll")
        return error

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _spawn(self, target: Callable[[threading.Event], None], stop: threading.Event, what: str) -> None:
        thread = threading.Thread(target=target, args=(stop,), name=f"kms-{what}-{self.name}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _poll_check(self) -> str | None:
        error = self.check()
        if error is not None:
            log.error("kms plugin failed health check probe name=%s err=%s", self.name, error)
        return error

    def _fast_until_success(self, stop: threading.Event) -> None:
        for _ in _ticks(stop, self.timing.negative_interval):
            if self._poll_check() is None:
                return

    def _poll(self, stop: threading.Event) -> None:
        """Every positive interval; a failed check blocks this loop in the fast poll until a check succeeds."""
        for _ in _ticks(stop, self.timing.positive_interval):
            if self._poll_check() is not None:
                self._fast_until_success(stop)

    # -- the checks --------------------------------------------------------------------------------------------
    def _client(self) -> KmsClient:
        path = self.provider.socket
        if not path.startswith("/") or path.startswith("/@"):
            raise ProbeError(f"this stand-in dials filesystem sockets only, not {self.provider.endpoint!r}")
        # A fresh channel per check: no reconnect back-off left over from an earlier failure (see README).
        return KmsClient(path, self.provider.timeout)

    def _check_v2(self) -> None:
        """isKMSv2ProviderHealthyAndMaybeRotateDEK: a valid key_id is recorded and may rotate the DEK seed even
        when healthz or the version is wrong."""
        name = self.provider.name
        with self._client() as kms:
            try:
                status = kms.status()
            except grpc.RpcError as err:
                raise ProbeError(
                    f"failed to perform status section of the healthz check for KMS Provider {name}, "
                    f"error: {_rpc_error(err)}"
                ) from err
            problems: list[str] = []
            if status.healthz != "ok":
                problems.append(f"got unexpected healthz status: {status.healthz}")
            if status.version != "v2":
                problems.append(f"expected KMSv2 API version v2, got {status.version}")
            bad_key_id = validate_key_id(status.key_id)
            if bad_key_id:
                if self.metrics:
                    self.metrics.record_invalid_key_id_from_status(name, bad_key_id[0])
                problems.append(f'got invalid KMSv2 KeyID hash "{get_hash(status.key_id)}": {bad_key_id[1]}')
            else:
                if self.metrics:
                    self.metrics.record_key_id_from_status(name, status.key_id)
                if status.key_id != self.key_id:
                    rotation = self._rotate(kms, status.key_id)
                    if rotation:
                        problems.append(rotation)
            if problems:
                raise ProbeError(f"kmsv2 Provider {name} is not healthy, error: {'; '.join(problems)}")

    def _rotate(self, kms: KmsClient, status_key_id: str) -> str | None:
        """A new DEK seed, encrypted by the plugin; the rotation fails unless Encrypt agrees with Status. On
        failure the old seed stays (the real one coasts on it until it expires)."""
        uid = str(uuid.uuid4())
        try:
            response = kms.encrypt(os.urandom(32), uid=uid)
        except grpc.RpcError as err:
            return f"failed to rotate DEK uid={uid!r}, errGen=failed to encrypt DEK, error: {_rpc_error(err)}"
        problems = []
        if not response.ciphertext:
            problems.append("encrypted DEK source is empty")
        elif len(response.ciphertext) > MAX_CIPHERTEXT:
            problems.append(f"encrypted DEK source is {len(response.ciphertext)} bytes, max {MAX_CIPHERTEXT}")
        bad = validate_key_id(response.key_id)
        if bad:
            problems.append(f"Encrypt key_id: {bad[1]}")
        size = 0
        for key, value in response.annotations.items():
            size += len(key) + len(value)
            if not _FQDN.match(key) or "/" in key or "_" in key:
                problems.append(f"annotation key {key!r} is not a fully qualified domain name")
        if size > MAX_ANNOTATIONS:
            problems.append(f"annotations are {size} bytes, max {MAX_ANNOTATIONS}")
        if not problems and response.key_id != status_key_id:
            problems.append(
                f'statusKeyIDHash="{get_hash(status_key_id)}", encryptKeyIDHash="{get_hash(response.key_id)}", '
                f'stateKeyIDHash="{get_hash(self.key_id)}"'
            )
        if problems:
            return f"failed to rotate DEK uid={uid!r}: {'; '.join(problems)}"
        # The real apiserver logs this at -v=6; the stand-in always does, so a log shows when the seed changed.
        log.info(
            "successfully rotated DEK provider=%s uid=%s newKeyIDHash=%s oldKeyIDHash=%s",
            self.name,
            uid,
            get_hash(status_key_id),
            get_hash(self.key_id),
        )
        self.key_id = status_key_id
        self.rotations += 1
        return None

    def _check_v1(self) -> None:
        name = self.provider.name
        with self._client() as kms:
            try:
                ciphertext = kms.v1_encrypt(b"ping")
            except grpc.RpcError as err:
                raise ProbeError(
                    f"failed to perform encrypt section of the healthz check for KMS Provider {name}, "
                    f"error: {_rpc_error(err)}"
                ) from err
            try:
                kms.v1_decrypt(ciphertext)
            except grpc.RpcError as err:
                raise ProbeError(
                    f"failed to perform decrypt section of the healthz check for KMS Provider {name}, "
                    f"error: {_rpc_error(err)}"
                ) from err


class KmsChecks:
    """The health checks one loaded EncryptionConfiguration adds to /healthz and /readyz (not /livez), and the
    background polls of its KMS v2 probes, which live until stop() (a reload's old config, or shutdown)."""

    def __init__(
        self,
        config: EncryptionConfig | None,
        reload: bool,
        metrics: EnvelopeMetrics | None = None,
        timing: Timing = REAL_TIMING,
    ) -> None:
        self.config = config
        self.probes = [KmsProbe(p, metrics, timing) for p in config.kms] if config else []
        # One combined "kms-providers" check with automatic reload (present even with no kms provider) or when
        # only v2 providers are used; otherwise one "kms-provider-<i>" check per provider.
        self.combined = config is not None and (reload or (config.v2_used and not config.v1_used))
        self._stop = threading.Event()

    @property
    def close_grace_period(self) -> float:
        """KMSCloseGracePeriod: how long a replaced config's providers live on (2 x the sum of their timeouts,
        a v1 provider's counted twice for its Encrypt and Decrypt)."""
        return 2 * sum(p.provider.timeout * (2 if p.provider.api_version == "v1" else 1) for p in self.probes)

    def prime(self) -> None:
        """LoadEncryptionConfig's primeAndProbeKMSv2, for each KMS v2 provider in turn."""
        for probe in self.probes:
            probe.prime(self._stop)

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for probe in self.probes:
            probe.join(max(0.0, deadline - time.monotonic()))

    def names(self) -> list[str]:
        if self.combined:
            return ["kms-providers"]
        return [f"kms-provider-{i}" for i in range(len(self.probes))]

    def run(self, name: str) -> str | None:
        if self.combined and name == "kms-providers":
            errors = [f"kms-provider-{i}: {err}" for i, p in enumerate(self.probes) if (err := p.check())]
            return errors[0] if len(errors) == 1 else ("[" + ", ".join(errors) + "]" if errors else None)
        index = int(name.rsplit("-", 1)[1])
        return self.probes[index].check()
