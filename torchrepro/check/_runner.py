"""``torchrepro check``: run a command several ways, compare the traces, and say what holds.

The stages, each a module of this subpackage: plan the runs (:mod:`._plan`), execute each
(:mod:`._execute`), compare their traces (:func:`torchrepro.compare_traces`), pinpoint and
localize the first divergence (:mod:`._pinpoint`, :mod:`._localize`), explain it
(:mod:`._explain`), and decide the claim (:mod:`._verdict`, a pure rule table).

No printing here: progress goes to a callback, results come back as a :class:`CheckReport`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..core import _envvars
from ..core._seed import seed_from_env
from ..trace._compare import Comparison, compare_traces
from ._execute import Progress, execute, keep_root, loader_effect
from ._explain import explain
from ._leftovers import exit_differences, file_differences, tensor_files
from ._pinpoint import localize_divergence, pinpoint_divergence
from ._plan import plan_runs, run_environment
from ._restore import restore_differences
from ._results import CheckReport, RunResult

__all__ = ["run_check"]


def run_check(
    command: Sequence[str],
    *,
    runs: int = 2,
    vary: Sequence[str] = (),
    resume_at: int | None = None,
    keep: str | os.PathLike[str] | None = None,
    seed: int | None = None,
    progress: Progress | None = None,
    localize: bool | None = None,
    timeout: float | None = None,
) -> CheckReport:
    """Run ``command`` several ways and compare every trace with the first.

    Each run gets its own ``TORCHREPRO_TRACE`` and ``TORCHREPRO_CHECKPOINT`` in a fresh
    directory, ``PYTHONHASHSEED`` and ``CUBLAS_WORKSPACE_CONFIG`` as ``torchrepro run``
    sets them, and ``TORCHREPRO_SEED`` (``seed``, else the caller's ``TORCHREPRO_SEED``,
    else 0). ``--vary num_workers=...`` sets ``TORCHREPRO_NUM_WORKERS``; ``seed=...`` sets
    ``TORCHREPRO_SEED``; any other NAME sets the environment variable NAME.

    Args:
        command: the program and its arguments.
        runs: runs with the base environment.
        vary: ``"NAME=V1,V2,..."`` items (see :func:`plan_runs`).
        resume_at: add a run stopped at this step and resumed in a second process.
        keep: keep traces and logs in this directory, in ``run1``, ``run2``, ... (else
            in a temporary directory, always removed). Existing ``runN`` entries that are
            not empty directories are refused, never deleted.
        seed: the seed for every run.
        progress: called with a short status line while runs proceed.
        localize: on divergence, re-run the two diverging configurations for the first
            divergent step with per-module checksums (see :func:`localize_divergence`).
            None: only when the batch was identical and the re-run is at most one
            checkpoint interval; True: always; False: never.
        timeout: seconds each process of a run may take; then it is stopped (SIGTERM,
            SIGKILL 5 s later) and the check fails naming the run.

    Each run's process starts in a session of its own: whatever it leaves running is
    killed when it exits, and an exception here (``KeyboardInterrupt``, or SIGTERM turned
    into one by :func:`torchrepro.check._process.raise_on_signals`) stops the whole group first.

    Returns:
        A :class:`CheckReport`; it stops at the first failed run, and at the first run
        whose trace shows that it did not do what was asked (a ``--vary num_workers``
        value no torchrepro loader used, with a trace identical to run 1's; a resumed
        process that did not resume from ``resume_at`` or did not continue after it; a
        trace with missing steps). With ``resume_at`` at or past run 1's last step it
        stops after run 1.

    Raises:
        ValueError: bad ``runs``, ``vary``, ``resume_at`` or ``timeout``; an empty command;
            a ``keep`` that is a file, cannot be created or holds a non-empty ``runN``.
    """
    if not command:
        raise ValueError("command must not be empty")
    specs = plan_runs(runs, vary, resume_at, gpu=torch.cuda.is_available())
    if seed is None:
        from_env = seed_from_env()
        seed = 0 if from_env is None else from_env
    base_env = run_environment(seed)
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not 0 < timeout < float("inf")
    ):
        raise ValueError(f"--timeout must be a number of seconds > 0, got {timeout!r}")
    if keep is not None:
        root = keep_root(Path(keep), len(specs))
    results: list[RunResult] = []
    if keep is None:
        root = Path(tempfile.mkdtemp(prefix="torchrepro-check-"))
    comparisons: list[Comparison] = []
    notes: list[str] = []
    try:
        for index, spec in enumerate(specs):
            if progress is not None:
                progress(f"run {index + 1}/{len(specs)}: {spec.name}")
            # The reference keeps its checkpoints for re-runs; a resume run keeps its own,
            # so a resume fault can be shown in the state saved after the stop.
            keeps = index == 0 or spec.resume_at is not None
            env = {**base_env, _envvars.KEEP_CHECKPOINTS: "1"} if keeps else base_env
            since = time.time()
            result = execute(
                command, spec, root / f"run{index + 1}", env, progress, timeout=timeout
            )
            result.files = tensor_files(Path.cwd(), since, skip=root)
            results.append(result)
            if result.error is not None:
                return CheckReport(results, comparisons, f'run "{spec.name}" {result.error}')
            trace = result.trace
            if trace is None:  # unreachable: a run without a trace has an error
                raise RuntimeError(f"run {spec.name!r} has no trace")
            if progress is not None:
                progress(
                    f"run {index + 1}/{len(specs)}: {spec.name}: done, {len(trace.records)} steps"
                )
            if index == 0:
                last = trace.steps[-1]
                if resume_at is not None and resume_at >= last:
                    return CheckReport(
                        results,
                        comparisons,
                        f'--resume-at {resume_at}: run "{spec.name}" ran {last} steps, so there is '
                        f"nothing to resume after step {resume_at}; choose a step below {last}",
                    )
                continue
            reference = results[0]
            assert reference.trace is not None
            comparison = compare_traces(
                reference.trace, trace, names=(reference.spec.name, spec.name)
            )
            comparisons.append(comparison)
            effect = loader_effect(spec, trace, reference.spec)
            if effect is not None:
                if comparison.identical:  # an untested variation must not pass as a proof
                    result.error = effect
                    return CheckReport(results, comparisons, f'run "{spec.name}": {effect}')
                # it differs, so something changed: the script's own loader may have read
                # the variable, which no torchrepro loader recorded
                notes.append(
                    f'run "{spec.name}": '
                    + effect.replace("had no effect:", "is not confirmed by the trace:")
                )
        report = CheckReport(results, comparisons, notes=notes)
        reference = results[0]
        assert reference.trace is not None
        _compare_at_exit(report)
        for result, comparison in zip(results[1:], comparisons, strict=True):
            if result.spec.resume_at is not None and not comparison.identical:
                found = restore_differences(
                    reference.directory, result.directory, result.spec.resume_at
                )
                if found is not None:
                    report.restore[result.spec.name] = found
        captured = None
        if localize is not False and report.unexpected:
            captured = pinpoint_divergence(
                report, command, base_env, root, progress=progress, timeout=timeout
            )
        report.explanations = [
            explain(reference.trace, r.trace, c)
            for r, c in zip(results[1:], comparisons, strict=True)
            if r.trace is not None
        ]
        if localize is not False and report.unexpected:
            localize_divergence(
                report,
                command,
                base_env,
                root,
                force=localize,
                progress=progress,
                timeout=timeout,
                captured=captured,
            )
        return report
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


def _compare_at_exit(report: CheckReport) -> None:
    """Each run's exit state and tensor files beside the reference's (see ._leftovers)."""
    reference = report.runs[0]
    compared: list[str] | None = None
    for run in report.runs[1:]:
        if run.spec.must_differ:
            continue
        names, differs = exit_differences(reference.directory, run.directory)
        differs += file_differences(reference.files, run.files)
        compared = names if compared is None else [n for n in compared if n in names]
        if differs:
            report.exit_differs[run.spec.name] = tuple(differs)
    files = sorted(reference.files)
    report.exit_compared = tuple(
        ([f"the state of {', '.join(compared)}"] if compared else [])
        + ([f"the files {', '.join(files)}"] if files else [])
    )
