"""Hyper-parameters of ROME, MEMIT, AlphaEdit and gated edits as frozen dataclasses, loaded from per-model data files.

Files live in ``editserve/data/hparams/<method>/``: ``<model-name>.json`` for a specific model
(e.g. ``smollm2-135m-instruct.json``), else ``<family>.json`` for the architecture family.
Fields given explicitly (`overrides`) win over the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from editserve.errors import InvalidRequestError

KEY_MODES = ("mean", "per_prompt")            # MEMIT / AlphaEdit `keys`
EARLY_STOPS = ("nll", "most_probable")        # ValueParams.early_stop


@dataclass(frozen=True)
class StatsParams:
    """Covariance statistics of the down-projection input."""

    n_tokens: int = 100_000        # tokens of corpus text to average over
    seq_len: int = 256             # max tokens per sequence
    batch_size: int = 8


@dataclass(frozen=True)
class ValueParams:
    """Optimisation of the value v* (shared by ROME and MEMIT)."""

    lr: float = 0.5
    max_steps: int = 25
    kl_factor: float = 0.0625          # weight of KL(orig || edited) on "{subject} is a"
    weight_decay: float = 1e-3         # ‖δ‖² / ‖h‖² penalty
    clamp_norm_factor: float = 4.0     # ‖δ‖ ≤ factor · ‖h‖
    early_stop_nll: float = 0.05       # stop when mean target NLL drops below this
    # "nll": stop on early_stop_nll only. "most_probable" (ENCORE's MPES, arXiv 2502.01636): also stop
    # once every target token, on every prompt of the request (bare and prefixed), is the most probable
    # token by at least early_stop_margin (log-probability): δ no larger than the edit needs.
    early_stop: str = "nll"
    early_stop_margin: float = 0.0
    kl_prompt: str = "{} is a"
    # Clamp factors to retry with, in order, for a request whose edit does not hold on its own prompt
    # with the computed patch in place (edit.py `_holds`); the others keep their factor. () = no retry.
    escalate_clamp: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        steps = self.escalate_clamp
        if not isinstance(steps, tuple) or not all(isinstance(f, (int, float)) and f > 0 for f in steps):
            raise InvalidRequestError(f"escalate_clamp must be a list of positive numbers, got {steps!r}")
        if self.early_stop not in EARLY_STOPS:
            raise InvalidRequestError(f"early_stop must be one of {list(EARLY_STOPS)}, got {self.early_stop!r}")
        margin = self.early_stop_margin
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 100:
            raise InvalidRequestError(f"early_stop_margin must be a number in [0, 100), got {margin!r}")
        if any(b <= a for a, b in zip((self.clamp_norm_factor, *steps), steps)):
            raise InvalidRequestError(f"escalate_clamp must rise above clamp_norm_factor={self.clamp_norm_factor}, "
                                      f"got {list(steps)!r}")


@dataclass(frozen=True)
class PrefixParams:
    """Context prefixes that keys and values are averaged over (ROME §3.1)."""

    n_prefixes: int = 10
    prefix_tokens: int = 10
    seed: int = 0


@dataclass(frozen=True)
class RomeParams:
    layer: int = 5
    value: ValueParams = ValueParams()
    prefixes: PrefixParams = PrefixParams()
    stats: StatsParams = StatsParams()

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)


def check_spread(spread: Any, layers: tuple[int, ...]) -> None:
    """`spread` is () (MEMIT's equal shares) or one positive weight per layer of `layers`."""
    if not isinstance(spread, tuple) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0 for w in spread):
        raise InvalidRequestError(f"spread must be a list of positive numbers, one per layer, got {spread!r}")
    if spread and len(spread) != len(layers):
        raise InvalidRequestError(f"spread has {len(spread)} weight(s) for {len(layers)} layer(s) {list(layers)}: "
                                  f"got {list(spread)!r}")


@dataclass(frozen=True)
class MemitParams:
    layers: tuple[int, ...] = (3, 4, 5, 6, 7)
    cov_weight: float = 1500.0     # λ in Δ = R Kᵀ (λC + KKᵀ)⁻¹
    keys: str = "mean"             # "mean": K = prefix-averaged keys; "per_prompt": KKᵀ over every prompt (memit.py)
    # Layer i of the range is asked for w_i / Σ_{j≥i} w_j of the residual still missing at the top
    # (edit.py `_spread`); () = equal weights, MEMIT's 1/(L − i).
    spread: tuple[float, ...] = ()
    value: ValueParams = ValueParams()
    prefixes: PrefixParams = PrefixParams()
    stats: StatsParams = StatsParams()

    def __post_init__(self) -> None:
        if self.keys not in KEY_MODES:
            raise InvalidRequestError(f"unknown MEMIT keys mode {self.keys!r}; choose one of {list(KEY_MODES)}")
        check_spread(self.spread, self.layers)


@dataclass(frozen=True)
class AlphaEditParams:
    """AlphaEdit (alphaedit.py): MEMIT's keys and residuals, a null-space-projected solve."""

    layers: tuple[int, ...] = (3, 4, 5, 6, 7)
    nullspace_threshold: float = 2e-2   # keep C's eigen-directions with eigenvalue below this (absolute)
    alpha: float = 10.0                 # α in Δ = R K₁ᵀ P (K_pK_pᵀ P + K₁K₁ᵀ P + λCP + αI)⁻¹
    cov_weight: float = 0.0             # λ: MEMIT's covariance penalty kept inside the null space (0 = paper)
    keys: str = "mean"                  # "per_prompt": K₁K₁ᵀ is the mean over every prompt's key (memit.py)
    spread: tuple[float, ...] = ()      # per-layer share weights, as MemitParams.spread
    value: ValueParams = ValueParams()
    prefixes: PrefixParams = PrefixParams()
    stats: StatsParams = StatsParams()

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise InvalidRequestError(f"alpha must be a positive number, got {self.alpha!r}")
        if not (isinstance(self.nullspace_threshold, (int, float)) and self.nullspace_threshold > 0):
            raise InvalidRequestError(f"nullspace_threshold must be a positive number, got {self.nullspace_threshold!r}")
        if not (isinstance(self.cov_weight, (int, float)) and self.cov_weight >= 0):
            raise InvalidRequestError(f"cov_weight must be a number ≥ 0, got {self.cov_weight!r}")
        if self.keys not in KEY_MODES:
            raise InvalidRequestError(f"unknown AlphaEdit keys mode {self.keys!r}; choose one of {list(KEY_MODES)}")
        check_spread(self.spread, self.layers)


def _gate_value() -> ValueParams:
    # AlphaEdit's SmolLM2 value settings (editserve/data/hparams/alphaedit), without clamp escalation.
    return ValueParams(lr=1.0, max_steps=25, kl_factor=0.0625, weight_decay=1e-3, clamp_norm_factor=0.75)


@dataclass(frozen=True)
class GateParams:
    """Hyper-parameters of a gated edit (editing/gated.py; margin 12 chosen on the tuning split:
    docs/lifelong.md, "Gated edits")."""

    layer: int = 5                     # the MLP that holds the neurons; δ is written at its output
    margin: float = 12.0               # g·x of the least of the subject's inputs
    l2: float = 1e-4                   # ridge on g (in units of the mean corpus input norm)
    max_iter: int = 200                # L-BFGS iterations of the classifier
    value_prefixes: int = 5            # context prefixes δ is optimised on (the gate sees all given)
    strength: float = 1.0              # δ must hold at strength × the gate's activation
    guard: float = 0.0                 # weight share of earlier subjects among the gate's negatives, [0, 1)
    negatives: int = 8192              # statistics-corpus tokens the gate is fit against (served edits)
    value: ValueParams = field(default_factory=_gate_value)
    prefixes: PrefixParams = PrefixParams()   # the gate sees the bare prompt and these (ROME's 10)

    def __post_init__(self) -> None:
        for name, least in (("margin", "positive"), ("strength", "positive"), ("l2", "non-negative")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 if name == "l2" else v > 0):
                raise InvalidRequestError(f"gate {name} must be a {least} number, got {v!r}")
        if isinstance(self.guard, bool) or not isinstance(self.guard, (int, float)) or not 0 <= self.guard < 1:
            raise InvalidRequestError(f"gate guard must be a number in [0, 1), got {self.guard!r}")
        for name in ("layer", "value_prefixes", "negatives"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "negatives" else 0):
                raise InvalidRequestError(f"gate {name} must be a {'positive' if name == 'negatives' else 'non-negative'} "
                                          f"integer, got {v!r}")

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)


_NESTED = {"value": ValueParams, "prefixes": PrefixParams, "stats": StatsParams}
_METHODS = {"rome": RomeParams, "memit": MemitParams, "alphaedit": AlphaEditParams, "gated": GateParams}
HParams = RomeParams | MemitParams | AlphaEditParams | GateParams


def statistics_of(hp: HParams) -> StatsParams | None:
    """The covariance statistics (E[kkᵀ]) `hp`'s method reads; None for a gated edit, which reads none."""
    return None if isinstance(hp, GateParams) else hp.stats


def _field_default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields
    if unknown:
        raise InvalidRequestError(f"unknown hyper-parameter(s) {sorted(unknown)} in {where}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in _NESTED and isinstance(value, dict):
            # A nested group given in part keeps the class's own default for the rest (GateParams'
            # value settings are not ValueParams' defaults).
            default = _field_default(cls, key)
            base = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)}
            kwargs[key] = _build(_NESTED[key], {**base, **value}, f"{where}.{key}")
        elif key in ("layers", "escalate_clamp", "spread") and isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _file_data(method: str, names: list[str]) -> tuple[dict[str, Any], str]:
    root = resources.files("editserve").joinpath("data", "hparams", method)
    for name in names:
        f = root.joinpath(f"{name}.json")
        if f.is_file():
            return json.loads(f.read_text()), f"{method}/{name}.json"
    return {}, "built-in defaults"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def file_names(checkpoint: str | None, family: str) -> list[str]:
    """Names to look hyper-parameter files up by: the checkpoint's folder name (lower case), then the family."""
    return ([Path(str(checkpoint)).name.lower()] if checkpoint else []) + [family]


def load_hparams(method: str, model_names: list[str], overrides: dict[str, Any] | None = None) -> HParams:
    """Hyper-parameters for `method`, from the first data file among `model_names`, plus overrides."""
    if method not in _METHODS:
        raise InvalidRequestError(f"unknown method {method!r}; choose one of {sorted(_METHODS)}")
    data, where = _file_data(method, model_names)
    if overrides:
        data = _merge(data, overrides)
        where += " + overrides"
    return _build(_METHODS[method], data, where)


def class_defaults(method: str) -> dict[str, Any]:
    """The dataclass defaults of `method` (no per-model file): what a field a stored patch does not
    name meant when the patch was computed, if the field was added later with a neutral default
    (AlphaEdit's ``cov_weight`` = 0, ``value.escalate_clamp`` = (), ``spread`` = ()). Rebase replays patches over this."""
    if method not in _METHODS:
        raise InvalidRequestError(f"unknown method {method!r}; choose one of {sorted(_METHODS)}")
    return to_dict(_METHODS[method]())


def to_dict(hp: HParams) -> dict[str, Any]:
    d = dataclasses.asdict(hp)
    if "layers" in d:
        d["layers"] = list(d["layers"])
    if "spread" in d:
        d["spread"] = list(d["spread"])
    d["value"]["escalate_clamp"] = list(d["value"]["escalate_clamp"])
    return d
