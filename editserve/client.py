"""`EditClient`: a synchronous Python client of the gRPC control plane (``editserve.v1``).

    from editserve.client import EditClient
    with EditClient("127.0.0.1:50051") as c:       # token: see `resolve_token`
        r = c.edit([{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
                     "target_new": " Rome", "target_true": " Paris"}])
        print(r.change.version, r.report.efficacy)

The bearer token, when none is passed, is `resolve_token`'s: ``$EDITSERVE_CONTROL_TOKEN``, else
the admin token a server on this machine created in ``$EDITSERVE_HOME/control-tokens.json``.

Failures raise `ControlError` with the gRPC status code name, the server's message and, for a
probe-gate rejection, the full ``ProbeReport``. ``edit(..., progress=callback)`` follows the
edit's stages: it opens a ``WatchEvents`` stream first and hands the callback the progress
(and rejection) events of its own operation.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from editserve.errors import EditserveError

log = logging.getLogger(__name__)

DEFAULT_TARGET = "127.0.0.1:50051"
TARGET_ENV = "EDITSERVE_GRPC_TARGET"
OPERATION_KEY = "editserve-operation-id"       # the server's editserve.control.service.OPERATION_KEY
WATCH_READY_TIMEOUT_S = 10.0
FINAL_EVENT_WAIT_S = 2.0


TOKEN_ENV = "EDITSERVE_CONTROL_TOKEN"        # the server's editserve.control.auth.TOKEN_ENV
TOKEN_HINT = (f"pass --token-file FILE or --token TOKEN, or set {TOKEN_ENV}; a server started on this machine "
              "with no token configured writes its admin token to $EDITSERVE_HOME/control-tokens.json, "
              "which is used by default")


class TokenError(EditserveError, ValueError):
    """No bearer token could be found, or the token file given cannot be read."""


def read_token_file(path: str) -> str:
    """The token in `path` (surrounding whitespace stripped); `TokenError` naming the file otherwise."""
    try:
        token = Path(path).read_text().strip()
    except FileNotFoundError:
        raise TokenError(f"--token-file {path!r}: no such file") from None
    except IsADirectoryError:
        raise TokenError(f"--token-file {path!r} is a directory, not a file") from None
    except PermissionError:
        raise TokenError(f"--token-file {path!r}: permission denied") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenError(f"--token-file {path!r} cannot be read: {type(exc).__name__}") from None
    if not token or any(c.isspace() for c in token):
        raise TokenError(f"--token-file {path!r} must hold one token on one line (it holds "
                         f"{'nothing' if not token else 'whitespace inside the token'})")
    return token


def resolve_token(token: str | None = None, token_file: str | None = None,
                  environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(token, where it came from): `token`, else `token_file`, else ``$EDITSERVE_CONTROL_TOKEN``, else
    the local admin token under ``$EDITSERVE_HOME``; `TokenError` (naming every way to give one) if none."""
    from editserve.control.home import local_admin_token, local_tokens_file

    env = os.environ if environ is None else environ
    if token is not None:
        if not token.strip():
            raise TokenError("--token is empty; " + TOKEN_HINT)
        return token.strip(), "--token"
    if token_file is not None:
        return read_token_file(token_file), f"--token-file {token_file}"
    if env.get(TOKEN_ENV, "").strip():
        return env[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    local = local_admin_token(dict(env))
    if local:
        return local, str(local_tokens_file(dict(env)))
    raise TokenError(f"no control token: {TOKEN_HINT} (there is no {str(local_tokens_file(dict(env)))!r})")


class ControlError(EditserveError):
    """A call failed: `code` is the status name (e.g. ``"FAILED_PRECONDITION"``)."""

    def __init__(self, code: str, message: str, report: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.details = message
        self.report = report


def _fact(f: Any) -> Any:
    from editserve.control.gen import pb2

    if isinstance(f, Mapping):
        return pb2.Fact(**{k: v for k, v in f.items() if v is not None})
    return pb2.Fact(prompt=f.prompt, subject=f.subject, target_new=f.target_new, target_true=f.target_true or "")


class EditClient:
    def __init__(self, target: str | None = None, token: str | None = None, *, ca: str | None = None,
                 cert: str | None = None, key: str | None = None, timeout_s: float = 900.0,
                 token_file: str | None = None) -> None:
        from editserve.control.gen import pb2_grpc

        self.target = target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET
        if token is not None:                # given explicitly (an empty one sends no token at all)
            self.token, self.token_source = token, "argument"
        else:
            self.token, self.token_source = resolve_token(None, token_file)
        self.timeout_s = timeout_s
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        if ca or cert:
            creds = grpc.ssl_channel_credentials(
                root_certificates=Path(ca).read_bytes() if ca else None,
                private_key=Path(key).read_bytes() if key else None,
                certificate_chain=Path(cert).read_bytes() if cert else None)
            self.channel = grpc.secure_channel(self.target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(self.target, options=options)
        self.stub = pb2_grpc.EditServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "EditClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def _call(self, name: str, request: Any, timeout_s: float | None = None,
              metadata: Sequence[tuple[str, str]] = ()) -> Any:
        try:
            return getattr(self.stub, name)(request, metadata=self._metadata() + list(metadata),
                                            timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as err:
            raise _error(err) from None

    # -- calls ----------------------------------------------------------------------------------

    def edit(self, facts: Sequence[Any], method: str = "", layers: Sequence[int] = (), dry_run: bool = False,
             expected_head: int | None = None, idempotency_key: str = "", thresholds: Mapping[str, float] | None = None,
             paraphrases: Sequence[tuple[str, int]] = (), neighbours: Sequence[tuple[str, int]] = (),
             progress: Callable[[Any], None] | None = None, operation_id: str = "", skip_gate: bool = False,
             wait_for_replicas_s: float | None = None, hparams: Mapping[str, Any] | None = None) -> Any:
        """Edit `facts` (mappings with prompt/subject/target_new/target_true, or `EditRequest`s).

        `hparams`: overrides of the method's hyper-parameters, nested as in its hyper-parameter
        file (``{"value": {"max_steps": 40}}``); the server checks them against its allow-list and
        bounds (docs/security.md) and refuses others with INVALID_ARGUMENT naming the key.

        `progress` receives the ``Event``s (kind ``progress`` or ``rejected``) of this edit, from a
        ``WatchEvents`` stream opened before the call (it needs the viewer role, which editors have)."""
        from editserve.control.gen import pb2

        req = pb2.EditRequest(facts=[_fact(f) for f in facts], method=method, layers=list(layers), dry_run=dry_run,
                              idempotency_key=idempotency_key,
                              thresholds=pb2.ProbeThresholds(**dict(thresholds or {})),
                              paraphrases=[pb2.GatePrompt(prompt=p, fact_index=i) for p, i in paraphrases],
                              neighbours=[pb2.GatePrompt(prompt=p, fact_index=i) for p, i in neighbours],
                              skip_gate=skip_gate, hparams_json=json.dumps(dict(hparams)) if hparams else "")
        if expected_head is not None:
            req.expected_head = expected_head
        if wait_for_replicas_s is not None:
            req.wait_for_replicas_s = wait_for_replicas_s
        op = operation_id or uuid.uuid4().hex[:12]
        if progress is None:
            return self._call("Edit", req, metadata=[(OPERATION_KEY, op)])
        return self._with_progress(lambda: self._call("Edit", req, metadata=[(OPERATION_KEY, op)]), op, progress)

    def _with_progress(self, call: Callable[[], Any], op: str, progress: Callable[[Any], None]) -> Any:
        from editserve.control.gen import pb2

        stream = self.stub.WatchEvents(pb2.WatchEventsRequest(), metadata=self._metadata())
        ready, final = threading.Event(), threading.Event()

        def pump() -> None:
            try:
                for e in stream:
                    if e.kind == "watching":
                        ready.set()
                    elif e.operation_id == op:
                        progress(e)
                        if e.kind == "rejected" or e.progress >= 1.0:
                            final.set()
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.CANCELLED:
                    log.warning("progress stream ended: %s: %s", err.code().name, err.details())
            finally:
                ready.set()

        thread = threading.Thread(target=pump, name="editserve-progress", daemon=True)
        thread.start()
        if not ready.wait(WATCH_READY_TIMEOUT_S):
            log.warning("no progress stream after %.0f s; editing without progress", WATCH_READY_TIMEOUT_S)
        try:
            return call()
        finally:
            final.wait(FINAL_EVENT_WAIT_S)         # the last events may trail the reply a little
            stream.cancel()
            thread.join(WATCH_READY_TIMEOUT_S)

    def rollback(self, version: int, expected_head: int | None = None, wait_for_replicas_s: float | None = None) -> Any:
        from editserve.control.gen import pb2

        req = pb2.RollbackRequest(version=version)
        if expected_head is not None:
            req.expected_head = expected_head
        if wait_for_replicas_s is not None:
            req.wait_for_replicas_s = wait_for_replicas_s
        return self._call("Rollback", req)

    def revert(self, version: int, expected_head: int | None = None, idempotency_key: str = "",
               max_drop: float | None = None) -> Any:
        """``Revert``; `max_drop` applies when a consolidation holds the version's patch."""
        from editserve.control.gen import pb2

        req = pb2.RevertRequest(version=version, idempotency_key=idempotency_key)
        if expected_head is not None:
            req.expected_head = expected_head
        if max_drop is not None:
            req.max_drop = max_drop
        return self._call("Revert", req)

    def rebase(self, version: int, expected_head: int | None = None, idempotency_key: str = "",
               wait_for_replicas_s: float | None = None, progress: Callable[[Any], None] | None = None,
               operation_id: str = "", max_drop: float | None = None) -> Any:
        """Revert version `version`'s patch and recompute the later ones on the server (``Rebase``);
        a ``RebaseResponse`` with each later edit's scores before and after. `progress` as in `edit`;
        `max_drop` as in `revert` (when a consolidation holds the patch)."""
        from editserve.control.gen import pb2

        req = pb2.RebaseRequest(version=version, idempotency_key=idempotency_key)
        if expected_head is not None:
            req.expected_head = expected_head
        if max_drop is not None:
            req.max_drop = max_drop
        if wait_for_replicas_s is not None:
            req.wait_for_replicas_s = wait_for_replicas_s
        op = operation_id or uuid.uuid4().hex[:12]
        if progress is None:
            return self._call("Rebase", req, metadata=[(OPERATION_KEY, op)])
        return self._with_progress(lambda: self._call("Rebase", req, metadata=[(OPERATION_KEY, op)]), op, progress)

    def consolidate(self, expected_head: int | None = None, idempotency_key: str = "", ridge: float | None = None,
                    max_drop: float | None = None, wait_for_replicas_s: float | None = None,
                    progress: Callable[[Any], None] | None = None, operation_id: str = "",
                    whole: bool | None = None) -> Any:
        """Replace the active patches that carry preserved keys by one least-disturbance patch on
        the server (``Consolidate``); a ``ConsolidateResponse``. `progress` as in `edit`; `whole`:
        re-solve the earlier consolidated patches too."""
        from editserve.control.gen import pb2

        req = pb2.ConsolidateRequest(idempotency_key=idempotency_key)
        for field, value in (("expected_head", expected_head), ("ridge", ridge), ("max_drop", max_drop),
                             ("wait_for_replicas_s", wait_for_replicas_s), ("whole", whole)):
            if value is not None:
                setattr(req, field, value)
        op = operation_id or uuid.uuid4().hex[:12]
        if progress is None:
            return self._call("Consolidate", req, metadata=[(OPERATION_KEY, op)])
        return self._with_progress(lambda: self._call("Consolidate", req, metadata=[(OPERATION_KEY, op)]), op,
                                   progress)

    def versions(self, limit: int = 0) -> Any:
        from editserve.control.gen import pb2

        return self._call("ListVersions", pb2.ListVersionsRequest(limit=limit))

    def get_version(self, version: int) -> Any:
        from editserve.control.gen import pb2

        return self._call("GetVersion", pb2.GetVersionRequest(version=version))

    def diff(self, a: int, b: int) -> Any:
        from editserve.control.gen import pb2

        return self._call("Diff", pb2.DiffRequest(a=a, b=b))

    def probe(self, items: Sequence[tuple[str, str] | tuple[str, str, str]]) -> Any:
        from editserve.control.gen import pb2

        msgs = [pb2.ProbeItem(prompt=it[0], target=it[1], other=it[2] if len(it) > 2 else "") for it in items]
        return self._call("Probe", pb2.ProbeRequest(items=msgs))

    def trace(self, prompt: str, subject: str, target: str | None = None, kind: str = "hidden", samples: int = 10,
              seed: int = 0, window: int = 10, noise_scale: float = 3.0, timeout_s: float | None = None) -> Any:
        """Causal trace of a fact on the served version: a `TraceResponse` (grid as JSON, PNG bytes).
        `editserve.editing.tracing.TraceResult.from_dict(json.loads(r.result_json))` rebuilds the result."""
        from editserve.control.gen import pb2

        req = pb2.TraceRequest(prompt=prompt, subject=subject, target=target or "", kind=kind, samples=samples,
                               seed=seed, window=window, noise_scale=noise_scale)
        return self._call("Trace", req, timeout_s=timeout_s)

    def status(self) -> Any:
        from editserve.control.gen import pb2

        return self._call("Status", pb2.StatusRequest(), timeout_s=60)

    def watch(self, since_id: int = 0, include_history: bool = False, timeout_s: float | None = None) -> Iterator[Any]:
        from editserve.control.gen import pb2

        stream = self.stub.WatchEvents(pb2.WatchEventsRequest(since_id=since_id, include_history=include_history),
                                       metadata=self._metadata(), timeout=timeout_s)
        try:
            yield from stream
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED:
                return
            raise _error(err) from None
        finally:
            stream.cancel()

    def export_patch(self, ref: str = "", version: int = 0) -> Any:
        from editserve.control.gen import pb2

        return self._call("ExportPatch", pb2.ExportPatchRequest(ref=ref, version=version))

    def import_patch(self, manifest_json: bytes, factors: bytes, expected_head: int | None = None,
                     idempotency_key: str = "", keys: bytes = b"") -> Any:
        """Import a patch export: what `export_patch` returned (``manifest_json``, ``factors`` and,
        for a patch with preserved keys, ``keys``: the server refuses an upload without the keys
        its manifest lists)."""
        from editserve.control.gen import pb2

        req = pb2.ImportPatchRequest(manifest_json=manifest_json, factors=factors, idempotency_key=idempotency_key,
                                     keys=keys)
        if expected_head is not None:
            req.expected_head = expected_head
        return self._call("ImportPatch", req)

    # -- candidates (docs/candidates.md) ------------------------------------------------------

    def candidates(self) -> Any:
        """The staged candidates (``ListCandidatesResponse``)."""
        from editserve.control.gen import pb2

        return self._call("ListCandidates", pb2.ListCandidatesRequest(), timeout_s=60)

    def stage(self, ref: str = "", version: int | None = None, manifest_json: bytes = b"", factors: bytes = b"",
              edit: Any = None, share: float | None = None, operation_id: str = "",
              to_version: int | None = None, keys: bytes = b"") -> Any:
        """Stage a candidate from exactly one of: a ledger patch (`ref` or the `version` that added
        it), a patch export (`manifest_json` + `factors`, and its `keys` when it has some), `edit` (an ``EditRequest``, or a list
        of fact mappings): computed as a dry run through the probe gate, or `to_version` (an
        earlier version's difference from the head; promote rolls back to it). Returns a ``Candidate``."""
        from editserve.control.gen import pb2

        req = pb2.StageCandidateRequest(ref=ref, manifest_json=manifest_json, factors=factors, keys=keys)
        if version is not None:
            req.version = version
        if to_version is not None:
            req.to_version = to_version
        if share is not None:
            req.share = share
        if edit is not None:
            req.edit.CopyFrom(edit if isinstance(edit, pb2.EditRequest)
                              else pb2.EditRequest(facts=[_fact(f) for f in edit]))
        meta = [(OPERATION_KEY, operation_id)] if operation_id else []
        return self._call("StageCandidate", req, metadata=meta)

    def promote(self, candidate: str) -> Any:
        from editserve.control.gen import pb2

        return self._call("PromoteCandidate", pb2.PromoteCandidateRequest(candidate=candidate))

    def discard(self, candidate: str) -> Any:
        from editserve.control.gen import pb2

        return self._call("DiscardCandidate", pb2.DiscardCandidateRequest(candidate=candidate))

    def compare(self, candidate: str, items: Sequence[tuple[str, str] | tuple[str, str, str]] = ()) -> Any:
        """The gate's prompts of the candidate's facts plus `items` (prompt, target[, other]),
        scored on the head and on the candidate (``CompareCandidateResponse``)."""
        from editserve.control.gen import pb2

        msgs = [pb2.ProbeItem(prompt=it[0], target=it[1], other=it[2] if len(it) > 2 else "") for it in items]
        return self._call("CompareCandidate", pb2.CompareCandidateRequest(candidate=candidate, items=msgs))


def _error(err: grpc.RpcError) -> ControlError:
    from editserve.control.gen import pb2
    from editserve.control.interceptors import REPORT_KEY

    report = None
    for key, value in (err.trailing_metadata() or ()):
        if key == REPORT_KEY:
            report = pb2.ProbeReport.FromString(value)
    return ControlError(err.code().name, err.details() or "", report)
