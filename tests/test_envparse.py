"""editserve/envparse.py: settings from environment variables; errors name the variable and the value."""

from __future__ import annotations

import pytest

from editserve.envparse import real_number, whole_number
from editserve.errors import InvalidRequestError


def test_whole_number():
    assert whole_number({}, "X", 7) == 7
    assert whole_number({"X": "  "}, "X", 7) == 7
    assert whole_number({"X": " 12 "}, "X", 7) == 12
    assert whole_number({"X": "0"}, "X", 7) == 0
    for raw, positive in (("-1", False), ("1.5", False), ("many", False), ("0", True)):
        with pytest.raises(InvalidRequestError, match=f"X must be .*{raw!r}"):
            whole_number({"X": raw}, "X", 7, positive=positive)
    with pytest.raises(InvalidRequestError, match="whole number >= 0 of MiB, got 'x'"):
        whole_number({"X": "x"}, "X", 1, unit="MiB")


def test_real_number():
    assert real_number({}, "Y", 2.5) == 2.5
    assert real_number({"Y": "0"}, "Y", 2.5) == 0.0
    assert real_number({"Y": "-3"}, "Y", 2.5, minimum=None) == -3.0
    for raw, kw in (("soon", {}), ("-1", {}), ("nan", {}), ("inf", {}), ("0", {"strictly_above": True})):
        with pytest.raises(InvalidRequestError, match=f"Y must be .*{raw!r}"):
            real_number({"Y": raw}, "Y", 1.0, **kw)
    with pytest.raises(InvalidRequestError, match="Y must be a finite number of seconds > 0, got '0'"):
        real_number({"Y": "0"}, "Y", 1.0, strictly_above=True, unit="seconds")
