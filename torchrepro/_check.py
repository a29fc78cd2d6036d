"""The check runner behind ``torchrepro check``: run a command several ways, compare traces.

No printing here: progress goes to a callback, results come back as a :class:`CheckReport`.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _envvars
from ._checkpoint import read_checkpoint
from ._compare import Comparison, TraceData, compare_traces, read_trace
from ._determinism import CUBLAS_VAR, CUBLAS_WORKSPACE_CONFIG
from ._errors import CheckpointError, TraceError
from ._process import run_in_group, tail
from ._seed import derive_seed, seed_from_env

__all__ = ["CheckReport", "RunResult", "RunSpec", "plan_runs", "run_check", "run_environment"]

# The most runs --runs asks for (each is a full training run; more is a typo).
MAX_RUNS = 100

# --vary names with a meaning of their own; any other NAME sets the environment variable NAME.
VARY_ALIASES = {"num_workers": _envvars.NUM_WORKERS, "seed": _envvars.SEED}

Progress = Callable[[str], None]


def run_environment(seed: int | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a reproducible run gets: hash seed, cuBLAS config, and the seed.

    ``PYTHONHASHSEED`` is the seed when it fits in 32 bits (else one derived from it), or
    0 without a seed; ``CUBLAS_WORKSPACE_CONFIG`` is set unless already set.
    """
    env = dict(os.environ if base is None else base)
    if seed is None:
        env["PYTHONHASHSEED"] = "0"
    else:
        hash_seed = seed if seed < 2**32 else derive_seed(seed, "pythonhashseed") % 2**32
        env["PYTHONHASHSEED"] = str(hash_seed)
        env[_envvars.SEED] = str(seed)
    env.setdefault(CUBLAS_VAR, CUBLAS_WORKSPACE_CONFIG)
    return env


@dataclass(frozen=True)
class RunSpec:
    """One way to run the command: a name, extra environment, and an optional stop step."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    resume_at: int | None = None
    resume_env: dict[str, str] = field(default_factory=dict)


@dataclass
class RunResult:
    """What one run left: its trace, exit status and the tail of its stderr."""

    spec: RunSpec
    returncode: int
    trace: TraceData | None
    stderr_tail: str
    directory: Path
    error: str | None = None


@dataclass
class CheckReport:
    """The outcome of :func:`run_check`.

    Attributes:
        runs: every run's result, the reference first.
        comparisons: each later run compared with the reference.
        error: why the check could not be made (a run failed, no trace), or None.
    """

    runs: list[RunResult]
    comparisons: list[Comparison]
    error: str | None = None

    @property
    def reproducible(self) -> bool:
        return self.error is None and all(c.identical for c in self.comparisons)

    @property
    def steps(self) -> int:
        return len(self.runs[0].trace.records) if self.runs and self.runs[0].trace else 0

    def verdict(self) -> str:
        """``REPRODUCIBLE: 4 runs x 87 steps bitwise identical`` or the first divergence."""
        if self.error is not None:
            return f"ERROR: {self.error}"
        diverged = [c for c in self.comparisons if not c.identical]
        if not diverged:
            return f"REPRODUCIBLE: {len(self.runs)} runs x {self.steps} steps bitwise identical"
        first = min(diverged, key=lambda c: c.first_step if c.first_step is not None else 0)
        return first.verdict

    def to_dict(self) -> dict[str, Any]:
        return {
            "reproducible": self.reproducible,
            "verdict": self.verdict(),
            "error": self.error,
            "runs": [
                {
                    "name": r.spec.name,
                    "env": r.spec.env,
                    "resume_at": r.spec.resume_at,
                    "returncode": r.returncode,
                    "steps": len(r.trace.records) if r.trace else 0,
                    "error": r.error,
                }
                for r in self.runs
            ],
            "comparisons": [c.to_dict() for c in self.comparisons],
        }


def _parse_vary(vary: Sequence[str]) -> list[tuple[str, str, list[str]]]:
    parsed = []
    for item in vary:
        name, sep, values = item.partition("=")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not name.strip() or not choices:
            raise ValueError(f"--vary must look like NAME=V1,V2,..., got {item!r}")
        name = name.strip()
        parsed.append((name, VARY_ALIASES.get(name, name), choices))
    return parsed


def plan_runs(runs: int, vary: Sequence[str] = (), resume_at: int | None = None) -> list[RunSpec]:
    """The runs of a check.

    ``runs`` runs with the base environment (the first value of each ``--vary`` applied),
    one run per further value of each ``--vary``, and with ``resume_at`` one run stopped at
    that step and resumed in a second process (with the last value of the first ``--vary``
    for its second process, so resuming also changes, e.g., num_workers).

    Raises:
        ValueError: ``runs`` < 1, a malformed ``--vary``, or ``resume_at`` < 1.
    """
    if isinstance(runs, bool) or not isinstance(runs, int) or not 1 <= runs <= MAX_RUNS:
        raise ValueError(f"--runs must be an integer in [1, {MAX_RUNS}], got {runs!r}")
    if resume_at is not None and (isinstance(resume_at, bool) or resume_at < 1):
        raise ValueError(f"--resume-at must be a step >= 1, got {resume_at!r}")
    parsed = _parse_vary(vary)
    base = {var: values[0] for _name, var, values in parsed}
    specs = [RunSpec(f"run {i + 1}", dict(base)) for i in range(runs)]
    for name, var, values in parsed:
        for value in values[1:]:
            specs.append(RunSpec(f"{name}={value}", {**base, var: value}))
    if resume_at is not None:
        resume_env = dict(base)
        label = f"resume at {resume_at}"
        if parsed and len(parsed[0][2]) > 1:
            name, var, values = parsed[0]
            resume_env[var] = values[-1]
            label += f" ({name}={values[0]} -> {values[-1]})"
        specs.append(RunSpec(label, dict(base), resume_at=resume_at, resume_env=resume_env))
    return specs


class _StepCounter:
    """Counts a growing trace's step lines, reading only what was appended since last time."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.lines = path, 0, 0

    def __call__(self) -> int:
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < self.offset:  # rewritten: count afresh
                    self.offset = self.lines = 0
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return 0
        self.offset += len(data)
        self.lines += data.count(b"\n")
        return max(self.lines - 1, 0)  # minus the header line


def _exit_reason(code: int) -> str:
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


def _run_process(
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
    return finished.returncode, None


def _execute(
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
    }
    env.pop(_envvars.STOP_AT, None)

    def run(run_env: dict[str, str]) -> tuple[int, str, str | None]:
        code, problem = _run_process(
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
        return failed(code, last, _exit_reason(code))
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
    return RunResult(spec, code, trace, last, directory)


def _keep_root(root: Path, count: int) -> Path:
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


def run_check(
    command: Sequence[str],
    *,
    runs: int = 2,
    vary: Sequence[str] = (),
    resume_at: int | None = None,
    keep: str | os.PathLike[str] | None = None,
    seed: int | None = None,
    progress: Progress | None = None,
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
        timeout: seconds each process of a run may take; then it is stopped (SIGTERM,
            SIGKILL 5 s later) and the check fails naming the run.

    Each run's process starts in a session of its own: whatever it leaves running is
    killed when it exits, and an exception here (``KeyboardInterrupt``, or SIGTERM turned
    into one by :func:`torchrepro._process.raise_on_signals`) stops the whole group first.

    Returns:
        A :class:`CheckReport`; it stops at the first failed run.

    Raises:
        ValueError: bad ``runs``, ``vary``, ``resume_at`` or ``timeout``; an empty command;
            a ``keep`` that is a file, cannot be created or holds a non-empty ``runN``.
    """
    if not command:
        raise ValueError("command must not be empty")
    specs = plan_runs(runs, vary, resume_at)
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
        root = _keep_root(Path(keep), len(specs))
    results: list[RunResult] = []
    if keep is None:
        root = Path(tempfile.mkdtemp(prefix="torchrepro-check-"))
    try:
        for index, spec in enumerate(specs):
            if progress is not None:
                progress(f"run {index + 1}/{len(specs)}: {spec.name}")
            result = _execute(
                command, spec, root / f"run{index + 1}", base_env, progress, timeout=timeout
            )
            results.append(result)
            if result.error is not None:
                return CheckReport(results, [], f'run "{spec.name}" {result.error}')
            if progress is not None and result.trace is not None:
                progress(
                    f"run {index + 1}/{len(specs)}: {spec.name}: done, {len(result.trace.records)} steps"
                )
        reference = results[0]
        if reference.trace is None:  # unreachable: a run without a trace returned above
            raise RuntimeError("reference run has no trace")
        comparisons = [
            compare_traces(reference.trace, r.trace, names=(reference.spec.name, r.spec.name))
            for r in results[1:]
            if r.trace is not None
        ]
        return CheckReport(results, comparisons)
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
