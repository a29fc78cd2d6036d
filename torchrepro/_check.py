"""The check runner behind ``torchrepro check``: run a command several ways, compare traces.

Each run's trace says what the run really did (:mod:`torchrepro._tracefile` headers: the
seed, each torchrepro loader's effective ``num_workers``, the step a process resumed
from), and the check verifies it: a ``--vary`` value that did not take effect, a resume
that did not resume, or a trace with gaps is an error, never a pass.

No printing here: progress goes to a callback, results come back as a :class:`CheckReport`.
"""

from __future__ import annotations

import dataclasses
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
from ._explain import Explanation, explain
from ._localize import CAPTURE_SUFFIX, Localization, compare_captures, read_capture
from ._process import gloo_teardown_abort, run_in_group, tail
from ._seed import derive_seed, seed_from_env

__all__ = ["CheckReport", "RunResult", "RunSpec", "plan_runs", "run_check", "run_environment"]

# The most runs --runs asks for (each is a full training run; more is a typo).
MAX_RUNS = 100

# --vary names with a meaning of their own; any other NAME sets the environment variable NAME.
VARY_ALIASES = {"num_workers": _envvars.NUM_WORKERS, "seed": _envvars.SEED}
# Variables the checker itself sets for each run: varying them would defeat the check.
RESERVED = {
    _envvars.STOP_AT: "--resume-at K",
    _envvars.TRACE: "the checker (each run gets its own trace)",
    _envvars.CHECKPOINT: "the checker (each run gets its own checkpoint)",
}
CAUSES = (
    "Runs with identical settings differ, so nothing else can be judged. Usual causes: the "
    "model or the data were built before torchrepro.seed_everything() (call it first, at the "
    "top of the script); a nondeterministic kernel (call torchrepro.deterministic('strict'), "
    "and run torchrepro.audit(model, batch) to name the operation); something unseeded "
    "(time, os.urandom, a random generator created without a seed)."
)

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
    """One way to run the command: a name, extra environment, and an optional stop step.

    ``must_differ``: the run changes the seed, so its trace must differ from run 1's.
    """

    name: str
    env: dict[str, str] = field(default_factory=dict)
    resume_at: int | None = None
    resume_env: dict[str, str] = field(default_factory=dict)
    must_differ: bool = False


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
    notes: list[str] = field(default_factory=list)
    # Why runs part (issue 14): batch and fingerprint per comparison, and the module.
    explanations: list[Explanation] = field(default_factory=list)
    localization: Localization | None = None
    localization_note: str = ""
    # How the exact first divergent step was found, when the traces only bounded it.
    pinpoint_note: str = ""

    def _pairs(self) -> list[tuple[RunResult, Comparison]]:
        return list(zip(self.runs[1:], self.comparisons, strict=False))

    @property
    def unexpected(self) -> list[Comparison]:
        """Comparisons that diverged although they must not (every run but a seed change)."""
        return [c for r, c in self._pairs() if not c.identical and not r.spec.must_differ]

    @property
    def seed_without_effect(self) -> list[str]:
        """Names of runs with another seed whose trace is identical to run 1's."""
        return [r.spec.name for r, c in self._pairs() if c.identical and r.spec.must_differ]

    @property
    def same_settings_differ(self) -> Comparison | None:
        """The first comparison of a run with run 1's settings that diverged, if any."""
        for r, c in self._pairs():
            if not c.identical and r.spec.env == self.runs[0].spec.env and r.spec.resume_at is None:
                return c
        return None

    @property
    def reproducible(self) -> bool:
        return self.error is None and not self.unexpected and not self.seed_without_effect

    @property
    def steps(self) -> int:
        return len(self.runs[0].trace.records) if self.runs and self.runs[0].trace else 0

    def verdict(self) -> str:
        """``REPRODUCIBLE: 4 runs x 87 steps bitwise identical`` or the first divergence."""
        if self.error is not None:
            return f"ERROR: {self.error}"
        same = self.same_settings_differ
        if same is not None:
            return f"{same.verdict} with identical settings"
        diverged = self.unexpected
        if diverged:
            first = min(diverged, key=lambda c: c.first_step if c.first_step is not None else 0)
            return first.verdict
        if self.seed_without_effect:
            names = ", ".join(f'"{n}"' for n in self.seed_without_effect)
            return (
                f"SEED HAS NO EFFECT: run {names} used another seed and is bitwise identical to "
                'run "run 1"; the seed has no effect (does the script call '
                "torchrepro.seed_everything() without an argument, before building anything?)"
            )
        compared = [r for r in self.runs if not r.spec.must_differ]
        runs = f"{len(compared)} run{'s' if len(compared) != 1 else ''}"
        text = f"REPRODUCIBLE: {runs} x {self.steps} steps bitwise identical{self._coverage()}"
        differing = [r.spec.name for r in self.runs if r.spec.must_differ]
        if differing:
            text += f"; {', '.join(differing)} differ{'s' if len(differing) == 1 else ''}, as another seed must"
        return text

    def _coverage(self) -> str:
        """What the identical traces held, when not the whole state at every step."""
        compared = [c for r, c in self._pairs() if not r.spec.must_differ]
        reference = self.runs[0].trace if self.runs else None
        if not compared or reference is None:
            return ""
        state = min(c.state_steps for c in compared)
        if state == self.steps:
            return ""
        first = reference.records[0]["entries"] if reference.records else []
        kinds = {e.get("kind") for e in first}
        what = " and ".join(
            k for k, present in (("loss", "loss" in kinds), ("batch", "batch" in kinds)) if present
        )
        end = all(c.end_compared for c in compared)
        return (
            f" (every step's {what or 'record'}; the model's state at {state} of them"
            + (" and after the last" if end else "; not after the last: a run did not record it")
            + ")"
        )

    def explanation(self) -> list[str]:
        """Lines that say why, after the verdict (the usual causes of a divergence)."""
        return [CAUSES] if self.error is None and self.same_settings_differ is not None else []

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
            "seed_without_effect": self.seed_without_effect,
            "notes": list(self.notes),
        }


def _parse_vary(vary: Sequence[str]) -> list[tuple[str, str, list[str]]]:
    parsed = []
    for item in vary:
        name, sep, values = item.partition("=")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not name.strip() or not choices:
            raise ValueError(f"--vary must look like NAME=V1,V2,..., got {item!r}")
        name = name.strip()
        var = VARY_ALIASES.get(name, name)
        if var in RESERVED:
            raise ValueError(
                f"--vary {name}=...: {var} is set by {RESERVED[var]}, not by --vary; "
                "remove it (use --resume-at K to stop and resume a run)"
            )
        parsed.append((name, var, choices))
    return parsed


def plan_runs(runs: int, vary: Sequence[str] = (), resume_at: int | None = None) -> list[RunSpec]:
    """The runs of a check.

    ``runs`` runs with the base environment (the first value of each ``--vary`` applied),
    one run per further value of each ``--vary``, and with ``resume_at`` one run stopped at
    that step and resumed in a second process (with the last value of the first ``--vary``
    for its second process, so resuming also changes, e.g., num_workers).

    A run that changes the seed (``--vary seed=...``) must differ from run 1.

    Raises:
        ValueError: ``runs`` < 1, a malformed ``--vary`` or one of a variable the checker
            sets, ``resume_at`` < 1, or a plan that compares nothing (``runs=1`` alone).
    """
    if isinstance(runs, bool) or not isinstance(runs, int) or not 1 <= runs <= MAX_RUNS:
        raise ValueError(f"--runs must be an integer in [1, {MAX_RUNS}], got {runs!r}")
    if resume_at is not None and (isinstance(resume_at, bool) or resume_at < 1):
        raise ValueError(f"--resume-at must be a step >= 1, got {resume_at!r}")
    parsed = _parse_vary(vary)
    if runs == 1 and resume_at is None and not any(len(v) > 1 for _, _, v in parsed):
        raise ValueError(
            "--runs 1 alone compares nothing: a check needs a second run to compare with. "
            "Use --runs 2 (the default), or add --vary NAME=A,B or --resume-at K"
        )
    base = {var: values[0] for _name, var, values in parsed}
    specs = [RunSpec(f"run {i + 1}", dict(base)) for i in range(runs)]
    for name, var, values in parsed:
        for value in values[1:]:
            must_differ = var == _envvars.SEED and value != values[0]
            specs.append(RunSpec(f"{name}={value}", {**base, var: value}, must_differ=must_differ))
    if resume_at is not None:
        resume_env = dict(base)
        label = f"resume at {resume_at}"
        changing = [p for p in parsed if len(p[2]) > 1 and p[1] != _envvars.SEED]
        if changing:
            name, var, values = changing[0]
            resume_env[var] = values[-1]
            label += f" ({name}={values[0]} -> {values[-1]})"
        specs.append(RunSpec(label, dict(base), resume_at=resume_at, resume_env=resume_env))
    return specs


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
    return finished.returncode, gloo_teardown_abort(finished.returncode, directory / "stderr.log")


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
    problem = _missing_steps(trace)
    if problem is None and spec.resume_at is not None:
        problem = _resume_problem(spec.resume_at, trace)
    if problem is not None:
        return RunResult(spec, code, trace, last, directory, problem)
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


def _loader_effect(spec: RunSpec, trace: TraceData, reference: RunSpec) -> str | None:
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
    """Whether the second process resumed from ``resume_at`` and continued after it."""
    segments = trace.segments()
    header, records = segments[-1]
    resumed = header.get("facts", {}).get("resumed_from")
    if resumed != resume_at:
        found = "did not resume" if resumed is None else f"resumed from step {resumed}"
        return (
            f"--resume-at {resume_at}: the resumed process {found}, not from step {resume_at}; "
            "call Checkpointer.resume() (or load_checkpoint) before the training loop, and pass "
            "the Trace to the Checkpointer (trace=trace) so the trace continues"
        )
    every = header.get("every", 1)
    every = every if isinstance(every, int) and every >= 1 else 1
    expected = (resume_at // every + 1) * every
    first = records[0]["step"] if records else None
    if first != expected:
        got = "traced no step" if first is None else f"continued with step {first}"
        return (
            f"--resume-at {resume_at}: the resumed process {got}, not step {expected}; pass the "
            "Trace to the Checkpointer (trace=trace) so its step count is restored, and count "
            "steps from Checkpointer.steps"
        )
    return None


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
            divergent step with per-module checksums (see :func:`_localize_divergence`).
            None: only when the batch was identical and the re-run is at most one
            checkpoint interval; True: always; False: never.
        timeout: seconds each process of a run may take; then it is stopped (SIGTERM,
            SIGKILL 5 s later) and the check fails naming the run.

    Each run's process starts in a session of its own: whatever it leaves running is
    killed when it exits, and an exception here (``KeyboardInterrupt``, or SIGTERM turned
    into one by :func:`torchrepro._process.raise_on_signals`) stops the whole group first.

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
    comparisons: list[Comparison] = []
    notes: list[str] = []
    try:
        for index, spec in enumerate(specs):
            if progress is not None:
                progress(f"run {index + 1}/{len(specs)}: {spec.name}")
            env = {**base_env, _envvars.KEEP_CHECKPOINTS: "1"} if index == 0 else base_env
            result = _execute(
                command, spec, root / f"run{index + 1}", env, progress, timeout=timeout
            )
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
            effect = _loader_effect(spec, trace, reference.spec)
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
        captured = None
        if localize is not False and report.unexpected:
            captured = _pinpoint_divergence(
                report, command, base_env, root, progress=progress, timeout=timeout
            )
        report.explanations = [
            explain(reference.trace, r.trace, c)
            for r, c in zip(results[1:], comparisons, strict=True)
            if r.trace is not None
        ]
        if localize is not False and report.unexpected:
            _localize_divergence(
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


def _first_divergence(report: CheckReport) -> tuple[int, RunResult, Comparison] | None:
    """The divergence the verdict names: ``(index in comparisons, run, comparison)``."""
    pairs = [
        (i, r, c)
        for i, (r, c) in enumerate(zip(report.runs[1:], report.comparisons, strict=False))
        if c in report.unexpected and c.first_step is not None
    ]
    if not pairs:
        return None
    same = report.same_settings_differ
    for pair in pairs:
        if pair[2] is same:
            return pair
    return min(pairs, key=lambda p: p[2].first_step or 0)


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
    trace (cut back to the checkpoint's step on resume). Returns the trace path and the
    problem, if the run failed.
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
    code, problem = _run_process(
        command, run_env, directory, label=label, trace=trace, progress=progress, timeout=timeout
    )
    if problem is None and code != 0:
        problem = f"{_exit_reason(code)}: {tail(directory / 'stderr.log', lines=5)}"
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


def _pinpoint_divergence(
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
    kept = _kept_checkpoints(reference.directory)
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


def _kept_checkpoints(directory: Path) -> dict[int, Path]:
    """The checkpoints a run kept with TORCHREPRO_KEEP_CHECKPOINTS, by step."""
    kept = {}
    for path in directory.glob("checkpoint.pt.step*"):
        suffix = path.name.rsplit(".step", 1)[1]
        if suffix.isdigit():
            kept[int(suffix)] = path
    return kept


def _localize_divergence(
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
    pinpoint re-runs started after and their capture files (:func:`_pinpoint_divergence`),
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
    kept = _kept_checkpoints(reference.directory)
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
