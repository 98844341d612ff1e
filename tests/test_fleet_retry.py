"""The follow loop's spacing of tries at a head the workers refused (engine/fleet.py, RefusedHead):
pure timing arithmetic on an explicit clock; the server-level check (a refused head shows in
status with its error and next try) is test_engine_server.py::test_a4."""

from __future__ import annotations

import pytest

from editserve.engine.fleet import FleetSettings, RefusedHead
from editserve.errors import InvalidRequestError


def test_tries_of_one_refused_head_double_up_to_the_cap():
    r = RefusedHead.first(7, "SwapFailed: NonFiniteError", now=100.0, first_delay_s=5.0)
    assert r.tries == 1 and r.waiting(7, 104.9) and not r.waiting(7, 105.0)
    waits = []
    now = 105.0
    for _ in range(8):
        r = r.again("SwapFailed: NonFiniteError", now, first_delay_s=5.0, max_delay_s=60.0)
        waits.append(r.retry_at - now)
        now = r.retry_at
    assert waits == [10.0, 20.0, 40.0, 60.0, 60.0, 60.0, 60.0, 60.0]
    assert r.tries == 9


def test_another_head_is_tried_at_once_and_status_shows_the_next_try():
    r = RefusedHead.first(7, "SwapFailed: ChecksumMismatch", now=0.0, first_delay_s=5.0)
    assert not r.waiting(8, 1.0)                         # the head moved (a fix, a rollback): no wait
    assert r.to_dict(now=2.0) == {"version": 7, "error": "SwapFailed: ChecksumMismatch", "tries": 1,
                                  "retry_in_s": 3.0}
    assert r.to_dict(now=9.0)["retry_in_s"] == 0.0


def test_the_cap_is_configured_and_validated():
    s = FleetSettings.from_env(environ={"EDITSERVE_REFUSED_RETRY_MAX_S": "30"})
    assert s.refused_retry_max_s == 30.0
    assert FleetSettings.from_env(environ={}).refused_retry_max_s == 300.0
    with pytest.raises(InvalidRequestError, match="EDITSERVE_REFUSED_RETRY_MAX_S"):
        FleetSettings.from_env(environ={"EDITSERVE_REFUSED_RETRY_MAX_S": "0"})
    with pytest.raises(InvalidRequestError, match="refused_retry_max_s"):
        FleetSettings(replica_id="r", refused_retry_max_s=-1.0)
