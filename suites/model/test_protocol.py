"""The implementation protocol (harness.implementations): names resolve to implementations or
fail naming the argument, the value and what is known; a contract breach names the
implementation and the cause; the built-in adapters compute tpgate's and the peer's function
(the same logits as the stacks called directly, on every rank)."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from harness.implementations import (BUILTIN, ImplementationError, Unsupported, checked_logits, checked_tokens, known, load_implementation,
                                     load_implementations)
from impl.architecture import TPConfigError
from impl.communication import NullCommunicator
from impl.model_loader import DistributedCheckpointLoader, read_config

from . import protocol_rank_fns as rank_fns


def test_every_builtin_loads_and_declares_known_capabilities():
    for name in BUILTIN:
        impl = load_implementation(name)
        assert impl.name == name and set(impl.capabilities) <= {"greedy", "random", "collectives"}


def test_unknown_name_lists_what_is_known():
    with pytest.raises(TPConfigError, match=r"--impl='nope': is not a known implementation .*'dtensor'.*'reference'"):
        load_implementation("nope")


def test_unimportable_module_and_missing_attribute_are_named():
    with pytest.raises(TPConfigError, match=r"--implementations='no_such_module_xyz:OBJ': module 'no_such_module_xyz' cannot be imported"):
        load_implementation("no_such_module_xyz:OBJ", "--implementations")
    with pytest.raises(TPConfigError, match=r"module 'harness.implementations.reference' has no attribute 'NOPE'"):
        load_implementation("harness.implementations.reference:NOPE")


def test_object_breaking_the_protocol_is_named(monkeypatch):
    module = types.ModuleType("tpgate_fake_stack")
    module.HALF = types.SimpleNamespace(name="half", capabilities=frozenset(), load=lambda *a: None)  # no check, no logits
    module.BOASTS = types.SimpleNamespace(name="boasts", capabilities=frozenset({"greedy"}), check=lambda c, t: None,
                                          load=lambda *a: None, logits=lambda m, i: None)  # declares greedy, has none
    module.ODD = types.SimpleNamespace(name="odd", capabilities=frozenset({"fly"}), check=None, load=None, logits=None)
    monkeypatch.setitem(sys.modules, "tpgate_fake_stack", module)
    with pytest.raises(ImplementationError, match=r"'tpgate_fake_stack:HALF'.*lacks \['check', 'logits'\]"):
        load_implementation("tpgate_fake_stack:HALF")
    with pytest.raises(ImplementationError, match=r"declares \['greedy'\] but has no such method"):
        load_implementation("tpgate_fake_stack:BOASTS")
    with pytest.raises(ImplementationError, match=r"unknown capabilities \['fly'\]"):
        load_implementation("tpgate_fake_stack:ODD")


def test_lists_are_checked_before_anything_runs():
    with pytest.raises(TPConfigError, match="must not repeat"):
        load_implementations(["reference", "reference"], "--implementations")
    with pytest.raises(TPConfigError, match="at least one"):
        load_implementations([], "--implementations")
    assert list(load_implementations(["dtensor", "reference"], "--implementations")) == ["dtensor", "reference"]


@pytest.mark.parametrize("bad, cause", [
    (None, r"returned NoneType, expected a tensor of shape \(2, 3, 7\)"),
    (torch.zeros(2, 3, 6), r"returned shape \(2, 3, 6\), expected \(batch, seq, vocab\) = \(2, 3, 7\)"),
    (torch.zeros(2, 3, 7, dtype=torch.int64), r"returned dtype torch.int64, expected a floating dtype"),
])
def test_wrong_logits_name_the_implementation(bad, cause):
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ImplementationError, match=rf"implementation 'mine': logits\(\) {cause}"):
        checked_logits("mine", bad, ids, 7)
    assert checked_logits("mine", torch.zeros(2, 3, 7), ids, 7).shape == (2, 3, 7)


def test_wrong_tokens_name_the_implementation():
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ImplementationError, match=r"greedy\(\) returned \(2, 4\) torch.int64, expected .* = \(2, 5\)"):
        checked_tokens("mine", torch.zeros(2, 4, dtype=torch.long), ids, 5, 7)
    with pytest.raises(ImplementationError, match=r"outside \[0, 7\)"):
        checked_tokens("mine", torch.full((2, 5), 7), ids, 5, 7)


def test_unsupported_and_errors_survive_the_rank_pipe():
    import pickle

    u = pickle.loads(pickle.dumps(Unsupported("dtensor", "num_kv_heads=2: must be a multiple of tp=4")))
    assert (u.implementation, u.reason, str(u)) == ("dtensor", "num_kv_heads=2: must be a multiple of tp=4", "dtensor: num_kv_heads=2: must be a multiple of tp=4")
    e = pickle.loads(pickle.dumps(ImplementationError("mine", "load() raised KeyError")))
    assert (e.implementation, e.cause) == ("mine", "load() raised KeyError")


def test_dtensor_check_reports_unsupported_not_a_harness_error(checkpoint):
    config = read_config(str(checkpoint("llama-gqa")))
    tp = 2 * config.num_kv_heads  # the peer shards kv heads and cannot replicate them
    with pytest.raises(Unsupported, match=rf"dtensor: num_kv_heads={config.num_kv_heads}: must be a multiple of tp={tp}"):
        load_implementation("dtensor").check(config, tp)


@pytest.mark.parametrize("spec", sorted(BUILTIN))
def test_builtin_adapters_compute_the_stack_they_wrap(spec, worlds, checkpoint):
    """Through the protocol at TP=2, every rank's logits equal tpgate's TP=1 float32 logits within
    the fp32 reduction-order slack, and greedy tokens agree across ranks."""
    directory = str(checkpoint("llama-attention-bias"))  # kv heads and vocabulary divide by 2: both adapters apply
    config = read_config(directory)
    load_implementation(spec).check(config, 2)
    ids = torch.randint(0, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    per_rank = worlds[2].run(rank_fns.logits_and_tokens, spec, directory, ids, config.vocab_size, 4)
    with torch.no_grad():
        single = DistributedCheckpointLoader(directory, NullCommunicator(1)).load(torch.float32)(ids)
    # fp32, two-way sharded sums: a reordering error of a few ulps of the largest logit
    slack = 64 * torch.finfo(torch.float32).eps * single.abs().max().item()
    for out in per_rank:
        assert (out["logits"] - single).abs().max().item() <= slack
        assert torch.equal(out["tokens"], per_rank[0]["tokens"])


def test_verify_judges_stacks_named_by_module_and_object_beside_the_builtins(side_by_side, capsys):
    """`verify` of stacks named `module:object` beside the built-ins, in one run (the shared
    side-by-side verify, suites/model/conftest.py): the skewed stack fails its bound, the misshaped
    one fails naming the shape, and the dtensor peer's refusal (vocabulary 101 at tp=2) is its own
    failure row, printed with the reason. A module found on PYTHONPATH only, outside the
    repository, is suites/harness/test_byo_example.py's."""
    from harness.cli import _print_verify

    result, rows, _ = side_by_side
    for tp in (1, 2, 4):
        assert rows[("reference", tp)]["passed"], rows[("reference", tp)]
        skewed = rows[(rank_fns.SKEWED_SPEC, tp)]
        assert not skewed["passed"] and not skewed["error"] and skewed["max_abs_vs_exact"] > skewed["bound"], skewed
        misshaped = rows[(rank_fns.MISSHAPED_SPEC, tp)]
        assert not misshaped["passed"], misshaped
        assert "logits() returned shape (2, 101), expected (batch, seq, vocab) = (2, 16, 101)" in misshaped["error"], misshaped
    assert rows[("dtensor", 1)]["passed"]
    assert rows[("dtensor", 2)]["error"].startswith("unsupported: vocab_size=101"), rows[("dtensor", 2)]
    assert not result["passed"]
    _print_verify(result)
    assert "FAIL: unsupported: vocab_size=101" in capsys.readouterr().out


def test_verify_refuses_an_unknown_implementation_before_any_process(checkpoint, capsys):
    from harness.cli import main as tpgate

    from suites.faults.support import descendants

    before = descendants()
    assert tpgate(["verify", str(checkpoint("llama-gqa")), "--impl", "reference,no_such_stack"]) == 2
    assert "--impl='no_such_stack': is not a known implementation" in capsys.readouterr().err
    assert descendants() == before
