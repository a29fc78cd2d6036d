"""What a check may claim: a pure rule table from the facts of its runs to the claim.

The runner records *facts* (which runs ran, how each relates to the reference run, what
each comparison held and found); :func:`decide` turns them into a :class:`Claim` by the
first rule of :data:`RULES` that applies. Nothing here runs a process or reads a file, so
every rule is unit-tested on its own (``tests/test_verdict.py``), and a claim can name only
what the facts say was compared.

Relations of a run to the reference (run 1):

- ``repeat``: the same configuration (environment and no stop): it must be identical.
- ``variation``: another ``--vary`` value (not the seed): it must be identical.
- ``seed``: another seed: it must differ.
- ``resume``: stopped at ``--resume-at K`` and resumed in a second process: it must be
  identical.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..trace._compare import Comparison

__all__ = ["CAUSES", "RULES", "Claim", "Compared", "Facts", "Rule", "decide", "first_divergence"]

EXIT_OK, EXIT_DIFFERENT, EXIT_ERROR = 0, 1, 2
RELATIONS = ("repeat", "variation", "seed", "resume")

CAUSES = (
    "Runs with identical settings differ, so nothing else can be judged. Usual causes: the "
    "model or the data were built before torchrepro.seed_everything() (call it first, at the "
    "top of the script); a nondeterministic kernel (call torchrepro.deterministic('strict'), "
    "and run torchrepro.audit(model, batch) to name the operation); something unseeded "
    "(time, os.urandom, a random generator created without a seed)."
)


@dataclass(frozen=True)
class Compared:
    """One later run compared with the reference: its name, relation and comparison."""

    name: str
    relation: str
    comparison: Comparison
    # A resume run: the step it stopped at, and what its checkpoint is known not to hold
    # (the Checkpointer's notes, e.g. an LR scheduler that was not saved).
    resume_at: int | None = None
    causes: tuple[str, ...] = ()
    # What differed at exit (objects' state, tensor files) although every step agreed.
    at_exit: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS}, got {self.relation!r}")

    @property
    def must_differ(self) -> bool:
        return self.relation == "seed"

    @property
    def differs(self) -> bool:
        """Its trace or what it left at exit differs from the reference's."""
        return not self.comparison.identical or bool(self.at_exit)

    @property
    def diverged(self) -> bool:
        """It differs although it must not."""
        return self.differs and not self.must_differ

    @property
    def first_step(self) -> float:
        """The first divergent step; a difference only at exit comes after every step."""
        step = self.comparison.first_step
        return float("inf") if self.comparison.identical or step is None else step

    def verdict(self) -> str:
        """``DIVERGED at step N (...)``, or ``DIVERGED at exit (...)`` when only that differs."""
        if not self.comparison.identical:
            return self.comparison.verdict
        ref, other = self.comparison.names
        return f'DIVERGED at exit (run "{other}" vs "{ref}"): ' + "; ".join(self.at_exit)


@dataclass(frozen=True)
class Facts:
    """What the runs of a check did, as the verdict needs it.

    Attributes:
        error: why the check could not be made (a run failed, a variation did not take
            effect), or None.
        reference: the reference run's name.
        steps: the reference trace's step records.
        recorded: what every step record held (``"loss"``, ``"batch"``), from the
            reference's first record.
        compared: every later run, in order.
        exit_compared: what was compared as the runs exited (``"the state of model, ..."``,
            ``"the files ..."``); empty when nothing was.
    """

    error: str | None
    reference: str
    steps: int
    recorded: frozenset[str]
    compared: tuple[Compared, ...]
    exit_compared: tuple[str, ...] = ()


@dataclass(frozen=True)
class Claim:
    """What the check says, the rule that said it, and the exit status."""

    rule: str
    text: str
    exit_code: int

    @property
    def reproducible(self) -> bool:
        return self.exit_code == EXIT_OK


@dataclass(frozen=True)
class Rule:
    """``when`` the facts hold this, ``say`` the claim (and exit with ``exit_code``)."""

    name: str
    when: Callable[[Facts], bool]
    say: Callable[[Facts], str]
    exit_code: int


def _repeats_diverged(facts: Facts) -> list[Compared]:
    return [c for c in facts.compared if c.relation == "repeat" and c.diverged]


def _diverged(facts: Facts) -> list[Compared]:
    return [c for c in facts.compared if c.diverged]


def _seed_without_effect(facts: Facts) -> list[Compared]:
    return [c for c in facts.compared if c.must_differ and not c.differs]


def first_divergence(facts: Facts) -> Compared | None:
    """The divergence a claim names: a repeat's first, else the earliest one."""
    repeats = _repeats_diverged(facts)
    if repeats:
        return repeats[0]
    diverged = _diverged(facts)
    if not diverged:
        return None
    return min(diverged, key=lambda c: c.first_step)


def _resume_fault(facts: Facts) -> bool:
    """The earliest divergence is a resume's, and a repeat of run 1 agreed."""
    first = first_divergence(facts)
    repeated = any(c.relation == "repeat" and c.comparison.identical for c in facts.compared)
    return first is not None and first.relation == "resume" and repeated


def _say_resume_fault(facts: Facts) -> str:
    first = first_divergence(facts)
    assert first is not None
    c = first.comparison
    step = (
        "its exit, every traced step agreeing (" + "; ".join(first.at_exit) + ")"
        if c.identical
        else f"step {c.first_step}"
        if c.exact or c.earliest_step is None
        else f"a step in {c.earliest_step}-{c.first_step}"
    )
    stop = "" if first.resume_at is None else f" at step {first.resume_at}"
    text = (
        f"RESUME FAULT: the resumed run differs from the uninterrupted one from {step} (run "
        f'"{first.name}" vs "{facts.reference}"), while runs with identical settings agree: '
        f"the checkpoint{stop} did not restore everything training depends on"
    )
    if first.causes:
        text += "; " + "; ".join(first.causes)
    return text


def _say_repeat_differs(facts: Facts) -> str:
    return f"{_repeats_diverged(facts)[0].verdict()} with identical settings"


def _say_diverged(facts: Facts) -> str:
    first = first_divergence(facts)
    assert first is not None
    return first.verdict()


def _say_seed(facts: Facts) -> str:
    names = ", ".join(f'"{c.name}"' for c in _seed_without_effect(facts))
    return (
        f"SEED HAS NO EFFECT: run {names} used another seed and is bitwise identical to "
        f'run "{facts.reference}"; the seed has no effect (does the script call '
        "torchrepro.seed_everything() without an argument, before building anything?)"
    )


MODEL_KINDS = frozenset({"param", "buffer", "grad"})


def coverage(facts: Facts) -> str:
    """What the identical runs were compared on: the traces' records, and what at exit."""
    compared = [c.comparison for c in facts.compared if not c.must_differ]
    if not compared:
        return ""
    what = " and ".join(k for k in ("loss", "batch") if k in facts.recorded)
    if not facts.recorded & MODEL_KINDS:
        steps = f"every step's {what or 'record'}; the traces hold no model state"
    else:
        state = min(c.state_steps for c in compared)
        end = all(c.end_compared for c in compared)
        steps = (
            ""
            if state == facts.steps
            else f"every step's {what or 'record'}; the model's state at {state} of them"
            + (" and after the last" if end else "; not after the last: a run did not record it")
        )
    if facts.exit_compared:
        at_exit = "at exit: " + " and ".join(facts.exit_compared)
    else:
        at_exit = (
            "nothing at exit: give the objects to a torchrepro.Checkpointer, or pass "
            "model= to trace.step(), to compare more"
            if not facts.recorded & MODEL_KINDS
            else ""
        )
    parts = [p for p in (steps, at_exit) if p]
    return f" ({'; '.join(parts)})" if parts else ""


def _no_repeat(facts: Facts) -> bool:
    return not any(c.relation == "repeat" for c in facts.compared)


def _say_no_repeat(facts: Facts) -> str:
    return (
        f'ERROR: no run repeated run "{facts.reference}"\'s configuration, so nothing shows '
        "that it reproduces (a --vary or --resume-at run changes something); use --runs 2 "
        "(the default) or more"
    )


def _say_reproducible(facts: Facts) -> str:
    same = [c for c in facts.compared if not c.must_differ]
    count = len(same) + 1
    runs = f"{count} run{'s' if count != 1 else ''}"
    text = f"REPRODUCIBLE: {runs} x {facts.steps} steps bitwise identical{coverage(facts)}"
    differing = [c.name for c in facts.compared if c.must_differ]
    if differing:
        text += f"; {', '.join(differing)} differ{'s' if len(differing) == 1 else ''}, as another seed must"
    return text


# The first rule that applies decides. Order matters: an error means nothing was judged;
# runs with identical settings that differ make every other comparison meaningless.
RULES: tuple[Rule, ...] = (
    Rule("error", lambda f: f.error is not None, lambda f: f"ERROR: {f.error}", EXIT_ERROR),
    Rule(
        "identical settings differ",
        lambda f: bool(_repeats_diverged(f)),
        _say_repeat_differs,
        EXIT_DIFFERENT,
    ),
    # A resume that parts from runs that agree is a resume fault, not nondeterminism.
    Rule("resume fault", _resume_fault, _say_resume_fault, EXIT_DIFFERENT),
    Rule("a run differs", lambda f: bool(_diverged(f)), _say_diverged, EXIT_DIFFERENT),
    Rule("seed has no effect", lambda f: bool(_seed_without_effect(f)), _say_seed, EXIT_DIFFERENT),
    # REPRODUCIBLE needs two runs of one identical configuration that agree.
    Rule("nothing repeated", _no_repeat, _say_no_repeat, EXIT_ERROR),
    Rule("reproducible", lambda f: True, _say_reproducible, EXIT_OK),
)


def decide(facts: Facts) -> Claim:
    """The claim of the first rule in :data:`RULES` that applies to ``facts``.

    >>> decide(Facts("run 2 failed", "run 1", 0, frozenset(), ())).text
    'ERROR: run 2 failed'
    """
    for rule in RULES:
        if rule.when(facts):
            return Claim(rule.name, rule.say(facts), rule.exit_code)
    raise AssertionError("the last rule always applies")  # pragma: no cover
