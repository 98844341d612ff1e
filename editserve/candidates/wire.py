"""The candidate operations' results as ``editserve.v1`` messages (the gRPC servicer's replies)."""

from __future__ import annotations

from typing import Any

from editserve.candidates.compare import Comparison, Side
from editserve.candidates.operations import Listing, Outcome
from editserve.candidates.staging import Candidate


def candidate_to_pb(c: Candidate, routed: int = 0) -> Any:
    from editserve.control.gen import pb2

    msg = pb2.Candidate(id=c.id, model=c.model, patch_id=c.patch_id, weights=list(c.weights), rank=int(c.rank),
                        staged_at_head=int(c.staged_at_head), share=float(c.share), caller=c.caller,
                        staged_at=float(c.staged_at), routed_requests=int(routed), source=c.source,
                        added_patches=list(c.added), removed_patches=list(c.removed))
    if c.to_version is not None:
        msg.to_version = int(c.to_version)
    return msg


def listing_to_pb(listing: Listing) -> Any:
    from editserve.control.gen import pb2

    return pb2.ListCandidatesResponse(candidates=[candidate_to_pb(c, n) for c, n in listing.entries],
                                      served_version=listing.served_version, head_requests=listing.head_requests,
                                      max_candidates=listing.max_candidates, max_rank=listing.max_rank)


def outcome_to_pb(o: Outcome) -> Any:
    from editserve.control.gen import pb2

    msg = pb2.CandidateOutcome(candidate=o.candidate, outcome=o.outcome, patch_id=o.patch_id,
                               committed_as=o.committed_as)
    if o.version is not None:
        msg.version = int(o.version)
    return msg


def _side(s: Side) -> Any:
    from editserve.control.gen import pb2

    return pb2.CandidateSide(label=s.label, efficacy=s.efficacy, paraphrase=s.paraphrase,
                             neighbourhood=s.neighbourhood, requests=int(s.requests), weight_version=s.weight_version)


def comparison_to_pb(c: Comparison) -> Any:
    from editserve.control.gen import pb2

    scores = []
    for r in c.rows:
        msg = pb2.CandidateScore(kind=r.item.kind, prompt=r.item.prompt, target=r.item.target, other=r.item.other or "",
                                 head_target_logprob=r.head.target_logprob,
                                 candidate_target_logprob=r.candidate.target_logprob,
                                 head_top_token=r.head.top_token, candidate_top_token=r.candidate.top_token,
                                 head_success=r.success(r.head), candidate_success=r.success(r.candidate))
        if r.head.other_logprob is not None:
            msg.head_other_logprob = r.head.other_logprob
        if r.candidate.other_logprob is not None:
            msg.candidate_other_logprob = r.candidate.other_logprob
        scores.append(msg)
    return pb2.CompareCandidateResponse(candidate=c.candidate, served_version=c.served_version, head=_side(c.head),
                                        staged=_side(c.staged), scores=scores, seconds=c.seconds)
