"""Re-runs after a divergence: name its exact step, then the module where it starts.

Traces record the model's state every ``state_every`` steps, so a comparison can only
bound the step where two runs parted; :func:`pinpoint_divergence` re-runs both
configurations over that interval with the state recorded every step.
:func:`localize_divergence` re-runs them (or reuses the pinpoint's captures) for that step
with per-module checksums, and compares the captures (:mod:`._localize`).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from pathlib import Path

from .._errors import TraceError
from ..core import _envvars
from ..trace._capture import CAPTURE_SUFFIX, read_capture
from ..trace._compare import Comparison, TraceData, compare_traces, read_trace
from ._execute import Progress, exit_reason, run_process
from ._explain import explain
from ._localize import compare_captures
from ._plan import RunSpec
from ._process import tail
from ._restore import kept_checkpoints
from ._results import CheckReport, RunResult
from ._verdict import first_divergence

__all__ = ["localize_divergence", "pinpoint_divergence"]


def _first_divergence(report: CheckReport) -> tuple[int, RunResult, Comparison] | None:
    """The divergence the verdict names: ``(index in comparisons, run, comparison)``."""
    first = first_divergence(report.facts())
    if first is None or first.comparison.first_step is None:
        return None
    index = next(i for i, c in enumerate(report.comparisons) if c is first.comparison)
    return index, report.runs[index + 1], first.comparison


def _capture_step(path: Path) -> int | None:
    try:
        step = read_capture(str(path)).get("step")
    except TraceError:
        return None
    return step if isinstance(step, int) else None


def _until(trace: TraceData, step: int) -> TraceData:
    """``trace`` with the records of steps up to ``step`` only (no end line)."""
    records = [r for r in trace.records if r["step"] <= step]
    return TraceData(trace.path, trace.header, records, False, [trace.header], [0])


def _rerun(
    command: Sequence[str],
    spec: RunSpec,
    directory: Path,
    *,
    base_env: dict[str, str],
    checkpoint: Path | None,
    reference_trace: Path,
    step: int,
    extra: dict[str, str],
    progress: Progress | None,
    timeout: float | None,
    label: str,
) -> tuple[Path, str | None]:
    """Re-run ``spec`` from ``checkpoint`` (None: from the start) to the end of ``step``.

    The run gets ``TORCHREPRO_LOCALIZE_STEP=step`` (it captures that step per module and
    ends) and ``extra``; starting from a checkpoint, it continues a copy of the reference
    trace (cut back to the checkpoint's step on resume). A resume configuration re-runs as
    itself: from the start, stopped at its ``resume_at`` and resumed in a second process
    (``checkpoint`` must then be None). Returns the trace path and the problem, if the run
    failed.
    """
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        return directory / "trace.jsonl", (
            f"was not re-run: {directory} already exists and is not empty (torchrepro never "
            "deletes what it did not create)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    trace = directory / "trace.jsonl"
    env = dict(spec.env)
    if spec.resume_at is not None and step > spec.resume_at:
        env.update(spec.resume_env)
    if checkpoint is not None:  # the checkpoint and the trace it continues
        shutil.copyfile(checkpoint, directory / "checkpoint.pt")
        shutil.copyfile(reference_trace, trace)
    run_env = {
        **base_env,
        **env,
        **extra,
        _envvars.TRACE: str(trace),
        _envvars.CHECKPOINT: str(directory / "checkpoint.pt"),
        _envvars.LOCALIZE_STEP: str(step),
    }
    run_env.pop(_envvars.STOP_AT, None)
    run_env.pop(_envvars.KEEP_CHECKPOINTS, None)
    if progress is not None:
        progress(label)
    if spec.resume_at is not None and step > spec.resume_at:
        if checkpoint is not None:
            raise ValueError("a resume configuration re-runs from the start, not a checkpoint")
        stopped = {
            **base_env,
            **spec.env,
            **extra,
            _envvars.TRACE: str(trace),
            _envvars.CHECKPOINT: str(directory / "checkpoint.pt"),
            _envvars.STOP_AT: str(spec.resume_at),
        }
        code, problem = run_process(
            command,
            stopped,
            directory,
            label=label,
            trace=trace,
            progress=progress,
            timeout=timeout,
        )
        if problem is None and code != 0:
            problem = f"{exit_reason(code)}: {tail(directory / 'stderr.log', lines=5)}"
        if problem is not None:
            return trace, f"(the part stopped at step {spec.resume_at}) {problem}"
    code, problem = run_process(
        command, run_env, directory, label=label, trace=trace, progress=progress, timeout=timeout
    )
    if problem is None and code != 0:
        problem = f"{exit_reason(code)}: {tail(directory / 'stderr.log', lines=5)}"
    return trace, problem


def _rerun_both(
    command: Sequence[str],
    pair: tuple[RunResult, RunResult],
    root: Path,
    kind: str,
    *,
    base_env: dict[str, str],
    start: int,
    checkpoint: Path | None,
    step: int,
    extra: dict[str, str],
    progress: Progress | None,
    timeout: float | None,
) -> list[tuple[RunSpec, Path, str | None]]:
    """:func:`_rerun` the reference and the other run into ``<root>/<kind>1`` and ``2``.

    ``checkpoint`` is the reference's checkpoint of step ``start`` (None: from the start).
    Stops after the first failed re-run. Returns ``(spec, trace path, problem)`` of each.
    """
    done = []
    for index, result in enumerate(pair):
        path, problem = _rerun(
            command,
            result.spec,
            root / f"{kind}{index + 1}",
            base_env=base_env,
            checkpoint=checkpoint,
            reference_trace=pair[0].directory / "trace.jsonl",
            step=step,
            extra=extra,
            progress=progress,
            timeout=timeout,
            label=f"{kind} {result.spec.name}: steps {start + 1}..{step}",
        )
        done.append((result.spec, path, problem))
        if problem is not None:
            break
    return done


def pinpoint_divergence(
    report: CheckReport,
    command: Sequence[str],
    base_env: dict[str, str],
    root: Path,
    *,
    progress: Progress | None,
    timeout: float | None,
) -> tuple[int, tuple[Path, Path]] | None:
    """Find the exact first divergent step when the traces only bound it.

    Traces record the model's state every ``state_every`` steps, so the first record
    that differs can come after the step where the runs parted: they parted in
    ``earliest_step..first_step`` (:class:`Comparison`). Both configurations are re-run
    over that interval with the state recorded every step
    (``TORCHREPRO_TRACE_STATE_EVERY=1``), from the reference's last kept checkpoint
    before it (else from the start). Each re-run must repeat its own first run's records;
    then the re-runs' first differing step replaces the bound in the report. Otherwise
    the bound stays, with a note that says why.

    Returns:
        The step the re-runs started after, and their capture files (of the bound's last
        step), or None when no exact step was found.
    """
    target = _first_divergence(report)
    if target is None:
        return None
    position, run, comparison = target
    if comparison.exact or comparison.first_step is None or comparison.earliest_step is None:
        return None
    step, earliest = comparison.first_step, comparison.earliest_step
    reference = report.runs[0]
    kept = kept_checkpoints(reference.directory) if run.spec.resume_at is None else {}
    start = max((k for k in kept if k < earliest), default=0)
    traces: list[TraceData] = []
    for spec, path, problem in _rerun_both(
        command,
        (reference, run),
        root,
        "pinpoint",
        base_env=base_env,
        start=start,
        checkpoint=kept.get(start),
        step=step,
        extra={_envvars.TRACE_STATE_EVERY: "1"},
        progress=progress,
        timeout=timeout,
    ):
        try:
            if problem is not None:
                raise TraceError(problem)
            traces.append(read_trace(path))
        except TraceError as exc:
            report.pinpoint_note = (
                f"not pinpointed (the first divergent step stays within {earliest}-{step}): "
                f'the re-run of "{spec.name}" {exc}'
            )
            return None
    origin = f"the checkpoint at step {start}" if start else "the start"
    done = (
        f're-ran "{reference.spec.name}" and "{run.spec.name}" from {origin} to step {step} '
        "with the model's state recorded every step"
    )
    unrepeated = []
    for original, again in zip((reference, run), traces, strict=True):
        assert original.trace is not None
        name = original.spec.name
        repeat = compare_traces(_until(original.trace, step), again, names=(name, f"{name} again"))
        if not repeat.identical:
            unrepeated.append(f'"{name}"')
    pinned = compare_traces(traces[0], traces[1], names=comparison.names)
    first = pinned.first_step
    if pinned.identical or not pinned.exact or first is None or first > step:
        report.pinpoint_note = (
            f"{done}, but they did not part by step {step}"
            + (f", and {_did_not_repeat(unrepeated)}" if unrepeated else "")
            + f"; the first divergent step stays within {earliest}-{step}"
        )
        return None
    same_settings = run.spec.env == reference.spec.env and run.spec.resume_at is None
    if unrepeated and not same_settings:
        report.pinpoint_note = (
            f"{done}, but {_did_not_repeat(unrepeated)}; the first divergent step stays "
            f"within {earliest}-{step}"
        )
        return None
    if unrepeated:
        # Runs with identical settings part where the nondeterminism strikes, which varies
        # from run to run: the re-runs' exact step is as good a witness as the first runs'.
        report.pinpoint_note = (
            f"{done}: the re-runs parted at step {first}. They did not repeat their first runs "
            f"(which parted at a step in {earliest}-{step}): the command is nondeterministic, "
            "so the step where runs with identical settings part varies"
        )
    else:
        report.pinpoint_note = f"{done}: the first divergent step is {first}"
    report.comparisons[position] = dataclasses.replace(
        comparison,
        first_step=first,
        earliest_step=first,
        entries=pinned.entries,
        batch_differs=pinned.batch_differs,
        at_end=False,
        # the steps after ``first`` up to ``step`` (the re-runs' ones), then the later ones
        later_differing_steps=pinned.later_differing_steps + comparison.later_differing_steps,
    )
    paths = [root / f"pinpoint{i}" / ("trace.jsonl" + CAPTURE_SUFFIX) for i in (1, 2)]
    return start, (paths[0], paths[1])


def _did_not_repeat(names: list[str]) -> str:
    runs = " and ".join(names)
    return (
        f"the re-run{'s' if len(names) > 1 else ''} of {runs} did not repeat "
        f"{'their' if len(names) > 1 else 'its'} first run: the command is nondeterministic"
    )


def localize_divergence(
    report: CheckReport,
    command: Sequence[str],
    base_env: dict[str, str],
    root: Path,
    *,
    force: bool | None,
    progress: Progress | None,
    timeout: float | None = None,
    captured: tuple[int, tuple[Path, Path]] | None = None,
) -> None:
    """Name the first module whose output or gradient differs at the first divergent step N.

    The reference run kept every checkpoint it saved (``TORCHREPRO_KEEP_CHECKPOINTS``:
    hard links, no extra write). Both diverging configurations are re-run from the
    reference's last checkpoint before N (the state both runs shared, since their traces
    agreed up to N) with ``TORCHREPRO_LOCALIZE_STEP=N``; each re-run ends after step N,
    so it costs at most one checkpoint interval. Without a checkpoint before N it starts
    from scratch, which ``localize=None`` allows only for N = 1 or N within the first
    checkpoint interval. Nothing runs when the runs agree. ``captured``: the step the
    pinpoint re-runs started after and their capture files (:func:`pinpoint_divergence`),
    used when the captures are of step N.
    """
    target = _first_divergence(report)
    if target is None:
        return
    position, run, comparison = target
    explanation = report.explanations[position]
    step = comparison.first_step
    assert step is not None
    if not comparison.exact:
        report.localization_note = (
            f"not localized: the first divergent step is not known exactly (a step in "
            f"{comparison.earliest_step}-{step})"
        )
        return
    if explanation.batch_differs and not force:
        report.localization_note = (
            f"not localized: the batch at step {step} already differed, so every module "
            "sees other inputs (use --localize to re-run anyway)"
        )
        return
    reference = report.runs[0]
    # A resume configuration re-runs as itself, from the start (see _rerun); a re-run from
    # the reference's checkpoint would be a resume of the reference instead.
    kept = kept_checkpoints(reference.directory) if run.spec.resume_at is None else {}
    start = max((k for k in kept if k < step), default=0)
    interval = min(kept, default=None)
    captures = []
    if captured is not None and all(_capture_step(p) == step for p in captured[1]):
        start = captured[0]  # the pinpoint re-runs captured step N on their way
        captures = [read_capture(str(p)) for p in captured[1]]
    elif not force and step - start > 1 and (interval is None or step - start > interval):
        report.localization_note = (
            f"not localized: no checkpoint before step {step} was kept, so the re-run would "
            f"train {step} steps from the start (use --localize to re-run anyway)"
        )
        return
    rerun = (
        []
        if captures
        else _rerun_both(
            command,
            (reference, run),
            root,
            "localize",
            base_env=base_env,
            start=start,
            checkpoint=kept.get(start),
            step=step,
            extra={},
            progress=progress,
            timeout=timeout,
        )
    )
    for spec, trace, problem in rerun:
        try:
            if problem is not None:
                raise TraceError(problem)
            captures.append(read_capture(str(trace) + CAPTURE_SUFFIX))
        except TraceError as exc:
            report.localization_note = f'not localized: the re-run of "{spec.name}" {exc}'
            return
    report.localization = compare_captures(captures[0], captures[1])
    if report.localization.input_differs and explanation.batch_differs is None:
        # The traces held no batch checksum (another loader): the capture saw it differ.
        assert reference.trace is not None
        assert run.trace is not None
        index = report.explanations.index(explanation)
        report.explanations[index] = explain(reference.trace, run.trace, comparison, batch=True)
    origin = f"the checkpoint at step {start}" if start else "the start"
    report.localization_note = (
        f're-ran "{reference.spec.name}" and "{run.spec.name}" from {origin} of "{reference.spec.name}" '
        f"to step {step} ({step - start} step{'s' if step - start != 1 else ''} each) with per-module checksums"
    )
