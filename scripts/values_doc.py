"""The Helm values file read with its `# --` comments: one description per dotted key, in file order."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
VALUES = REPO / "helm" / "kleidi" / "values.yaml"
_KEY = re.compile(r"^(\s*)([A-Za-z_][\w-]*):")


def load_values(path: Path = VALUES) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def descriptions(path: Path = VALUES) -> dict[str, str]:
    """{"config.pkcs11.module": "PKCS#11 module inside the container.", ...} for every key with a `# --` comment.

    A comment may run over several lines; the key it belongs to is the next one at any indentation."""
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    collecting = False
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending, collecting = [stripped[4:].strip()], True
            continue
        if stripped.startswith("#") and collecting:
            pending.append(stripped[1:].strip())
            continue
        match = _KEY.match(line)
        if not match:
            if not stripped:
                pending, collecting = [], False
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        if pending:
            found[".".join(name for _, name in stack)] = " ".join(pending)
        pending, collecting = [], False
    return found
