"""kleidi: a Kubernetes KMS v2 plugin whose keys stay in an HSM, a TPM or Vault/OpenBao."""

__version__ = "0.1.0"
