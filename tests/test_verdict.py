"""The verdict's rule table (torchrepro/check/_verdict.py), on facts built by hand.

Each rule is tested where it must apply and where it must not, and the whole table over
every combination of: runs of one configuration, a variation, another seed, a resume; what
each comparison found; whether an error stopped the check. The expected claims below are
written from the documented rules, not from the implementation's helpers.
"""

from __future__ import annotations

import itertools

import pytest

from torchrepro.check._verdict import RULES, Compared, Facts, decide
from torchrepro.trace._compare import Comparison

STEPS = 20


def comparison(name: str, *, identical: bool, first: int | None = None) -> Comparison:
    if identical:
        return Comparison(
            ("run 1", name), True, STEPS, STEPS, STEPS, None, state_steps=STEPS, end_compared=True
        )
    return Comparison(
        ("run 1", name),
        False,
        STEPS,
        STEPS,
        STEPS,
        first,
        earliest_step=first,
        state_steps=STEPS,
        end_compared=True,
    )


def facts(
    *compared: Compared,
    error: str | None = None,
    recorded: frozenset[str] = frozenset({"loss", "batch", "param"}),
    exit_compared: tuple[str, ...] = (),
) -> Facts:
    return Facts(error, "run 1", STEPS, recorded, tuple(compared), exit_compared)


def run(name: str, relation: str, identical: bool, first: int = 5) -> Compared:
    return Compared(name, relation, comparison(name, identical=identical, first=first))


def test_rule_names_are_unique_and_the_last_always_applies():
    names = [r.name for r in RULES]
    assert len(names) == len(set(names))
    assert RULES[-1].when(facts())
    assert RULES[-1].when(facts(run("run 2", "repeat", True)))


def test_an_error_decides_before_anything_else():
    claim = decide(facts(run("run 2", "repeat", False), error="run 3 failed"))
    assert (claim.rule, claim.exit_code, claim.text) == ("error", 2, "ERROR: run 3 failed")


def test_identical_settings_that_differ_are_named_as_such():
    claim = decide(
        facts(run("num_workers=2", "variation", False, 3), run("run 2", "repeat", False, 9))
    )
    assert claim.rule == "identical settings differ"
    assert claim.exit_code == 1
    # The repeat is named, even though the variation parted earlier: with identical runs
    # differing, the variation's divergence says nothing about the variation.
    assert claim.text == 'DIVERGED at step 9 (run "run 2" vs "run 1") with identical settings'


def test_a_variation_or_resume_that_differs_is_named_at_the_earliest_step():
    claim = decide(
        facts(
            run("run 2", "repeat", True),
            run("num_workers=2", "variation", False, 6),
            run("resume at 5", "resume", False, 8),
        )
    )
    assert (claim.rule, claim.exit_code) == ("a run differs", 1)
    assert claim.text == 'DIVERGED at step 6 (run "num_workers=2" vs "run 1")'


def resumed(identical: bool, first: int = 6, causes: tuple[str, ...] = ()) -> Compared:
    return Compared(
        "resume at 5",
        "resume",
        comparison("resume at 5", identical=identical, first=first),
        5,
        causes,
    )


def test_a_resume_that_parts_from_agreeing_repeats_is_a_resume_fault():
    claim = decide(facts(run("run 2", "repeat", True), resumed(False, 8)))
    assert (claim.rule, claim.exit_code) == ("resume fault", 1)
    assert claim.text.startswith(
        "RESUME FAULT: the resumed run differs from the uninterrupted one from step 8 "
        '(run "resume at 5" vs "run 1")'
    )
    assert "checkpoint at step 5 did not restore" in claim.text
    assert "nondetermin" not in claim.text


def test_a_resume_fault_names_what_the_checkpointer_noted():
    cause = "LambdaLR (its optimizer is saved as 'optimizer') is not saved"
    claim = decide(facts(run("run 2", "repeat", True), resumed(False, causes=(cause,))))
    assert claim.rule == "resume fault"
    assert claim.text.endswith("; " + cause)


@pytest.mark.parametrize(
    "others",
    [
        # the repeat differs too: nothing can be blamed on the resume
        (run("run 2", "repeat", False, 9),),
        # a variation parted first: that divergence is named
        (run("run 2", "repeat", True), run("num_workers=2", "variation", False, 3)),
        # no repeat of run 1 to show the command is deterministic
        (run("num_workers=2", "variation", True),),
    ],
)
def test_a_resume_divergence_is_not_a_resume_fault_without_agreeing_repeats(others):
    claim = decide(facts(*others, resumed(False, 6)))
    assert claim.rule != "resume fault"
    assert claim.exit_code != 0
    assert "RESUME FAULT" not in claim.text


@pytest.mark.parametrize(
    "others",
    [
        (),
        (("num_workers=2", "variation"),),
        (("seed=1", "seed"),),
        (("resume at 5", "resume"), ("num_workers=2", "variation")),
    ],
)
def test_without_a_repeat_of_one_configuration_nothing_is_reproducible(others):
    # Every run that ran agreed as it must, yet none repeated run 1's configuration.
    compared = [run(name, relation, relation != "seed") for name, relation in others]
    claim = decide(facts(*compared))
    assert (claim.rule, claim.exit_code) == ("nothing repeated", 2)
    assert "REPRODUCIBLE" not in claim.text
    assert "--runs 2" in claim.text
    # One repeat that agrees makes the same facts a pass.
    assert decide(facts(run("run 2", "repeat", True), *compared)).reproducible


def test_another_seed_that_changes_nothing_is_refused():
    claim = decide(facts(run("run 2", "repeat", True), run("seed=1", "seed", True)))
    assert (claim.rule, claim.exit_code) == ("seed has no effect", 1)
    assert claim.text.startswith('SEED HAS NO EFFECT: run "seed=1" used another seed')


def test_reproducible_counts_the_runs_that_must_agree_and_says_what_was_compared():
    claim = decide(facts(run("run 2", "repeat", True), run("seed=1", "seed", False)))
    assert (claim.rule, claim.exit_code) == ("reproducible", 0)
    assert claim.text == (
        "REPRODUCIBLE: 2 runs x 20 steps bitwise identical; seed=1 differs, as another seed must"
    )


def test_reproducible_names_the_state_coverage_when_not_every_step_held_it():
    partial = Comparison(("run 1", "run 2"), True, STEPS, STEPS, STEPS, None, state_steps=3)
    claim = decide(facts(Compared("run 2", "repeat", partial)))
    assert claim.text == (
        "REPRODUCIBLE: 2 runs x 20 steps bitwise identical (every step's loss and batch; "
        "the model's state at 3 of them; not after the last: a run did not record it)"
    )


def test_a_relation_outside_the_table_is_refused():
    with pytest.raises(ValueError, match="relation must be one of"):
        Compared("x", "sideways", comparison("x", identical=True))


RELATIONS = ("repeat", "variation", "seed", "resume")


@pytest.mark.parametrize("error", [None, "run 2 failed"])
@pytest.mark.parametrize(
    "outcomes", list(itertools.product([None, True, False], repeat=len(RELATIONS)))
)
def test_every_combination_follows_the_documented_order(outcomes, error):
    # outcomes[i]: the run of RELATIONS[i] is absent (None), identical (True) or differs.
    compared = [
        run(f"{relation} run", relation, outcome, first=10 + i)
        for i, (relation, outcome) in enumerate(zip(RELATIONS, outcomes, strict=True))
        if outcome is not None
    ]
    claim = decide(facts(*compared, error=error))
    differ = {c.relation for c in compared if not c.comparison.identical}
    same = {c.relation for c in compared if c.comparison.identical}
    if error is not None:
        expected = ("error", 2)
    elif "repeat" in differ:
        expected = ("identical settings differ", 1)
    elif differ - {"seed"}:
        # the earliest is the resume's only when the variation agreed or did not run
        earliest_resume = "variation" not in differ and "repeat" in same
        expected = ("resume fault", 1) if earliest_resume else ("a run differs", 1)
    elif "seed" in same:
        expected = ("seed has no effect", 1)
    elif "repeat" not in same:
        expected = ("nothing repeated", 2)
    else:
        expected = ("reproducible", 0)
    assert (claim.rule, claim.exit_code) == expected
    assert claim.reproducible == (expected[1] == 0)
    if expected[0] in ("a run differs", "resume fault"):
        # The earliest of the runs that must agree and do not.
        firsts = {
            c.name: c.comparison.first_step
            for c in compared
            if c.relation != "seed" and not c.comparison.identical
        }
        name = min(firsts, key=lambda n: firsts[n] or 0)
        assert f'(run "{name}" vs "run 1")' in claim.text


def test_a_trace_without_the_model_says_so_and_how_to_compare_more():
    claim = decide(facts(run("run 2", "repeat", True), recorded=frozenset({"loss"})))
    assert claim.text == (
        "REPRODUCIBLE: 2 runs x 20 steps bitwise identical (every step's loss; the traces "
        "hold no model state; nothing at exit: give the objects to a torchrepro.Checkpointer, "
        "or pass model= to trace.step(), to compare more)"
    )


def test_the_claim_lists_what_was_compared_at_exit():
    what = ("the state of model, optimizer, RNG", "the files ema.pt")
    claim = decide(facts(run("run 2", "repeat", True), exit_compared=what))
    assert claim.text == (
        "REPRODUCIBLE: 2 runs x 20 steps bitwise identical (at exit: the state of model, "
        "optimizer, RNG and the files ema.pt)"
    )


def at_exit(name: str, relation: str, differs: tuple[str, ...], resume_at=None) -> Compared:
    return Compared(name, relation, comparison(name, identical=True), resume_at, (), differs)


@pytest.mark.parametrize(
    ("relation", "rule"),
    [("repeat", "identical settings differ"), ("variation", "a run differs")],
)
def test_a_difference_only_at_exit_is_a_divergence(relation, rule):
    differs = ("tensor ema.pt ['module.weight']",)
    others = () if relation == "repeat" else (run("run 2", "repeat", True),)
    claim = decide(facts(*others, at_exit("other", relation, differs)))
    assert (claim.rule, claim.exit_code) == (rule, 1)
    assert claim.text.startswith('DIVERGED at exit (run "other" vs "run 1"): tensor ema.pt')
    # the same runs with nothing different at exit pass
    assert decide(facts(run("run 2", "repeat", True), at_exit("x", relation, ()))).reproducible


def test_a_step_divergence_is_named_before_one_at_exit():
    claim = decide(
        facts(
            run("run 2", "repeat", True),
            at_exit("num_workers=2", "variation", ("optimizer['state'][0]['momentum_buffer']",)),
            run("TINY=1", "variation", False, 15),
        )
    )
    assert claim.text.startswith('DIVERGED at step 15 (run "TINY=1" vs "run 1")')


def test_a_resume_that_differs_only_at_exit_is_a_resume_fault():
    differs = ("tensor ema.pt ['n_averaged']",)
    claim = decide(
        facts(run("run 2", "repeat", True), at_exit("resume at 5", "resume", differs, 5))
    )
    assert claim.rule == "resume fault"
    assert "from its exit, every traced step agreeing (tensor ema.pt ['n_averaged'])" in claim.text


def test_another_seed_that_differs_only_at_exit_has_an_effect():
    claim = decide(facts(run("run 2", "repeat", True), at_exit("seed=1", "seed", ("x",))))
    assert claim.rule == "reproducible"
