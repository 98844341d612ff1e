"""A replica's edit policy (editserve/engine/policy.py): the digest the fleet compares, and the
fields it names where two replicas differ. The fleet's use of it runs on real replicas in
tests/test_fleet_consolidation.py and tests/test_fleet.py."""

from __future__ import annotations

from dataclasses import replace

from editserve.engine.policy import (PACKAGED, SERVING_FIELDS, EditPolicy, differing_fields, heldout_token, matrices_token,
                                     slots_token)

BASE = EditPolicy(editserve="0.1.0", default_method="alphaedit", editable_matrices=matrices_token(["m.1", "m.2"]),
                  consolidate_every=25, retention_gate_sample=16, retention_gate_max_drop=0.0,
                  max_perplexity_ratio=0.0, heldout_text=heldout_token(None), neuron_slots=slots_token({5: 1024}))


def test_equal_policies_have_equal_digests_and_any_field_changes_it() -> None:
    assert BASE.digest() == replace(BASE).digest() and len(BASE.digest()) == 12
    changed = {"default_method": "rome", "consolidate_every": 0, "retention_gate_max_drop": 0.25,
               "max_perplexity_ratio": 1.05, "heldout_text": heldout_token("our own prose " * 100),
               "neuron_slots": slots_token({})}
    digests = {BASE.digest()} | {replace(BASE, **{k: v}).digest() for k, v in changed.items()}
    assert len(digests) == 1 + len(changed)


def test_tokens_of_the_editable_matrices_and_the_heldout_text() -> None:
    assert matrices_token(["m.2", "m.1", "m.1"]) == matrices_token(["m.1", "m.2"])
    assert matrices_token(["m.1", "m.2"]).startswith("2:") and matrices_token(["m.1"]) != matrices_token(["m.2"])
    assert heldout_token(None) == PACKAGED
    assert slots_token({7: 256, 5: 1024}) == "5:1024,7:256" and slots_token({}) == ""
    assert heldout_token("a text") == heldout_token("a text") != heldout_token("another text")


def test_differing_fields_names_each_field_that_differs() -> None:
    other = replace(BASE, retention_gate_max_drop=0.25, default_method="memit").to_dict()
    assert differing_fields(BASE.to_dict(), BASE.to_dict()) == []
    assert differing_fields(BASE.to_dict(), other) == ["default_method", "retention_gate_max_drop"]
    # a replica of another editserve version may record a field this one does not know
    older = {k: v for k, v in BASE.to_dict().items() if k != "heldout_text"}
    assert differing_fields(BASE.to_dict(), older) == ["heldout_text"]
    # where a serve-only replica is one side, only what it serves is compared
    assert differing_fields(BASE.to_dict(), other, SERVING_FIELDS) == []
    assert differing_fields(BASE.to_dict(), replace(BASE, editserve="0.2.0").to_dict(), SERVING_FIELDS) == ["editserve"]
    # the slot layer's shapes: a serve-only replica with other slots cannot apply the ledger's gated patches
    assert differing_fields(BASE.to_dict(), replace(BASE, neuron_slots="").to_dict(), SERVING_FIELDS) == ["neuron_slots"]


def test_the_status_table_says_what_each_replicas_policy_cell_means() -> None:
    """`editserve status`'s "edit policy" column: the same digest; another one with the differing
    fields; another one with none (a serve-only side, where only the serving fields are compared);
    "-" for a replica that records none."""
    from editserve.commands.remote import fleet_table
    from editserve.control.gen import pb2

    def row(rid: str, policy: str, differs: tuple[str, ...] = (), role: str = "compute") -> pb2.ReplicaStatus:
        return pb2.ReplicaStatus(replica_id=rid, version=3, role=role, address="127.0.0.1:1", age_s=1.0, live=True,
                                 policy=policy, policy_differs=list(differs))

    mine = BASE.digest()
    gate = replace(BASE, retention_gate_max_drop=0.25).digest()
    table = fleet_table([row("a", mine), row("b", mine), row("c", gate, ("retention_gate_max_drop",)),
                         row("d", gate, role="serve-only"), row("e", "")], me="a")
    lines = {line.lstrip("* ").split()[0]: line for line in table.splitlines()[2:]}
    assert lines["a"].startswith("* a") and lines["a"].rstrip().endswith(mine)
    assert lines["b"].rstrip().endswith(mine)
    assert lines["c"].rstrip().endswith(f"{gate} DIFFERS: retention_gate_max_drop")
    assert lines["d"].rstrip().endswith(f"{gate} (serving fields agree)")
    assert lines["e"].rstrip().endswith("-")
