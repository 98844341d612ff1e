"""Which editing methods an edit request may name, and which one it gets when it names none.

A server's default method (`server_default_method`) is ``EDITSERVE_DEFAULT_METHOD`` when an operator
sets it. Otherwise it is ``gated`` on a server whose model has neuron slots at the gated method's layer
(``editserve serve --neuron-slots``): one neuron per fact, the method that keeps every lifelong bound
on SmolLM2 (docs/lifelong.md, "Gated edits"). Without slots it is `DEFAULT_METHOD`, AlphaEdit:
null-space-constrained edits that keep the keys of every committed edit in place (after 200
sequential CounterFact commits on SmolLM2, held-out perplexity ×1.10 against ROME's ×1.77). ROME and
MEMIT stay available by name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from editserve.editing.requests import METHODS
from editserve.errors import InvalidRequestError

EDIT_METHODS = METHODS                 # editing.requests: the one tuple
DEFAULT_METHOD = "alphaedit"          # without neuron slots at the gated layer
SLOTS_METHOD = "gated"                # with them
DEFAULT_METHOD_ENV = "EDITSERVE_DEFAULT_METHOD"


def default_method(environ: Mapping[str, str] | None = None) -> str:
    """The method of an edit request that names none: ``$EDITSERVE_DEFAULT_METHOD`` or `DEFAULT_METHOD`."""
    env = os.environ if environ is None else environ
    method = env.get(DEFAULT_METHOD_ENV, "").strip() or DEFAULT_METHOD
    if method not in EDIT_METHODS:
        raise InvalidRequestError(f"{DEFAULT_METHOD_ENV}={method!r} is not an editing method; "
                                  f"choose one of {list(EDIT_METHODS)}")
    return method


def chosen_default_method(environ: Mapping[str, str] | None = None) -> str | None:
    """``$EDITSERVE_DEFAULT_METHOD`` checked, or None when an operator did not set it."""
    env = os.environ if environ is None else environ
    return default_method(env) if env.get(DEFAULT_METHOD_ENV, "").strip() else None


def server_default_method(chosen: str | None, gated_layer_has_slots: bool) -> str:
    """The method of a server's edits that name none: the operator's `chosen` one, else ``gated`` when
    the served model has neuron slots at the gated method's layer, else `DEFAULT_METHOD`."""
    if chosen is not None:
        return chosen
    return SLOTS_METHOD if gated_layer_has_slots else DEFAULT_METHOD
