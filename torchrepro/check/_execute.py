"""Running one configuration of a check: its processes, its trace, and what the trace shows it did.

Each run's trace says what the run really did (:mod:`torchrepro.trace._file` headers: the
seed, each torchrepro loader's effective ``num_workers``, the step a process resumed
from), and this module verifies it: a ``--vary`` value that did not take effect, a resume
that did not resume, or a trace with gaps is an error, never a pass.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

from .._errors import CheckpointError, TraceError
from ..checkpoint._io import read_checkpoint
from ..core import _envvars
from ..trace._compare import TraceData, read_trace
from ._leftovers import EXIT_STATE
from ._plan import DISTORT_VAR, INDUCTOR_CACHE_VAR, RunSpec
from ._process import gloo_teardown_abort, run_in_group, tail
from ._results import RunResult

__all__ = ["Progress", "execute", "exit_reason", "keep_root", "loader_effect", "run_process"]

Progress = Callable[[str], None]


class _StepCounter:
    """Counts a growing trace's step records, reading only what was appended since last time.

    Header lines (one per writing process: a resumed run appends its own) are not steps.
    """

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.steps = path, 0, 0

    def __call__(self) -> int:
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < self.offset:  # rewritten: count afresh
                    self.offset = self.steps = 0
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return 0
        end = data.rfind(b"\n") + 1  # whole lines only; a partial one is read next time
        lines = data[:end].split(b"\n")
        self.offset += end
        self.steps += sum(1 for line in lines if line.startswith(b'{"step"'))
        return self.steps


def exit_reason(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


def _steps_saved(path: Path) -> int | None:
    """The step count a Checkpointer recorded in ``path``, or None when unreadable."""
    try:
        content, _digest = read_checkpoint(path)
    except CheckpointError:
        return None
    steps = content.get("meta", {}).get("steps")
    return steps if isinstance(steps, int) else None


def run_process(
    command: Sequence[str],
    env: dict[str, str],
    directory: Path,
    *,
    label: str,
    trace: Path,
    progress: Progress | None,
    timeout: float | None,
) -> tuple[int, str | None]:
    """Run one process of a run; its exit status, and why it failed to start or finish."""
    steps = _StepCounter(trace)

    def tick() -> None:
        if progress is not None:
            progress(f"{label}: {steps()} steps")

    try:
        finished = run_in_group(
            command,
            env,
            stdout=directory / "stdout.log",
            stderr=directory / "stderr.log",
            timeout=timeout,
            tick=tick,
        )
    except OSError as exc:
        reason = exc.strerror or str(exc)
        return 127 if isinstance(exc, FileNotFoundError) else 126, (
            f"could not start {command[0]!r}: {reason}; check the command after --"
        )
    if finished.timed_out:
        return finished.returncode, (
            f"did not finish within --timeout {timeout:g} s; it was stopped (SIGTERM, then SIGKILL)"
        )
    return finished.returncode, gloo_teardown_abort(finished.returncode, directory / "stderr.log")


def execute(
    command: Sequence[str],
    spec: RunSpec,
    directory: Path,
    base_env: dict[str, str],
    progress: Progress | None,
    *,
    timeout: float | None = None,
) -> RunResult:
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):  # checked before the first run too; never delete it
        return RunResult(
            spec,
            0,
            None,
            "",
            directory,
            f"was not started: {directory} is not empty (torchrepro never deletes what it did "
            "not create)",
        )
    trace_path, ckpt_path = directory / "trace.jsonl", directory / "checkpoint.pt"
    env = {
        **base_env,
        **spec.env,
        _envvars.TRACE: str(trace_path),
        _envvars.CHECKPOINT: str(ckpt_path),
        _envvars.EXIT_STATE: str(directory / EXIT_STATE),
    }
    env.pop(_envvars.STOP_AT, None)
    if spec.cold_cache:  # empty at the start: created after the emptiness check above
        env[INDUCTOR_CACHE_VAR] = str(directory / "inductor-cache")
    if spec.distort_autotune:
        env[DISTORT_VAR] = "inverse"

    def run(run_env: dict[str, str]) -> tuple[int, str, str | None]:
        code, problem = run_process(
            command,
            run_env,
            directory,
            label=spec.name,
            trace=trace_path,
            progress=progress,
            timeout=timeout,
        )
        return code, tail(directory / "stderr.log"), problem

    def failed(code: int, stderr_tail: str, message: str) -> RunResult:
        return RunResult(spec, code, None, stderr_tail, directory, message)

    if spec.resume_at is not None:
        code, last, problem = run({**env, _envvars.STOP_AT: str(spec.resume_at)})
        if problem is not None:
            return failed(code, last, f"(the part stopped at step {spec.resume_at}) {problem}")
        if code != 0:
            return failed(code, last, "the stopped run failed")
        if not ckpt_path.exists():
            return failed(
                code,
                "",
                f"--resume-at {spec.resume_at}: the command wrote no checkpoint; use torchrepro.Checkpointer "
                "(it saves and exits at TORCHREPRO_STOP_AT) so the run can be stopped and resumed",
            )
        stopped = _steps_saved(ckpt_path)
        if stopped != spec.resume_at:
            return failed(
                code,
                "",
                f"--resume-at {spec.resume_at}: the command saved its last checkpoint at step {stopped} and "
                f"ended before step {spec.resume_at}; choose a step the run reaches",
            )
        env = {**env, **spec.resume_env}
    code, last, problem = run(env)
    if problem is not None:
        return failed(code, last, problem)
    if code != 0:
        return failed(code, last, exit_reason(code))
    if not trace_path.exists():
        return failed(
            code,
            last,
            "recorded no trace: add `trace = torchrepro.Trace()` and call `trace.step(loss=loss, model=model)` "
            "once per training step (it writes to TORCHREPRO_TRACE)",
        )
    try:
        trace = read_trace(trace_path)
    except TraceError as exc:
        return failed(code, last, f"unreadable trace: {exc}")
    if not trace.records:
        return failed(code, last, "its trace has no steps: call trace.step() each step")
    problem = _missing_steps(trace)
    if problem is None and spec.resume_at is not None:
        problem = _resume_problem(spec.resume_at, trace)
    if problem is not None:
        return RunResult(spec, code, trace, last, directory, problem)
    return RunResult(spec, code, trace, last, directory)


def keep_root(root: Path, count: int) -> Path:
    """``root`` for ``--keep``, created if needed; refuses what a check would overwrite."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(
            f"--keep {str(root)!r} exists and is not a directory; give a directory"
        ) from None
    except OSError as exc:
        raise ValueError(
            f"--keep {str(root)!r}: cannot create this directory ({exc.strerror or exc}); "
            "give a writable place"
        ) from None
    for index in range(1, count + 1):
        run = root / f"run{index}"
        if run.is_symlink() or (run.exists() and (not run.is_dir() or any(run.iterdir()))):
            raise ValueError(
                f"--keep {str(root)!r} already holds {run.name!r} (not an empty directory); "
                "torchrepro check never deletes what it did not create: give a new or empty "
                "directory, or remove the old runs yourself"
            )
    return root


def _missing_steps(trace: TraceData) -> str | None:
    """Why the trace's steps are not ``every, 2*every, ...`` without a gap, or None."""
    every = trace.header.get("every", 1)
    every = every if isinstance(every, int) and every >= 1 else 1
    expected = every
    for step in trace.steps:
        if step != expected:
            return (
                f"its trace misses traced steps: after step {expected - every} comes step {step} "
                f"(expected {expected}); a trace must hold every traced step of the run"
            )
        expected += every
    return None


def loader_effect(spec: RunSpec, trace: TraceData, reference: RunSpec) -> str | None:
    """Whether each process given another num_workers than run 1 used it; why not, else None."""
    envs = [spec.env] + ([{**spec.env, **spec.resume_env}] if spec.resume_at is not None else [])
    for (header, _records), env in zip(trace.segments(), envs, strict=False):
        wanted = env.get(_envvars.NUM_WORKERS)
        if wanted is None or wanted == reference.env.get(_envvars.NUM_WORKERS):
            continue
        loaders = header.get("facts", {}).get("loaders") or []
        if not loaders:
            return (
                f"--vary num_workers={wanted} had no effect: no torchrepro.DataLoader read "
                f"{_envvars.NUM_WORKERS}; is the loader torch's own? Use torchrepro.DataLoader"
            )
        used = sorted({str(loader.get("num_workers")) for loader in loaders})
        if used != [wanted]:
            return (
                f"--vary num_workers={wanted} had no effect: the run's torchrepro.DataLoader used "
                f"num_workers={', '.join(used)}"
            )
    return None


def _resume_problem(resume_at: int, trace: TraceData) -> str | None:
    """Whether the second process resumed from ``resume_at`` and continued after it.

    The advice names what the resumed process's header shows is wrong: a Trace restored
    from the checkpoint (``trace_restored``) at another step than the Checkpointer's count
    means the two count different steps, not that the Trace was left out.
    """
    segments = trace.segments()
    header, records = segments[-1]
    facts = header.get("facts", {})
    resumed = facts.get("resumed_from")
    restored = facts.get("trace_restored")
    if resumed != resume_at:
        found = "did not resume" if resumed is None else f"resumed from step {resumed}"
        return (
            f"--resume-at {resume_at}: the resumed process {found}, not from step {resume_at}; "
            "call Checkpointer.resume() (or load_checkpoint) before the training loop"
            + (
                ", and pass the Trace to the Checkpointer (trace=trace) so the trace continues"
                if restored is None
                else ""
            )
        )
    every = header.get("every", 1)
    every = every if isinstance(every, int) and every >= 1 else 1
    expected = (resume_at // every + 1) * every
    first = records[0]["step"] if records else None
    if first == expected:
        return None
    got = "traced no step" if first is None else f"continued with step {first}"
    problem = f"--resume-at {resume_at}: the resumed process {got}, not step {expected}; "
    if not isinstance(restored, int):
        return problem + (
            "pass the Trace to the Checkpointer (trace=trace) so its step count is restored, "
            "and count steps from Checkpointer.steps"
        )
    problem += (
        f"the checkpoint restored the Trace at step {restored} while the Checkpointer had "
        f"counted {resume_at} steps: the two count different steps"
    )
    if restored < resume_at:
        return problem + (
            f" (ckpt.step() ran before trace.step() in step {resume_at}, so the stop at "
            f"{resume_at} came before that step was traced); call trace.step() first, then "
            "ckpt.step(), once per training step"
        )
    return problem + (
        " (trace.step() runs more often than ckpt.step(), e.g. once per micro-batch and "
        "once per optimizer step, so --resume-at K counts other steps than the trace); call "
        "both once per optimizer step"
    )
