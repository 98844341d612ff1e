"""Crash safety and concurrency of the ledger with real processes, on a real SQLite file and on a
real PostgreSQL server (`tests._pg`; every test runs on both backends).

- Fault injection: a child process commits (and sometimes rolls back, rolls forward and
  reverts) in a loop and is killed with SIGKILL at a random moment, 60 times. After each
  kill the ledger must open with its integrity check passing, hold only whole versions, and
  still contain every version the child had seen committed.
- Concurrency: 8 processes commit against the same head; exactly one wins each round.

Small synthetic patches keep the loops fast; the processes are forked from the test process.
On PostgreSQL a SIGKILLed client's transaction is rolled back by the server when its
connection drops; the checks after each kill are the same.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import torch

from editserve.ledger import Ledger, LedgerConflict
from tests._ledger_util import FP, NAME, NAME2, Backend, backend, base_weights, synth_patch  # noqa: F401
from tests._pg import pg_server  # noqa: F401

KILLS = 60
_ctx = mp.get_context("fork")


def _churn(root: str, ack_path: str, seed: int, ready: mp.synchronize.Event) -> None:
    """Commit forever (until SIGKILL); record each acknowledged version in `ack_path`."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    base = base_weights()
    ledger = Ledger.open(root, model_fingerprint=FP, verify="quick")
    ack = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    ready.set()
    i = 0
    while True:
        i += 1
        head = ledger.head()
        r = rng.random()
        if r < 0.1 and head > 1:
            ledger.rollback(rng.randrange(head))
            continue
        if r < 0.2:
            latest = len(ledger.versions()) - 1
            if latest != head:
                ledger.rollback(latest)
                continue
        if r < 0.3 and ledger.active_ids():
            commits = [v.version for v in ledger.versions() if v.patch_id in set(ledger.active_ids())]
            res = ledger.revert(rng.choice(commits), idempotency_key=f"rv-{seed}-{i}")
            os.write(ack, f"{res.version}\n".encode())
            os.fsync(ack)
            continue
        names = (NAME, NAME2) if rng.random() < 0.3 else (NAME,)
        v = ledger.commit(synth_patch(seed * 100_000 + i, names=names), head, caller=f"child{seed}", base=base,
                          idempotency_key=f"c-{seed}-{i}", probe_report={"i": i})
        os.write(ack, f"{v}\n".encode())
        os.fsync(ack)


def test_sigkill_during_commits_never_leaves_a_partial_version(backend: Backend, tmp_path: Path) -> None:
    root = backend.location()
    ack_path = str(tmp_path / "acks")
    Ledger.open(root, model_fingerprint=FP).close()
    rng = random.Random(0)
    killed_with_orphans, orphans = 0, set()
    for k in range(KILLS):
        ready = _ctx.Event()
        child = _ctx.Process(target=_churn, args=(root, ack_path, k + 1, ready), daemon=True)
        child.start()
        assert ready.wait(60), "child did not start"
        time.sleep(rng.uniform(0.0, 0.12))
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        assert child.exitcode == -signal.SIGKILL, f"child ended on its own (exit code {child.exitcode})"

        # The ledger opens (integrity check at open is strict) and holds only whole versions.
        with Ledger.open(root, model_fingerprint=FP) as ledger:
            report = ledger.check_integrity(deep=(k % 10 == 9))
            versions = ledger.versions()
            assert [v.version for v in versions] == list(range(len(versions)))
            assert 0 <= ledger.head() < len(versions)
            for v in versions[1:]:
                assert v.added or v.removed                     # every version carries its operations
            creations = [e for e in ledger.events() if e.kind in ("commit", "revert", "import")]
            assert sorted(e.version for e in creations) == list(range(1, len(versions)))
            acked = [int(x) for x in Path(ack_path).read_text().split()] if os.path.exists(ack_path) else []
            assert all(a < len(versions) for a in acked), "an acknowledged version was lost"
            # The head's weights can be rebuilt from the ledger alone.
            ledger.weights.materialize()
            referenced = {p.blob for p in ledger.store.patches()} | {b.blob for b in ledger.store.base_copies().values()}
            new_orphans = set(ledger.blobs) - referenced - orphans
            if new_orphans:                                     # killed between the blob write and the transaction
                killed_with_orphans += 1
                orphans |= new_orphans
            assert report.ok
    with Ledger.open(root, model_fingerprint=FP) as ledger:
        n = len(ledger.versions())
        ledger.check_integrity(deep=True)
        ledger.collect_garbage(min_age_s=0)
        ledger.check_integrity(deep=True)
    print(f"\n{backend.name}: {KILLS} kills, {n} versions, {killed_with_orphans} kills landed between a blob write "
          f"and its transaction")
    assert n > KILLS                                            # the children did make progress


def _racer(root: str, idx: int, rounds: int, barrier: mp.synchronize.Barrier, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    base = base_weights()
    ledger = Ledger.open(root, model_fingerprint=FP, verify="none")
    for r in range(rounds):
        barrier.wait()
        head = ledger.head()
        barrier.wait()                       # every process has read the same head before anyone commits
        try:
            v = ledger.commit(synth_patch(1000 * r + idx), head, caller=f"p{idx}", base=base)
            out.put((r, idx, "won", v, head))
        except LedgerConflict as exc:
            out.put((r, idx, "conflict", exc.actual_head, head))
        barrier.wait()
    ledger.close()


def _collect(procs: list, out: mp.Queue, n: int) -> list:
    results = [out.get(timeout=120) for _ in range(n)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return results


def test_eight_processes_racing_on_the_same_head(backend: Backend) -> None:
    root = backend.location()
    Ledger.open(root, model_fingerprint=FP).close()
    n_proc, rounds = 8, 6
    barrier, out = _ctx.Barrier(n_proc), _ctx.Queue()
    procs = [_ctx.Process(target=_racer, args=(root, i, rounds, barrier, out)) for i in range(n_proc)]
    for p in procs:
        p.start()
    results = _collect(procs, out, n_proc * rounds)
    winners = []
    for r in range(rounds):
        this = [x for x in results if x[0] == r]
        assert len(this) == n_proc and {x[4] for x in this} == {r}        # all saw head r
        won = [x for x in this if x[2] == "won"]
        assert len(won) == 1, f"round {r}: {len(won)} winners"
        assert all(x[3] == r + 1 for x in this if x[2] == "conflict")     # the loser learns the new head
        winners.append(won[0][3])
    assert winners == list(range(1, rounds + 1))                         # versions strictly increase
    with Ledger.open(root, model_fingerprint=FP) as ledger:
        assert ledger.head() == rounds and len(ledger.versions()) == rounds + 1
        assert [e.kind for e in ledger.events()].count("commit") == rounds
        assert [v.caller for v in ledger.versions()[1:]] == [f"p{x[1]}" for x in sorted(
            (x for x in results if x[2] == "won"), key=lambda x: x[0])]


def _retrying(root: str, idx: int, n: int, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    base = base_weights()
    ledger = Ledger.open(root, model_fingerprint=FP, verify="none")
    mine, conflicts = [], 0
    for j in range(n):
        while True:
            try:
                mine.append(ledger.commit(synth_patch(50_000 + 100 * idx + j), ledger.head(), base=base))
                break
            except LedgerConflict:
                conflicts += 1
    out.put((idx, mine, conflicts))
    ledger.close()


def test_concurrent_committers_with_retry_lose_nothing(backend: Backend) -> None:
    root = backend.location()
    Ledger.open(root, model_fingerprint=FP).close()
    n_proc, n = 8, 5
    out = _ctx.Queue()
    procs = [_ctx.Process(target=_retrying, args=(root, i, n, out)) for i in range(n_proc)]
    for p in procs:
        p.start()
    results = _collect(procs, out, n_proc)
    got = sorted(v for _, mine, _ in results for v in mine)
    assert got == list(range(1, n_proc * n + 1))                         # none lost, none duplicated
    for _, mine, _ in results:
        assert mine == sorted(mine)
    with Ledger.open(root, model_fingerprint=FP) as ledger:
        assert ledger.head() == n_proc * n
        assert len(ledger.active_ids()) == n_proc * n                    # a linear history of all commits
        assert {synth_patch(50_000 + 100 * i + j).digest for i in range(n_proc) for j in range(n)} == set(ledger.active_ids())
