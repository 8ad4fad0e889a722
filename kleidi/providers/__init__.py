"""Key backends: each turns a data key into a wrapped blob and back."""

from __future__ import annotations

from kleidi.config import Config
from kleidi.observability import Metrics
from kleidi.providers.base import Provider


def build(config: Config, metrics: Metrics) -> Provider:
    """The provider the config selects. Imported lazily so a node loads only the backend it uses."""
    if config.provider == "pkcs11":
        from kleidi.providers.pkcs11 import Pkcs11Provider

        assert config.pkcs11 is not None  # guaranteed by Config validation
        return Pkcs11Provider(config.pkcs11, metrics)
    if config.provider == "vault":
        from kleidi.providers.vault import VaultProvider

        assert config.vault is not None
        return VaultProvider(config.vault, metrics)
    if config.provider == "remote":
        from kleidi.providers.remote import RemoteProvider

        assert config.remote is not None
        return RemoteProvider(config.remote, metrics)
    raise AssertionError(f"unknown provider {config.provider}")
