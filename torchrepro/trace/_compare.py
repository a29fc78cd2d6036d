"""Comparing two traces written by :class:`torchrepro.Trace`, step by step and bitwise.

Pure functions: nothing here prints. The file format (headers, records, versions) is
owned by :mod:`torchrepro.trace._file`; :func:`read_trace` and :class:`TraceData` are
re-exported here, where they have always been importable from.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any

from .._errors import TraceError
from ._file import STATE_KINDS, TraceData, json_float, read_trace

__all__ = [
    "Comparison",
    "EntryDiff",
    "TraceData",
    "TraceError",
    "compare_traces",
    "read_trace",
]


def _as_float(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # "nan", "inf", "-inf"
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class EntryDiff:
    """One recorded tensor that differs between two traces at one step.

    Attributes:
        name: parameter, buffer or tensor name (``"loss"`` for the loss).
        kind: ``"loss"``, ``"param"``, ``"buffer"``, ``"grad"`` or ``"tensor"``.
        measure: what ``reference_value``/``other_value`` are: ``"value"`` (the loss),
            ``"norm"``, or ``"checksum"`` when the step recorded no norm (norms are recorded
            every ``norm_every`` steps) or the entry is a batch.
        reference_value, other_value: the loss value or the tensor's norm; None when absent.
        difference: ``other_value - reference_value`` when both are numbers.
        reference_checksum, other_checksum: the exact checksums (hex), None when absent.
        note: why they differ when it is not only the values (missing, shape, dtype, None grad).
    """

    name: str
    kind: str
    measure: str
    reference_value: float | None
    other_value: float | None
    difference: float | None
    reference_checksum: str | None
    other_checksum: str | None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (non-finite floats as strings)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "measure": self.measure,
            "reference_value": json_float(self.reference_value),
            "other_value": json_float(self.other_value),
            "difference": json_float(self.difference),
            "reference_checksum": self.reference_checksum,
            "other_checksum": self.other_checksum,
            "note": self.note,
        }

    def format(self) -> str:
        """One readable line, e.g. ``param fc.weight: norm 1.25 vs 1.2500001 (diff +1.19e-07)``."""
        ref, oth = self.reference_value, self.other_value
        label = self.kind if self.name == self.kind else f"{self.kind} {self.name}"
        if self.measure == "checksum":
            text = f"{label}: checksum {self.reference_checksum} vs {self.other_checksum}"
        else:
            text = f"{label}: {self.measure} {_fmt(ref)} vs {_fmt(oth)}"
        if self.difference is not None:
            text += (
                f" (diff {self.difference:+.3g})" if self.difference else " (equal; bits differ)"
            )
        if self.note:
            text += f" [{self.note}]"
        return text


def _fmt(value: float | None) -> str:
    return "-" if value is None else repr(value)


@dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare_traces`.

    Attributes:
        names: ``(reference name, other name)``, used in messages.
        identical: every step of both traces recorded bitwise-identical tensors, and both
            traced the same steps.
        steps_compared: number of step numbers present in both traces.
        reference_steps, other_steps: number of traced steps in each.
        first_step: the first step whose records differ, or that only one trace has;
            None when identical.
        entries: the differing entries at ``first_step``, in recording order (the loss, then
            parameters by name, buffers, gradients, named tensors).
        later_differing_steps: how many compared steps after ``first_step`` also differ.
        notes: other findings (a shorter trace, a torn last line, different settings).
        batch_differs: at ``first_step``, whether the batch the step consumed already
            differed (the data pipeline) or not (the model's computation); None when the
            traces hold no batch checksum for that step, or when the checksums agree but
            some leaves were recorded by their type only (``opaque``).
        earliest_step: the earliest step the runs may already have parted at: one after
            the last step before ``first_step`` whose records both held the model's state
            (1 when none did). The first divergent step lies in
            ``earliest_step..first_step``; it is exact when the two are equal. None when
            identical.
        state_steps: how many compared steps held the model's state in both traces.
        end_compared: both traces end with the state after their common last step (an end
            line, or a last record that held the state), and it was compared.
        at_end: the first difference is in the state the runs ended with (after
            ``first_step``, their last step), not in a step's record.
    """

    names: tuple[str, str]
    identical: bool
    steps_compared: int
    reference_steps: int
    other_steps: int
    first_step: int | None
    entries: list[EntryDiff] = field(default_factory=list)
    later_differing_steps: int = 0
    notes: list[str] = field(default_factory=list)
    batch_differs: bool | None = None
    earliest_step: int | None = None
    state_steps: int = 0
    end_compared: bool = False
    at_end: bool = False

    @property
    def exact(self) -> bool:
        """Whether ``first_step`` is known to be the first divergent step."""
        return self.first_step is not None and self.earliest_step == self.first_step

    @property
    def cause(self) -> str | None:
        """``"batch differs: ..."`` or ``"batch identical: ..."`` at the first divergent step."""
        if self.identical or self.batch_differs is None:
            return None
        if self.batch_differs:
            return (
                "batch differs: data pipeline (the step consumed different data: order, "
                "augmentation, or a dataset-owned RNG)"
            )
        return "batch identical: the model's computation differed"

    @property
    def verdict(self) -> str:
        """One line: ``IDENTICAL: 87 steps ...`` or ``DIVERGED at step 37 (run "b" vs "a")``."""
        ref, oth = self.names
        if self.identical:
            return f'IDENTICAL: {self.steps_compared} traced steps bitwise identical (run "{oth}" vs "{ref}")'
        if self.exact or self.earliest_step is None:
            return f'DIVERGED at step {self.first_step} (run "{oth}" vs "{ref}")'
        return (
            f'DIVERGED at a step in {self.earliest_step}-{self.first_step} (run "{oth}" vs "{ref}")'
        )

    @property
    def window(self) -> str | None:
        """Why the first divergent step is not exact, or None when it is (or identical)."""
        if self.identical or self.exact or self.earliest_step is None:
            return None
        where = (
            f"the state after step {self.first_step}, which the runs ended with,"
            if self.at_end
            else f"step {self.first_step}"
        )
        before = (
            f"step {self.earliest_step - 1} was the last to record the model's state"
            if self.earliest_step > 1
            else "no earlier step recorded the model's state"
        )
        return (
            f"{where} is the first record that differs, and {before} (Trace's state_every): "
            f"the runs parted at a step in {self.earliest_step}-{self.first_step} (to name "
            "it, torchrepro check re-runs that interval with TORCHREPRO_TRACE_STATE_EVERY=1, "
            "which records the state every step)"
        )

    def format(self, max_entries: int = 10) -> str:
        """The verdict, then the first differing entries and the notes, one per line.

        Args:
            max_entries: how many differing entries to list before summarising the rest.

        Returns:
            Text without a trailing newline.
        """
        lines = [self.verdict]
        if self.window is not None:
            lines.append("  " + self.window)
        if self.cause is not None:
            lines.append("  " + self.cause)
        for entry in self.entries[:max_entries]:
            lines.append("  " + entry.format())
        if len(self.entries) > max_entries:
            lines.append(
                f"  ... and {len(self.entries) - max_entries} more differing entries at step {self.first_step}"
            )
        if not self.identical and self.first_step is not None:
            later = self.later_differing_steps
            lines.append(f"  {later} later compared step{'s' if later != 1 else ''} also differ")
        lines.extend("  note: " + n for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field, plus ``verdict``."""
        return {
            "names": list(self.names),
            "identical": self.identical,
            "verdict": self.verdict,
            "steps_compared": self.steps_compared,
            "reference_steps": self.reference_steps,
            "other_steps": self.other_steps,
            "first_step": self.first_step,
            "entries": [e.to_dict() for e in self.entries],
            "later_differing_steps": self.later_differing_steps,
            "notes": list(self.notes),
            "batch_differs": self.batch_differs,
            "cause": self.cause,
            "earliest_step": self.earliest_step,
            "exact": self.exact,
            "state_steps": self.state_steps,
            "end_compared": self.end_compared,
            "at_end": self.at_end,
        }


def _entry_measure(entry: dict[str, Any]) -> tuple[str, float | None]:
    if entry.get("kind") == "loss" and entry.get("value") is not None:
        return "value", _as_float(entry.get("value"))
    if entry.get("norm") is None:
        return "checksum", None
    return "norm", _as_float(entry.get("norm"))


def _diff_entry(
    ref: dict[str, Any] | None, oth: dict[str, Any] | None, ref_name: str, oth_name: str
) -> EntryDiff | None:
    base = ref if ref is not None else oth
    assert base is not None
    if ref is not None and oth is not None:
        same = all(ref.get(k) == oth.get(k) for k in ("checksum", "bits", "dtype", "shape"))
        if same:
            return None
    measure, ref_value = _entry_measure(ref) if ref is not None else _entry_measure(base)
    if ref is None:
        ref_value = None
    oth_value = _entry_measure(oth)[1] if oth is not None else None
    notes = []
    if ref is None:
        notes.append(f'only in run "{oth_name}"')
    elif oth is None:
        notes.append(f'missing in run "{oth_name}"')
    else:
        for key in ("dtype", "shape"):
            if ref.get(key) != oth.get(key):
                notes.append(f"{key} {ref.get(key)} vs {oth.get(key)}")
        if (ref.get("checksum") is None) != (oth.get("checksum") is None):
            notes.append(
                "grad is None in run "
                + (f'"{ref_name}"' if ref.get("checksum") is None else f'"{oth_name}"')
            )
    difference = None
    if ref_value is not None and oth_value is not None:
        difference = oth_value - ref_value
    return EntryDiff(
        name=str(base["name"]),
        kind=str(base["kind"]),
        measure=measure,
        reference_value=ref_value,
        other_value=oth_value,
        difference=difference,
        reference_checksum=ref.get("checksum") if ref is not None else None,
        other_checksum=oth.get("checksum") if oth is not None else None,
        note="; ".join(notes),
    )


def _state(record: dict[str, Any]) -> bool:
    return bool(record.get("state", True))


def _diff_step(ref: dict[str, Any], oth: dict[str, Any], names: tuple[str, str]) -> list[EntryDiff]:
    """The differing entries of two records of one step (or two end lines).

    When only one of the records holds the model's state, the state is not compared.
    """
    return _diff_entries(ref["entries"], oth["entries"], names, state=_state(ref) and _state(oth))


def _diff_entries(
    ref_entries: list[dict[str, Any]],
    oth_entries: list[dict[str, Any]],
    names: tuple[str, str],
    *,
    state: bool,
) -> list[EntryDiff]:
    def key(e: dict[str, Any]) -> tuple[str, str]:
        return (str(e["kind"]), str(e["name"]))

    if not state:
        ref_entries = [e for e in ref_entries if e.get("kind") not in STATE_KINDS]
        oth_entries = [e for e in oth_entries if e.get("kind") not in STATE_KINDS]
    other_by_key = {key(e): e for e in oth_entries}
    seen = set()
    diffs = []
    for entry in ref_entries:
        k = key(entry)
        seen.add(k)
        d = _diff_entry(entry, other_by_key.get(k), *names)
        if d is not None:
            diffs.append(d)
    for entry in oth_entries:
        if key(entry) not in seen:
            d = _diff_entry(None, entry, *names)
            if d is not None:
                diffs.append(d)
    return diffs


def compare_traces(
    reference: TraceData | str | os.PathLike[str],
    other: TraceData | str | os.PathLike[str],
    *,
    names: tuple[str, str] = ("run 1", "run 2"),
) -> Comparison:
    """Compare two traces step by step and entry by entry, bitwise (by checksum and bits).

    Norms and loss values are carried along for reporting magnitudes only; two entries
    are equal when their checksums (and loss bits, dtype and shape) are equal. At the
    first divergent step, the batch entries (see :class:`Trace`) tell whether the data
    already differed (:attr:`Comparison.batch_differs`).

    Args:
        reference: the trace to compare against (a :class:`TraceData` or a path).
        other: the other trace.
        names: how to call the two runs in messages: ``(reference, other)``.

    Returns:
        A :class:`Comparison`.

    Raises:
        TraceError: a path cannot be read as a trace (see :func:`read_trace`), or a
            trace has no traced step (nothing to compare).
        TypeError: ``names`` is not a pair of str.

    >>> h = {"format": "torchrepro-trace", "version": 2}
    >>> e = lambda c: {"name": "loss", "kind": "loss", "checksum": c, "value": 0.5}
    >>> a = TraceData("a", h, [{"step": 1, "entries": [e("01")]}, {"step": 2, "entries": [e("02")]}])
    >>> b = TraceData("b", h, [{"step": 1, "entries": [e("01")]}, {"step": 2, "entries": [e("0f")]}])
    >>> compare_traces(a, a).identical
    True
    >>> compare_traces(a, b, names=("run 1", "num_workers=2")).verdict
    'DIVERGED at step 2 (run "num_workers=2" vs "run 1")'
    """
    if not (
        isinstance(names, tuple) and len(names) == 2 and all(isinstance(n, str) for n in names)
    ):
        raise TypeError(f"names must be a tuple of two str, got {names!r}")
    ref = reference if isinstance(reference, TraceData) else read_trace(reference)
    oth = other if isinstance(other, TraceData) else read_trace(other)
    for data, name in ((ref, names[0]), (oth, names[1])):
        if not data.records:
            raise TraceError(
                f'the trace of run "{name}" ({data.path}) has no traced step: nothing to compare'
            )
        steps = data.steps
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise TraceError(
                f'the trace of run "{name}" ({data.path}) repeats or reorders step numbers; '
                "each run needs its own trace file"
            )
    ref_steps = {r["step"]: r for r in ref.records}
    oth_steps = {r["step"]: r for r in oth.records}
    common = sorted(set(ref_steps) & set(oth_steps))
    notes: list[str] = []
    first_step: int | None = None
    entries: list[EntryDiff] = []
    later = 0
    last_state = 0  # the last common step before the first difference that held the state
    state_steps = 0
    for step in common:
        both_state = _state(ref_steps[step]) and _state(oth_steps[step])
        state_steps += both_state
        diffs = _diff_step(ref_steps[step], oth_steps[step], names)
        if not diffs:
            if both_state and first_step is None:
                last_state = step
            continue
        if first_step is None:
            first_step, entries = step, diffs
        else:
            later += 1
    end_compared, end_diffs = _compare_ends(ref, oth, common, names)
    at_end = bool(end_diffs) and first_step is None
    if at_end:
        first_step, entries = common[-1], end_diffs
    only_ref = sorted(set(ref_steps) - set(oth_steps))
    only_oth = sorted(set(oth_steps) - set(ref_steps))
    for name, missing, has in (
        (names[1], only_ref, len(oth_steps)),
        (names[0], only_oth, len(ref_steps)),
    ):
        if missing:
            notes.append(
                f'run "{name}" lacks {len(missing)} traced step(s) that the other has '
                f"(steps {_ranges(missing)}); it traced {has} step(s)"
            )
    mismatch = only_ref[:1] + only_oth[:1]
    if first_step is None and mismatch:
        first_step = min(mismatch)
    batch_differs = None
    if first_step is not None:
        batches = [
            [e for e in steps[first_step]["entries"] if e.get("kind") == "batch"]
            if first_step in steps
            else []
            for steps in (ref_steps, oth_steps)
        ]
        if batches[0] and batches[1]:
            batch_differs = batches[0] != batches[1]
            if not batch_differs and any(e.get("opaque") for e in batches[0]):
                batch_differs = None  # leaves recorded by type only: "identical" is unknown
        if entries and all(e.measure == "checksum" for e in entries if e.kind != "batch"):
            notes.append(
                f"step {first_step} recorded no norms (Trace records them every norm_every "
                "steps); the checksums say which tensors differ, not by how much"
            )
    for key in ("every", "grads", "world_size"):
        if ref.header.get(key) != oth.header.get(key):
            notes.append(
                f"traces were recorded with different {key}: {ref.header.get(key)!r} vs {oth.header.get(key)!r}"
            )
    for data, name in ((ref, names[0]), (oth, names[1])):
        if data.torn:
            notes.append(
                f'run "{name}": a torn last trace line was ignored (the run stopped mid-write)'
            )
    identical = first_step is None
    earliest = None if first_step is None else min(last_state + 1, first_step)
    if common and not end_compared and _state_unrecorded_at_end(ref, oth, common[-1]):
        notes.append(
            f"the state after step {common[-1]} was not compared: a run did not record it "
            "(a trace gets it when the run closes it or exits normally)"
        )
    return Comparison(
        names=names,
        identical=identical,
        steps_compared=len(common),
        reference_steps=len(ref_steps),
        other_steps=len(oth_steps),
        first_step=first_step,
        entries=entries,
        later_differing_steps=later,
        notes=notes,
        batch_differs=batch_differs,
        earliest_step=earliest,
        state_steps=state_steps,
        end_compared=end_compared,
        at_end=at_end,
    )


def _end_state(data: TraceData, last: int) -> dict[str, Any] | None:
    """The record of the state ``data`` ended with after step ``last``, if it has one."""
    if not data.records or data.records[-1]["step"] != last:
        return None
    if _state(data.records[-1]):
        return data.records[-1]
    if data.end is not None and data.end["step"] == last:
        return {"step": last, "state": True, "entries": data.end["entries"]}
    return None


def _compare_ends(
    ref: TraceData, oth: TraceData, common: list[int], names: tuple[str, str]
) -> tuple[bool, list[EntryDiff]]:
    """``(compared, differing state entries)`` of the states both runs ended with.

    The states after the last common step: an end line, or a last record holding the state.
    """
    if not common:
        return False, []
    a, b = _end_state(ref, common[-1]), _end_state(oth, common[-1])
    if a is None or b is None:
        return False, []
    if _state(ref.records[-1]) and _state(oth.records[-1]):
        return True, []  # the last records held the state: compared with the steps
    state = [[e for e in end["entries"] if e.get("kind") in STATE_KINDS] for end in (a, b)]
    return True, _diff_entries(state[0], state[1], names, state=True)


def _state_unrecorded_at_end(ref: TraceData, oth: TraceData, last: int) -> bool:
    """Whether a trace that ends at ``last`` without its state makes the end uncompared."""
    return any(
        data.records and data.records[-1]["step"] == last and _end_state(data, last) is None
        for data in (ref, oth)
    )


def _ranges(steps: list[int]) -> str:
    if len(steps) == 1:
        return str(steps[0])
    if steps == list(range(steps[0], steps[-1] + 1)):
        return f"{steps[0]}-{steps[-1]}"
    shown = ", ".join(str(s) for s in steps[:5])
    return shown + (", ..." if len(steps) > 5 else "")
