"""Log lines in both formats: whatever a caller puts in a value (a request's uid reaches the socket from outside)
can never forge a line or a field."""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest

from kleidi.observability import JsonFormatter, KeyValueFormatter

pytestmark = pytest.mark.unit

_QUOTED = r'"(?:[^"\\]|\\.)*"'
_FIELD = re.compile(rf"({_QUOTED}|[^ =\"]+)=({_QUOTED}|[^ \"]+)")
FORGED = 'a\nlevel=error\tmsg=forged "x" \\ \x1b[31m é'


def _record(exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\n2026-01-01T00:00:00 error kleidi forged")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("kleidi.server", logging.WARNING, __file__, 1, "request failed", None, exc_info)
    record.__dict__.update(extra)
    return record


def test_a_forged_uid_stays_inside_its_own_quoted_field() -> None:
    line = KeyValueFormatter().format(_record(uid=FORGED, api="v2", method="Encrypt"))
    assert "\n" not in line and "\t" not in line and "\x1b" not in line
    rest = line.split(" request failed ", 1)[1]
    pairs = _FIELD.findall(rest)
    assert " ".join(f"{k}={v}" for k, v in pairs) == rest  # the fields are all there is, none forged
    fields = dict(pairs)
    assert set(fields) == {"uid", "api", "method"}
    assert json.loads(fields["uid"]) == FORGED  # quoted as a JSON string: it reads back exactly
    assert fields["api"] == "v2" and fields["method"] == "Encrypt"  # plain values stay bare


def test_keys_and_values_with_spaces_equals_or_quotes_are_quoted() -> None:
    line = KeyValueFormatter().format(_record(**{"reason": "token refused the PIN", "odd key=": "a=b", "n": 3}))
    assert 'reason="token refused the PIN"' in line
    assert '"odd key="="a=b"' in line and " n=3" in line


def test_traceback_lines_cannot_pass_for_log_lines() -> None:
    text = KeyValueFormatter().format(_record(exc=True))
    first, *rest = text.split("\n")
    assert first.endswith("request failed") and rest
    assert all(line.startswith("\t") for line in rest)  # the forged "2026-... error" line included


def test_json_lines_hold_any_value() -> None:
    line = JsonFormatter().format(_record(exc=True, uid=FORGED))
    assert "\n" not in line
    assert json.loads(line)["uid"] == FORGED
