"""Bad edit input gets a typed error whose message names the bad value."""

from __future__ import annotations

import pytest

from editserve.editing.requests import EditRequest
from editserve.errors import InvalidRequestError


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt="is located in", subject="X", target_new=" Y"), "'is located in'"),
        (dict(prompt="{} and {} are", subject="X", target_new=" Y"), "exactly one"),
        (dict(prompt="{} is in {city}", subject="X", target_new=" Y"), "braces"),
        (dict(prompt="{} is in", subject="", target_new=" Y"), "subject must not be empty"),
        (dict(prompt="{} is in", subject="   ", target_new=" Y"), "subject"),
        (dict(prompt="{} is in", subject="X", target_new=""), "target_new must not be empty"),
        (dict(prompt="{} is in", subject="X", target_new="  "), "target_new"),
        (dict(prompt="{} is in ", subject="X", target_new=" Y"), "ends with a space"),
        (dict(prompt="{} is in", subject="X" * 3000, target_new=" Y"), "3000 characters"),
        (dict(prompt=5, subject="X", target_new=" Y"), "prompt must be a string"),
    ],
)
def test_bad_requests(kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        EditRequest(**kwargs)


def test_from_sentence():
    r = EditRequest.from_sentence("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", " English")
    assert r.prompt == "The mother tongue of {} is" and r.text.endswith("Darrieux is")
    with pytest.raises(InvalidRequestError, match="'Marie Curie' does not occur"):
        EditRequest.from_sentence("The mother tongue of Danielle Darrieux is", "Marie Curie", " English")
