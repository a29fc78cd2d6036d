"""What a check found: each run's result and the report, whose claim :mod:`._verdict` decides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..trace._compare import Comparison, TraceData
from ._explain import Explanation
from ._localize import Localization
from ._plan import RunSpec
from ._verdict import CAUSES, Claim, Compared, Facts, decide

__all__ = ["CheckReport", "RunResult"]


@dataclass
class RunResult:
    """What one run left: its trace, exit status and the tail of its stderr."""

    spec: RunSpec
    returncode: int
    trace: TraceData | None
    stderr_tail: str
    directory: Path
    error: str | None = None
    # The tensor files it wrote in the working directory, as leaf fingerprints.
    files: dict[str, dict[str, str]] = field(default_factory=dict)


def relation(spec: RunSpec, reference: RunSpec) -> str:
    """How a run relates to the reference run (see :mod:`._verdict`)."""
    if spec.must_differ:
        return "seed"
    if spec.resume_at is not None:
        return "resume"
    return "repeat" if spec.env == reference.env else "variation"


def _checkpoint_causes(trace: TraceData | None) -> tuple[str, ...]:
    """What the Checkpointer noted its checkpoints lack, from the trace's headers."""
    if trace is None:
        return ()
    found: list[str] = []
    for header in trace.headers:
        for note in header.get("facts", {}).get("checkpoint_notes") or []:
            if isinstance(note, str) and note not in found:
                found.append(note)
    return tuple(found)


@dataclass
class CheckReport:
    """The outcome of :func:`torchrepro.check._runner.run_check`.

    Attributes:
        runs: every run's result, the reference first.
        comparisons: each later run compared with the reference.
        error: why the check could not be made (a run failed, no trace), or None.
    """

    runs: list[RunResult]
    comparisons: list[Comparison]
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    # Why runs part (issue 14): batch and fingerprint per comparison, and the module.
    explanations: list[Explanation] = field(default_factory=list)
    localization: Localization | None = None
    localization_note: str = ""
    # How the exact first divergent step was found, when the traces only bounded it.
    pinpoint_note: str = ""
    # By resume run: what its first save after the stop holds otherwise than run 1's.
    restore: dict[str, str] = field(default_factory=dict)
    # What was compared at exit (object names, "RNG", file names) and, by run, what differed.
    exit_compared: tuple[str, ...] = ()
    exit_differs: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def _pairs(self) -> list[tuple[RunResult, Comparison]]:
        return list(zip(self.runs[1:], self.comparisons, strict=False))

    def facts(self) -> Facts:
        """What the runs did, as the verdict's rule table reads it."""
        reference = self.runs[0] if self.runs else None
        first = (
            reference.trace.records[0]["entries"]
            if reference is not None and reference.trace and reference.trace.records
            else []
        )
        return Facts(
            error=self.error,
            reference=reference.spec.name if reference is not None else "run 1",
            steps=self.steps,
            recorded=frozenset(str(e.get("kind")) for e in first),
            compared=tuple(
                Compared(
                    r.spec.name,
                    relation(r.spec, self.runs[0].spec),
                    c,
                    r.spec.resume_at,
                    _checkpoint_causes(r.trace)
                    + ((self.restore[r.spec.name],) if r.spec.name in self.restore else ())
                    if r.spec.resume_at is not None
                    else (),
                    self.exit_differs.get(r.spec.name, ()),
                )
                for r, c in self._pairs()
            ),
            exit_compared=self.exit_compared,
        )

    def claim(self) -> Claim:
        """The verdict's claim (:func:`torchrepro.check._verdict.decide`)."""
        return decide(self.facts())

    @property
    def unexpected(self) -> list[Comparison]:
        """Comparisons whose traces diverged although they must not (every run but a seed
        change); a difference only at exit has no step to re-run."""
        return [c for r, c in self._pairs() if not c.identical and not r.spec.must_differ]

    @property
    def seed_without_effect(self) -> list[str]:
        """Names of runs with another seed whose trace is identical to run 1's."""
        return [r.spec.name for r, c in self._pairs() if c.identical and r.spec.must_differ]

    @property
    def same_settings_differ(self) -> Comparison | None:
        """The first comparison of a run with run 1's settings that diverged, if any."""
        for r, c in self._pairs():
            if not c.identical and relation(r.spec, self.runs[0].spec) == "repeat":
                return c
        return None

    @property
    def reproducible(self) -> bool:
        return self.claim().reproducible

    @property
    def exit_code(self) -> int:
        return self.claim().exit_code

    @property
    def steps(self) -> int:
        return len(self.runs[0].trace.records) if self.runs and self.runs[0].trace else 0

    def verdict(self) -> str:
        """``REPRODUCIBLE: 4 runs x 87 steps bitwise identical`` or the first divergence."""
        return self.claim().text

    def explanation(self) -> list[str]:
        """Lines that say why, after the verdict (the usual causes of a divergence)."""
        return [CAUSES] if self.claim().rule == "identical settings differ" else []

    def to_dict(self) -> dict[str, Any]:
        claim = self.claim()
        return {
            "reproducible": claim.reproducible,
            "verdict": claim.text,
            "rule": claim.rule,
            "error": self.error,
            "runs": [
                {
                    "name": r.spec.name,
                    "env": r.spec.env,
                    "resume_at": r.spec.resume_at,
                    "returncode": r.returncode,
                    "steps": len(r.trace.records) if r.trace else 0,
                    "must_differ": r.spec.must_differ,
                    "facts": [h.get("facts", {}) for h in r.trace.headers] if r.trace else [],
                    "error": r.error,
                }
                for r in self.runs
            ],
            "comparisons": [c.to_dict() for c in self.comparisons],
            "explanations": [e.to_dict() for e in self.explanations],
            "localization": None if self.localization is None else self.localization.to_dict(),
            "localization_note": self.localization_note,
            "pinpoint_note": self.pinpoint_note,
            "restore": dict(self.restore),
            "exit_compared": list(self.exit_compared),
            "exit_differs": {k: list(v) for k, v in self.exit_differs.items()},
            "seed_without_effect": self.seed_without_effect,
            "notes": list(self.notes),
        }
