"""Which editing methods an edit request may name, and which one it gets when it names none.

`DEFAULT_METHOD` is the one switch for the method of commits that do not choose; an operator
overrides it per server with ``EDITSERVE_DEFAULT_METHOD``. It is AlphaEdit: null-space-constrained
edits that keep the keys of every committed edit in place, the method for a ledger that grows for
months (issue 16, docs/lifelong.md: after 200 sequential CounterFact commits on SmolLM2, held-out
perplexity ×1.10 against ROME's ×1.77, and ROME collapsed at 300). ROME and MEMIT stay available
by name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from editserve.editing.requests import METHODS
from editserve.errors import InvalidRequestError

EDIT_METHODS = METHODS                 # editing.requests: the one tuple
DEFAULT_METHOD = "alphaedit"
DEFAULT_METHOD_ENV = "EDITSERVE_DEFAULT_METHOD"


def default_method(environ: Mapping[str, str] | None = None) -> str:
    """The method of an edit request that names none: ``$EDITSERVE_DEFAULT_METHOD`` or `DEFAULT_METHOD`."""
    env = os.environ if environ is None else environ
    method = env.get(DEFAULT_METHOD_ENV, "").strip() or DEFAULT_METHOD
    if method not in EDIT_METHODS:
        raise InvalidRequestError(f"{DEFAULT_METHOD_ENV}={method!r} is not an editing method; "
                                  f"choose one of {list(EDIT_METHODS)}")
    return method
