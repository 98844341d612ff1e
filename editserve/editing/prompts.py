"""Tokenised prompt batches split at the subject's last token, and scoring of target continuations.

ROME/MEMIT only change the model at the subject's last token, so everything before it is
constant during v* optimisation. `SplitBatch` separates each sequence into

    prefix  = tokens before the subject's last token       (left-padded, run once, no grad)
    suffix  = subject's last token + rest of prompt [+ target tokens but the last]  (right-padded)

so each optimisation step only runs the short suffix on top of a cached prefix.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from editserve.editing.arch import get_module, spec_for
from editserve.errors import InvalidRequestError


def subject_last_index(tok: object, text: str, subject_end: int) -> tuple[list[int], int]:
    """Token ids of `text` and the index of the token holding character ``subject_end - 1``."""
    enc = tok(text, return_offsets_mapping=True)  # type: ignore[operator]
    ids: list[int] = enc["input_ids"]
    offsets = enc["offset_mapping"]
    idx = max((i for i, (s, e) in enumerate(offsets) if e > s and s < subject_end), default=None)
    if idx is None:
        raise InvalidRequestError(f"subject ending at character {subject_end} of {text!r} maps to no token")
    return ids, idx


def target_ids(tok: object, target: str) -> list[int]:
    ids = tok(target, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    if not ids:
        raise InvalidRequestError(f"target {target!r} tokenises to nothing")
    return ids


@dataclass
class SplitBatch:
    """Sequences split at the subject's last token. Shapes: B sequences, P prefix, S suffix tokens."""

    prefix_ids: torch.Tensor    # [B, P] left-padded
    suffix_ids: torch.Tensor    # [B, S] right-padded
    mask: torch.Tensor          # [B, P+S] attention mask over prefix and suffix
    positions: torch.Tensor     # [B, P+S] position ids
    score_rows: torch.Tensor    # [T] sequence index of each scored token
    score_cols: torch.Tensor    # [T] suffix position whose logits predict it
    score_ids: torch.Tensor     # [T] the token id to score
    last_cols: torch.Tensor     # [B] suffix position of each prompt's last token

    @property
    def prefix_len(self) -> int:
        return int(self.prefix_ids.shape[1])

    def to(self, device: torch.device | str) -> "SplitBatch":
        return SplitBatch(**{k: v.to(device) for k, v in self.__dict__.items()})


def split_batch(tok: object, items: Sequence[tuple[str, int, list[int]]], pad_id: int) -> SplitBatch:
    """Build a `SplitBatch` from (text, subject_end_char, target_ids) items; target may be empty."""
    prefixes, suffixes, rows, cols, tids, last_cols = [], [], [], [], [], []
    for b, (text, subject_end, tgt) in enumerate(items):
        ids, s_last = subject_last_index(tok, text, subject_end)
        prefixes.append(ids[:s_last])
        suffix = ids[s_last:] + tgt[:-1]
        suffixes.append(suffix)
        end = len(ids) - s_last - 1  # suffix position of the prompt's last token
        last_cols.append(end)
        for i, t in enumerate(tgt):
            rows.append(b)
            cols.append(end + i)
            tids.append(t)
    B = len(items)
    P = max(len(p) for p in prefixes)
    S = max(len(s) for s in suffixes)
    prefix_ids = torch.full((B, P), pad_id, dtype=torch.long)
    suffix_ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P + S), dtype=torch.long)
    for b, (p, s) in enumerate(zip(prefixes, suffixes)):
        if p:
            prefix_ids[b, P - len(p):] = torch.tensor(p)
            mask[b, P - len(p):P] = 1
        suffix_ids[b, :len(s)] = torch.tensor(s)
        mask[b, P:P + len(s)] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return SplitBatch(
        prefix_ids=prefix_ids, suffix_ids=suffix_ids, mask=mask, positions=positions,
        score_rows=torch.tensor(rows, dtype=torch.long), score_cols=torch.tensor(cols, dtype=torch.long),
        score_ids=torch.tensor(tids, dtype=torch.long),
        last_cols=torch.tensor(last_cols, dtype=torch.long),
    )


class PrefixRunner:
    """Runs the prefix of a `SplitBatch` once and the suffix as often as needed.

    `suffix_hidden` returns the final-normed hidden states of the suffix [B, S, d_model];
    `logits_at` applies the LM head only at the requested (row, col) positions.
    """

    def __init__(self, model: torch.nn.Module, batch: SplitBatch) -> None:
        self.model = model
        self.spec = spec_for(model)
        self.body = get_module(model, self.spec.base)
        self.lm_head = get_module(model, self.spec.lm_head)
        self.batch = batch
        self._cache = None
        if batch.prefix_len > 0:
            with torch.no_grad():
                out = self.body(
                    input_ids=batch.prefix_ids,
                    attention_mask=batch.mask[:, : batch.prefix_len],
                    position_ids=batch.positions[:, : batch.prefix_len],
                    use_cache=True,
                )
            self._cache = out.past_key_values

    def suffix_hidden(self) -> torch.Tensor:
        b = self.batch
        past = copy.deepcopy(self._cache) if self._cache is not None else None
        out = self.body(
            input_ids=b.suffix_ids,
            attention_mask=b.mask,
            position_ids=b.positions[:, b.prefix_len:],
            past_key_values=past,
            use_cache=past is not None,
        )
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def logits_at(self, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Logits [T, vocab] at suffix positions (rows[i], cols[i])."""
        return self.lm_head(hidden[rows, cols]).float()

    def _target_logp(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities [T, vocab] at the scored positions and of the scored target tokens [T]."""
        b = self.batch
        logp = torch.log_softmax(self.logits_at(hidden, b.score_rows, b.score_cols), dim=-1)
        return logp, logp.gather(1, b.score_ids[:, None])[:, 0]

    def target_nll(self, hidden: torch.Tensor) -> torch.Tensor:
        """Per-token NLL [T] of the batch's scored target tokens."""
        return -self._target_logp(hidden)[1]

    def target_scores(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per scored target token: NLL [T] and margin [T] = log p(target) − max log p(any other token)
        (> 0: the target is the most probable token there; no gradient)."""
        logp, tgt = self._target_logp(hidden)                                                 # [T, vocab], [T]
        with torch.no_grad():
            other = logp.detach().scatter(1, self.batch.score_ids[:, None], float("-inf")).amax(-1)  # [T]
        return -tgt, tgt.detach() - other


def mean_per_sequence(values: torch.Tensor, seq: torch.Tensor, n_seq: int) -> torch.Tensor:
    """Mean of `values` [T] grouped by `seq` [T] → [n_seq] (zero for sequences with no entries)."""
    sums = torch.zeros(n_seq, dtype=values.dtype, device=values.device).index_add(0, seq, values)
    counts = torch.zeros(n_seq, dtype=values.dtype, device=values.device).index_add(0, seq, torch.ones_like(values))
    return sums / counts.clamp(min=1)
