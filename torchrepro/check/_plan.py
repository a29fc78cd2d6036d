"""Which runs a check makes: ``--runs``, ``--vary`` and ``--resume-at`` become :class:`RunSpec` s.

Nothing runs here; :mod:`._execute` runs what this plans.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..core import _envvars
from ..core._determinism import CUBLAS_VAR, CUBLAS_WORKSPACE_CONFIG
from ..core._seed import derive_seed

__all__ = [
    "DISTORT_VAR",
    "INDUCTOR_CACHE_VAR",
    "MAX_RUNS",
    "MIN_RUNS",
    "RunSpec",
    "plan_runs",
    "run_environment",
]

INDUCTOR_CACHE_VAR = "TORCHINDUCTOR_CACHE_DIR"
DISTORT_VAR = "TORCHINDUCTOR_DISTORT_BENCHMARKING_RESULT"

# The fewest and most runs --runs asks for: REPRODUCIBLE needs two runs of one identical
# configuration compared; each is a full training run, so more than 100 is a typo.
MIN_RUNS, MAX_RUNS = 2, 100

# --vary names with a meaning of their own; any other NAME sets the environment variable NAME.
VARY_ALIASES = {"num_workers": _envvars.NUM_WORKERS, "seed": _envvars.SEED}
# Variables the checker itself sets for each run: varying them would defeat the check.
RESERVED = {
    _envvars.STOP_AT: "--resume-at K",
    _envvars.TRACE: "the checker (each run gets its own trace)",
    _envvars.CHECKPOINT: "the checker (each run gets its own checkpoint)",
}


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
    ``cold_cache``: the run compiles (``torch.compile``) with an empty Inductor cache of its
    own (``TORCHINDUCTOR_CACHE_DIR`` in its run directory), so the check also shows that
    results do not depend on what an earlier run left in the cache. ``distort_autotune``: it
    also autotunes with distorted timings (``TORCHINDUCTOR_DISTORT_BENCHMARKING_RESULT=
    inverse``), as PyTorch's CI tests compiled determinism. Neither is in :attr:`env`: the
    run still counts as a repeat of run 1, since neither may change results.
    """

    name: str
    env: dict[str, str] = field(default_factory=dict)
    resume_at: int | None = None
    resume_env: dict[str, str] = field(default_factory=dict)
    must_differ: bool = False
    cold_cache: bool = False
    distort_autotune: bool = False


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
        seen: dict[str, str] = {}
        for value in choices:
            key = _normalised(var, value)
            if key in seen:
                raise ValueError(
                    f"--vary {item!r} gives one value twice ({seen[key]!r} and {value!r} are "
                    f"both {name}={key}): a run of the same value compares nothing new; give "
                    "distinct values"
                )
            seen[key] = value
        parsed.append((name, var, choices))
    return parsed


def _normalised(var: str, value: str) -> str:
    """The value a run would see: integers for the seed and num_workers (``01`` is 1)."""
    if var in (_envvars.SEED, _envvars.NUM_WORKERS):
        try:
            return str(int(value, 10))
        except ValueError:
            return value  # the run itself refuses it, naming the variable
    return value


def plan_runs(
    runs: int, vary: Sequence[str] = (), resume_at: int | None = None, *, gpu: bool = False
) -> list[RunSpec]:
    """The runs of a check.

    ``runs`` runs with the base environment (the first value of each ``--vary`` applied),
    one run per further value of each ``--vary``, and with ``resume_at`` one run stopped at
    that step and resumed in a second process (with the last value of the first ``--vary``
    for its second process, so resuming also changes, e.g., num_workers).

    A run that changes the seed (``--vary seed=...``) must differ from run 1. The second
    run gets a cold Inductor cache of its own (:attr:`RunSpec.cold_cache`); the others share
    the user's cache, warm after the first compiled run. With ``gpu`` (the checker sees a
    CUDA device), it also autotunes with distorted timings, unless ``--vary`` sets that
    variable. On CPU the distortion is left out: it acts only on GPU benchmarking, and a
    fingerprint difference that does nothing would only mislead an explanation.

    Raises:
        ValueError: ``runs`` < 2 (no two runs of one configuration to compare), a malformed
            ``--vary`` or one of a variable the checker sets, ``resume_at`` < 1.
    """
    if isinstance(runs, bool) or not isinstance(runs, int) or not MIN_RUNS <= runs <= MAX_RUNS:
        raise ValueError(
            f"--runs must be an integer in [{MIN_RUNS}, {MAX_RUNS}], got {runs!r}: only two runs "
            "of one identical configuration can show that it reproduces (--vary and --resume-at "
            "runs change something); use --runs 2 (the default)"
        )
    if resume_at is not None and (isinstance(resume_at, bool) or resume_at < 1):
        raise ValueError(f"--resume-at must be a step >= 1, got {resume_at!r}")
    parsed = _parse_vary(vary)
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
    if len(specs) > 1 and INDUCTOR_CACHE_VAR not in specs[1].env:
        distort = gpu and DISTORT_VAR not in specs[1].env
        specs[1] = dataclasses.replace(specs[1], cold_cache=True, distort_autotune=distort)
    return specs
