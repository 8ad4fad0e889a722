"""`kleidi` with one of its mechanisms taken out, so a benchmark can show what the mechanism buys in the same
run, for mechanisms that have no setting to turn them off.

    python -m bench.launch --without vault-fast-path serve --config FILE
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def _no_vault_fast_path() -> None:
    from kleidi.providers.vault import VaultProvider

    del VaultProvider.encrypt_fast  # kleidi.providers.base.fast_path() then finds none: every call takes a worker


WITHOUT: dict[str, Callable[[], None]] = {"vault-fast-path": _no_vault_fast_path}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--without" or argv[1] not in WITHOUT:
        raise SystemExit(f"usage: python -m bench.launch --without {{{','.join(WITHOUT)}}} KLEIDI-ARGS...")
    from kleidi import tuning

    tuning.grpc_environment()  # as `kleidi serve` does, before the hook's imports bring gRPC in
    WITHOUT[argv[1]]()
    from kleidi.cli import main as kleidi

    return kleidi(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
