"""`python -m bench` (or `make bench`): every backend, kleidi through its socket vs the raw backend call."""

from __future__ import annotations

import importlib
import sys

BACKENDS = ("softhsm", "tpm", "vault")


def main(argv: list[str]) -> None:
    chosen = argv or list(BACKENDS)
    for name in chosen:
        importlib.import_module(f"bench.{name}").main()


main(sys.argv[1:])
