"""torch.compile awareness: the module under a compiled wrapper, how it was compiled, and
whether Inductor's deterministic mode is still on.

Never imports ``torch._dynamo`` or ``torch._inductor`` (importing Inductor costs seconds):
a model can only be compiled, and Inductor's settings only matter, once torch itself has
imported them, so this module reads them from ``sys.modules``.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from typing import Any

import torch

from .._errors import DeterminismError

__all__ = [
    "INDUCTOR_SETTINGS",
    "compile_info",
    "cpp_compiler",
    "inductor_env",
    "inductor_settings",
    "is_compiled",
    "unwrap",
    "verify_compiled",
]

ORIG_PREFIX = "_orig_mod."

# Inductor settings that change which kernels compiled code runs, and so its float results
# (those absent from a torch version are skipped). ``deterministic`` turns off the
# benchmarking whose winner changes numerics (torch >= 2.10; torch.use_deterministic_algorithms
# sets it); the autotuning flags pick kernels by timing; ``fallback_random`` and
# ``align_random_eager`` choose which generator random ops (dropout) draw from;
# ``cpp.threads``/``cpp.simdlen``/``cpp.dynamic_threads`` shape the generated CPU loops.
INDUCTOR_SETTINGS = (
    "deterministic",
    "batch_invariant",
    "numerics",
    "fallback_random",
    "align_random_eager",
    "max_autotune",
    "max_autotune_pointwise",
    "max_autotune_gemm",
    "max_autotune_gemm_backends",
    "coordinate_descent_tuning",
    "search_autotune_cache",
    "benchmark_kernel",
    "split_reductions",
    "freezing",
    "emulate_precision_casts",
    "cpp.threads",
    "cpp.simdlen",
    "cpp.dynamic_threads",
    "triton.cudagraphs",
)

_ENV_PREFIXES = ("TORCHINDUCTOR_", "TRITON_", "TORCH_COMPILE_", "TORCHDYNAMO_")


def _inductor_config() -> Any:
    return sys.modules.get("torch._inductor.config")


def _optimized_module_type() -> type | None:
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(eval_frame, "OptimizedModule", None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) wraps; others unchanged.

    The wrapper's parameter and state-dict names carry an ``_orig_mod.`` prefix; the
    original module's do not, so checkpoints and traces use it.
    """
    kind = _optimized_module_type()
    while kind is not None and isinstance(model, kind):
        inner = model._orig_mod
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    return model


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether ``model`` runs compiled: a ``torch.compile`` wrapper, or ``model.compile()``."""
    if unwrap(model) is not model:
        return True
    return getattr(model, "_compiled_call_impl", None) is not None


def _backend(model: torch.nn.Module) -> Any:
    """The object torch.compile built from ``backend=``/``mode=``/``options=``, if found."""
    callback = getattr(getattr(model, "dynamo_ctx", None), "callback", None)
    for _ in range(8):  # CatchErrorsWrapper -> ConvertFrame -> WrapBackendDebug -> the wrapper
        if callback is None or hasattr(callback, "compiler_name"):
            return callback
        callback = getattr(callback, "_torchdynamo_orig_backend", None) or getattr(
            callback, "_torchdynamo_orig_callable", None
        )
    return None


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def compile_info(model: torch.nn.Module) -> dict[str, Any]:
    """How ``model`` is compiled: ``{"compiled": False}``, or its backend and options.

    ``backend`` is the backend's name (``"inductor"``, ``"eager"``, ...) and ``options`` the
    Inductor settings that ``mode=`` and ``options=`` patch for this model (``mode`` is
    recorded as the settings it stands for: ``"max-autotune"`` is ``max_autotune`` and
    more). Both are ``None`` where torch does not expose them (``model.compile()``).
    """
    if not is_compiled(model):
        return {"compiled": False}
    backend = _backend(model)
    options = getattr(backend, "config", None)  # Inductor's wrapper: the patched settings
    if options is None:
        options = getattr(backend, "kwargs", None)  # another backend: its mode and options
    return {
        "compiled": True,
        "backend": getattr(backend, "compiler_name", None),
        "options": _jsonable(dict(options)) if isinstance(options, dict) else None,
    }


def _setting(config: Any, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return _jsonable(value)


def inductor_settings() -> dict[str, Any] | None:
    """The :data:`INDUCTOR_SETTINGS` this torch has, or None where Inductor is not loaded."""
    config = _inductor_config()
    if config is None:
        return None
    return {name: _setting(config, name) for name in INDUCTOR_SETTINGS}


def inductor_env() -> dict[str, str]:
    """Every ``TORCHINDUCTOR_*``, ``TRITON_*``, ``TORCH_COMPILE_*`` and ``TORCHDYNAMO_*`` variable."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES)}


@functools.lru_cache(maxsize=4)
def _compiler_version(command: str) -> str | None:
    try:
        done = subprocess.run(
            [command, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0] if done.returncode == 0 and lines else None


def cpp_compiler() -> dict[str, Any] | None:
    """The C++ compiler Inductor builds CPU kernels with: its command and ``--version`` line.

    None where Inductor is not loaded. The compiler is ``torch._inductor.config.cpp.cxx``'s
    choice (``CXX``, else ``g++``) as Inductor resolves it, when torch exposes that.
    """
    config = _inductor_config()
    if config is None:
        return None
    builder = sys.modules.get("torch._inductor.cpp_builder")
    command: str | None = None
    try:
        if builder is not None and hasattr(builder, "get_cpp_compiler"):
            command = str(builder.get_cpp_compiler())
    except Exception:  # no compiler found: recorded as None
        command = None
    if command is None:
        cxx = getattr(getattr(config, "cpp", None), "cxx", (None, "g++"))
        named = os.environ.get("CXX") or next((c for c in cxx if c), "g++")
        command = named if shutil.which(named) else None  # the name, as Inductor gives it
    if command is None:
        return {"command": None, "version": None}
    return {"command": command, "version": _compiler_version(command)}


def verify_compiled(model: torch.nn.Module, requested: str | None) -> None:
    """Raise if a compiled ``model`` runs without the determinism :func:`deterministic` set.

    Called after the model's first compiled call (from :meth:`torchrepro.Trace.step`),
    because torch.compile's first call is where settings made only through Inductor's
    config have been seen reset: Dynamo restores ``use_deterministic_algorithms`` after
    tracing, and on torch >= 2.10 that also sets ``torch._inductor.config.deterministic``.

    Args:
        model: the model a step trained (compiled or not; not compiled returns at once).
        requested: the mode :func:`torchrepro.deterministic` last applied (``"strict"`` or
            ``"warn"``), or None when it was not called or was undone: nothing to verify.

    Raises:
        DeterminismError: deterministic algorithms are off, Inductor's deterministic mode
            is off, or the model's ``torch.compile(options=...)`` turns it off.
    """
    if requested is None or not is_compiled(model):
        return
    fix = (
        f"call torchrepro.deterministic({requested!r}) after anything that changes these "
        "settings, and do not pass options={'deterministic': False} to torch.compile"
    )
    if not torch.are_deterministic_algorithms_enabled():
        raise DeterminismError(
            f"torchrepro.deterministic({requested!r}) was called, but at the first compiled "
            "step torch.are_deterministic_algorithms_enabled() is False: something called "
            "torch.use_deterministic_algorithms(False), so compiled and eager kernels may be "
            f"nondeterministic. Fix: {fix}"
        )
    config = _inductor_config()
    if getattr(config, "deterministic", True) is False:
        raise DeterminismError(
            f"torchrepro.deterministic({requested!r}) was called, but at the first compiled "
            "step torch._inductor.config.deterministic is False: Inductor may pick kernels by "
            f"timing, which changes results from run to run. Fix: {fix}"
        )
    options = compile_info(model).get("options") or {}
    if options.get("deterministic") is False:
        raise DeterminismError(
            "the model was compiled with torch.compile(options={'deterministic': False}), "
            f"which turns off Inductor's deterministic mode that torchrepro.deterministic("
            f"{requested!r}) needs. Fix: drop that option"
        )
