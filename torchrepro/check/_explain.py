"""Which environment difference? Rank fingerprint differences by how likely each explains a divergence.

:func:`torchrepro.diff_fingerprints` says which fields differ and which can change results,
in a fixed order of importance. Here that order is revised with what the traces show:

- **where it starts**: a version, hardware or library difference changes what is computed
  from the first step on; if the runs agreed for several steps first, a systematic
  difference is an unlikely cause and a run-to-run one (nondeterministic kernels allowed,
  TF32 switches, all-reduce order) a likely one;
- **data or model**: when the batch the first divergent step consumed already differed,
  what feeds the data pipeline (the seed, hash seed, NumPy, torchvision, the loader's
  ``num_workers``) comes first; when it was identical, what the model computes with.

Pure functions over fingerprints and parsed traces; nothing here prints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..env._diff import Difference, diff_fingerprints
from ..trace._compare import Comparison, TraceData, compare_traces

__all__ = [
    "Explanation",
    "Suspect",
    "batch_differs",
    "explain",
    "header_fingerprint",
    "rank_differences",
]

# Key prefixes by what they act on (first match wins; unmatched keys are "compute").
_CODE = ("git.",)
_DATA = (
    "env.TORCHREPRO_SEED",
    "env.PYTHONHASHSEED",
    "env.TORCHREPRO_NUM_WORKERS",
    "packages.numpy",
    "numpy",
    "packages.torchvision",
    "packages.pillow",
    "python.version",
)
# Differences that can part two runs at any step (not from the first step on).
_INTERMITTENT = (
    "determinism",
    "env.CUBLAS_WORKSPACE_CONFIG",
    "env.NCCL_",
    "torch.nccl",
    "threads",
    "env.OMP_NUM_THREADS",
)


def _category(key: str) -> str:
    for name, prefixes in (("code", _CODE), ("data", _DATA), ("intermittent", _INTERMITTENT)):
        if key.startswith(prefixes):
            return name
    return "compute"


@dataclass(frozen=True)
class Suspect:
    """One fingerprint difference, with how likely it explains the divergence and why.

    Attributes:
        difference: the :class:`torchrepro.Difference` (key, both values, reason).
        likelihood: ``"high"``, ``"medium"`` or ``"low"``.
        score: the ordering score (higher first), from the difference's importance and
            the evidence; only its order is meaningful.
        why: the evidence that moved it up or down, as a sentence ("" when none applied).
    """

    difference: Difference
    likelihood: str
    score: int
    why: str = ""

    def __str__(self) -> str:
        text = f"[{self.likelihood}] {self.difference}"
        return f"{text} ({self.why})" if self.why else text

    def to_dict(self) -> dict[str, Any]:
        d = self.difference
        return {
            "key": d.key,
            "a": d.a,
            "b": d.b,
            "reason": d.reason,
            "changes_results": d.changes_results,
            "likelihood": self.likelihood,
            "score": self.score,
            "why": self.why,
        }


def header_fingerprint(header: dict[str, Any]) -> dict[str, Any] | None:
    """The environment fingerprint a trace header carries, or None when it has none."""
    fp = header.get("fingerprint")
    return fp if isinstance(fp, dict) else None


def _score(
    d: Difference, category: str, *, from_start: bool | None, batch_differs: bool | None
) -> tuple[int, str]:
    score = 100 - 8 * d.rank if d.changes_results else 10
    why: list[str] = []
    if category == "code":
        return score + 40, "the code itself differs: anything can follow"
    if batch_differs is True:
        if category == "data":
            score += 40
            why.append("the batch already differed, and this feeds the data pipeline")
        elif category == "compute":
            score -= 20
            why.append("the batch already differed; this acts on the model's computation")
    elif batch_differs is False:
        if category == "data" and not d.key.startswith(("env.TORCHREPRO_SEED", "python.")):
            score -= 30
            why.append("the batch was identical; this acts on data loading")
        elif category in ("compute", "intermittent"):
            score += 15
            why.append("the batch was identical, and this changes what the model computes")
    if from_start is False:
        if category == "intermittent":
            score += 30
            why.append("the runs agreed for several steps first, as run-to-run differences do")
        elif category in ("compute", "data") and d.changes_results:
            score -= 30
            why.append("it would change results from the first step, yet earlier steps agreed")
    elif from_start is True and category == "compute":
        score += 10
        why.append("results differ from the first step, as a systematic difference does")
    return score, "; ".join(why)


def rank_differences(
    a: dict[str, Any],
    b: dict[str, Any],
    *,
    first_step: int | None = None,
    first_traced_step: int | None = None,
    batch_differs: bool | None = None,
    iterable: bool = False,
) -> list[Suspect]:
    """The fingerprint differences that can explain a divergence, most likely first.

    Every result-changing difference (as ``torchrepro env --diff`` lists them) is kept,
    plus ``TORCHREPRO_NUM_WORKERS`` when the batch differed (torchrepro's loader does not
    depend on it; other loaders do). Without evidence the order is ``env --diff``'s.

    Args:
        a, b: the two fingerprints (e.g. from the traces' headers).
        first_step: the first divergent step, or None when the runs agree or it is unknown.
        first_traced_step: the first step both traces recorded (divergence there counts as
            "from the start").
        batch_differs: whether the batch consumed at ``first_step`` already differed;
            None when unknown.
        iterable: a run's torchrepro loader reads an IterableDataset, so
            ``TORCHREPRO_NUM_WORKERS`` changes its batches.

    Returns:
        A list of :class:`Suspect`, highest score first.

    Raises:
        TypeError: ``a`` or ``b`` is not a dict.

    >>> a = {"torch": {"version": "2.4.0"}, "env": {"TORCHREPRO_SEED": "0"}}
    >>> b = {"torch": {"version": "2.5.0"}, "env": {"TORCHREPRO_SEED": "1"}}
    >>> [s.difference.key for s in rank_differences(a, b, first_step=1, batch_differs=True)]
    ['env.TORCHREPRO_SEED', 'torch.version']
    >>> [s.difference.key for s in rank_differences(a, b, first_step=1, batch_differs=False)]
    ['torch.version', 'env.TORCHREPRO_SEED']
    """
    from_start: bool | None = None
    if first_step is not None:
        from_start = first_step <= (first_traced_step if first_traced_step is not None else 1)
    suspects = []
    differences = diff_fingerprints(a, b)
    for d in [_iterable_workers(d) for d in differences] if iterable else differences:
        category = _category(d.key)
        if not d.changes_results and not (
            batch_differs and d.key.startswith("env.TORCHREPRO_NUM_WORKERS")
        ):
            continue
        score, why = _score(d, category, from_start=from_start, batch_differs=batch_differs)
        if not d.changes_results:
            why = "other loaders' batches depend on it; " + why
        likelihood = "high" if score >= 70 else "medium" if score >= 40 else "low"
        suspects.append(Suspect(d, likelihood, score, why))
    return sorted(suspects, key=lambda s: (-s.score, s.difference.rank, s.difference.key))


@dataclass(frozen=True)
class Explanation:
    """Why two traces part: the comparison, whether the batch differed, the suspects.

    Attributes:
        comparison: the :class:`torchrepro.Comparison` of the two traces.
        batch_differs: whether the batch consumed at the first divergent step already
            differed; None when unknown (identical runs, or traces without batch checksums).
        suspects: the result-changing fingerprint differences, most likely first.
        differences: every fingerprint difference (harmless ones too).
        note: why there are no suspects to rank (a header without a fingerprint), or "".
    """

    comparison: Comparison
    batch_differs: bool | None
    suspects: list[Suspect]
    differences: list[Difference]
    note: str = ""

    def lines(self) -> list[str]:
        """The explanation below the comparison, one finding per line."""
        out = []
        if self.batch_differs is True:
            out.append(
                f"batch differs at step {self.comparison.first_step}: the data pipeline parted first"
            )
        elif self.batch_differs is False:
            out.append(
                f"batch identical at step {self.comparison.first_step}: the model's computation differed"
            )
        if self.note:
            out.append(self.note)
        elif self.suspects:
            out.append(
                "environment differences that can change results (the traces agree nonetheless):"
                if self.comparison.identical
                else "environment differences that can explain it, most likely first:"
            )
            out += [f"  {s}" for s in self.suspects]
        elif not self.comparison.identical:
            out.append("no fingerprint difference that can change results")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "comparison": self.comparison.to_dict(),
            "batch_differs": self.batch_differs,
            "suspects": [s.to_dict() for s in self.suspects],
            "differences": [
                {
                    "key": d.key,
                    "a": d.a,
                    "b": d.b,
                    "reason": d.reason,
                    "changes_results": d.changes_results,
                }
                for d in self.differences
            ],
            "note": self.note,
        }


def batch_differs(comparison: Comparison) -> bool | None:
    """Whether the batch at the first divergent step differed; None when not recorded."""
    if comparison.identical:
        return None
    value = getattr(comparison, "batch_differs", None)
    return value if isinstance(value, bool) else None


def explain(
    reference: TraceData,
    other: TraceData,
    comparison: Comparison | None = None,
    *,
    batch: bool | None = None,
) -> Explanation:
    """Compare two traces (unless ``comparison`` is given) and rank their fingerprints' differences.

    Args:
        reference, other: the traces, e.g. from two machines or two dates.
        comparison: their :func:`compare_traces` result, when already computed.
        batch: whether the batch differed, when known otherwise (a localization saw the
            model's input differ); default: from the traces' batch checksums.

    Returns:
        An :class:`Explanation`.
    """
    if comparison is None:
        comparison = compare_traces(reference, other)
    if batch is None:
        batch = batch_differs(comparison)
    fp_a, fp_b = header_fingerprint(reference.header), header_fingerprint(other.header)
    if fp_a is None or fp_b is None:
        missing = [t.path for t, fp in ((reference, fp_a), (other, fp_b)) if fp is None]
        return Explanation(
            comparison,
            batch,
            [],
            [],
            "no environment fingerprint in the header of "
            + ", ".join(missing)
            + " (written by a torchrepro that did not record one)",
        )
    common = [s for s in reference.steps if s in set(other.steps)]
    iterable = _reads_iterable(reference) or _reads_iterable(other)
    suspects = rank_differences(
        fp_a,
        fp_b,
        first_step=comparison.first_step,
        first_traced_step=common[0] if common else None,
        batch_differs=batch,
        iterable=iterable,
    )
    differences = diff_fingerprints(fp_a, fp_b)
    if iterable:
        differences = [_iterable_workers(d) for d in differences]
    return Explanation(comparison, batch, suspects, differences)


def _reads_iterable(trace: TraceData) -> bool:
    """Whether a process of ``trace`` had a torchrepro loader over an IterableDataset."""
    return any(
        isinstance(loader, dict) and loader.get("iterable")
        for header in trace.headers
        for loader in (header.get("facts", {}).get("loaders") or [])
    )


def _iterable_workers(d: Difference) -> Difference:
    """``num_workers`` as what it is for an IterableDataset: a difference in the data."""
    if not d.key.startswith("env.TORCHREPRO_NUM_WORKERS"):
        return d
    return dataclasses.replace(
        d,
        reason=(
            "num_workers: the torchrepro.DataLoader reads an IterableDataset, whose batches "
            "depend on it (each worker iterates its own copy of the stream)"
        ),
        changes_results=True,
        rank=7,
    )
