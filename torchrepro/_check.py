"""The check runner behind ``torchrepro check``: run a command several ways, compare traces.

Each run's trace says what the run really did (:mod:`torchrepro._tracefile` headers: the
seed, each torchrepro loader's effective ``num_workers``, the step a process resumed
from), and the check verifies it: a ``--vary`` value that did not take effect, a resume
that did not resume, or a trace with gaps is an error, never a pass.

No printing here: progress goes to a callback, results come back as a :class:`CheckReport`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _envvars
from ._checkpoint import read_checkpoint
from ._compare import Comparison, TraceData, compare_traces, read_trace
from ._determinism import CUBLAS_VAR, CUBLAS_WORKSPACE_CONFIG
from ._errors import CheckpointError, TraceError
from ._seed import derive_seed, seed_from_env

__all__ = ["CheckReport", "RunResult", "RunSpec", "plan_runs", "run_check", "run_environment"]

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
        text = f"REPRODUCIBLE: {runs} x {self.steps} steps bitwise identical"
        differing = [r.spec.name for r in self.runs if r.spec.must_differ]
        if differing:
            text += f"; {', '.join(differing)} differ{'s' if len(differing) == 1 else ''}, as another seed must"
        return text

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
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"--runs must be an integer >= 1, got {runs!r}")
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


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.startswith(b'{"step"'))  # not the headers
    except OSError:
        return 0


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
) -> int:
    with open(directory / "stdout.log", "ab") as out, open(directory / "stderr.log", "ab") as err:
        proc = subprocess.Popen(list(command), env=env, stdout=out, stderr=err)
        stop = threading.Event()

        def report() -> None:
            while not stop.wait(1.0):
                if progress is not None:
                    progress(f"{label}: {_count_lines(trace)} steps")

        watcher = threading.Thread(target=report, daemon=True)
        watcher.start()
        try:
            return proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            stop.set()
            watcher.join()


def _execute(
    command: Sequence[str],
    spec: RunSpec,
    directory: Path,
    base_env: dict[str, str],
    progress: Progress | None,
) -> RunResult:
    if directory.exists():
        shutil.rmtree(directory)  # never a stale trace or checkpoint
    directory.mkdir(parents=True)
    trace_path, ckpt_path = directory / "trace.jsonl", directory / "checkpoint.pt"
    env = {
        **base_env,
        **spec.env,
        _envvars.TRACE: str(trace_path),
        _envvars.CHECKPOINT: str(ckpt_path),
    }
    env.pop(_envvars.STOP_AT, None)

    def run(run_env: dict[str, str]) -> tuple[int, str]:
        code = _run_process(
            command, run_env, directory, label=spec.name, trace=trace_path, progress=progress
        )
        return code, _tail(directory / "stderr.log")

    def failed(code: int, tail: str, message: str) -> RunResult:
        return RunResult(spec, code, None, tail, directory, message)

    if spec.resume_at is not None:
        code, tail = run({**env, _envvars.STOP_AT: str(spec.resume_at)})
        if code != 0:
            return failed(code, tail, "the stopped run failed")
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
    code, tail = run(env)
    if code != 0:
        return failed(code, tail, f"exited with status {code}")
    if not trace_path.exists():
        return failed(
            code,
            tail,
            "recorded no trace: add `trace = torchrepro.Trace()` and call `trace.step(loss=loss, model=model)` "
            "once per training step (it writes to TORCHREPRO_TRACE)",
        )
    try:
        trace = read_trace(trace_path)
    except TraceError as exc:
        return failed(code, tail, f"unreadable trace: {exc}")
    if not trace.records:
        return failed(code, tail, "its trace has no steps: call trace.step() each step")
    problem = _missing_steps(trace)
    if problem is None and spec.resume_at is not None:
        problem = _resume_problem(spec.resume_at, trace)
    if problem is not None:
        return RunResult(spec, code, trace, tail, directory, problem)
    return RunResult(spec, code, trace, tail, directory)


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
        keep: keep traces and logs in this directory (else a temporary one is removed).
        seed: the seed for every run.
        progress: called with a short status line while runs proceed.

    Returns:
        A :class:`CheckReport`; it stops at the first failed run, and at the first run
        whose trace shows that it did not do what was asked (a ``--vary num_workers``
        value no torchrepro loader used, with a trace identical to run 1's; a resumed
        process that did not resume from ``resume_at`` or did not continue after it; a
        trace with missing steps). With ``resume_at`` at or past run 1's last step it
        stops after run 1.

    Raises:
        ValueError: bad ``runs``, ``vary`` or ``resume_at``; an empty command.
    """
    if not command:
        raise ValueError("command must not be empty")
    specs = plan_runs(runs, vary, resume_at)
    if seed is None:
        from_env = seed_from_env()
        seed = 0 if from_env is None else from_env
    base_env = run_environment(seed)
    root = Path(keep) if keep is not None else Path(tempfile.mkdtemp(prefix="torchrepro-check-"))
    root.mkdir(parents=True, exist_ok=True)
    results: list[RunResult] = []
    comparisons: list[Comparison] = []
    notes: list[str] = []
    try:
        for index, spec in enumerate(specs):
            if progress is not None:
                progress(f"run {index + 1}/{len(specs)}: {spec.name}")
            result = _execute(command, spec, root / f"run{index + 1}", base_env, progress)
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
        return CheckReport(results, comparisons, notes=notes)
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
