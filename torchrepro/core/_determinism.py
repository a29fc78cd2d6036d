"""The determinism switch: :func:`deterministic` and the settings it changed."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch

from .._errors import DeterminismError, TorchreproWarning

__all__ = ["CUBLAS_WORKSPACE_CONFIG", "DeterminismSettings", "deterministic"]

MODES = ("strict", "warn", "off")
CUBLAS_VAR = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_WORKSPACE_CONFIG = ":4096:8"

_Setting = tuple[Callable[[], Any], Callable[[Any], None]]


def _set_env(value: str | None) -> None:
    if value is None:
        os.environ.pop(CUBLAS_VAR, None)
    else:
        os.environ[CUBLAS_VAR] = value


def _cuda_memory_used() -> bool:
    """Whether this process has allocated CUDA memory, so cuBLAS may already have run.

    cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when torch creates its first cuBLAS handle
    and workspace (``getChosenWorkspaceSize`` parses it once and caches it), which is at
    the first GPU matmul, not at CUDA initialisation. A matmul needs tensors on the GPU,
    so a process that has never allocated CUDA memory has created no workspace yet; one
    that has may have. Never initialises CUDA itself.
    """
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return False
    for device in range(torch.cuda.device_count()):
        stats = torch.cuda.memory_stats(device)
        if stats.get("allocation.all.allocated", 0) or stats.get("allocated_bytes.all.peak", 0):
            return True
    return False


def _has_fill() -> bool:
    return hasattr(getattr(torch.utils, "deterministic", None), "fill_uninitialized_memory")


def _set_fill(value: bool) -> None:
    torch.utils.deterministic.fill_uninitialized_memory = value  # type: ignore[attr-defined]


def _set_algorithms(value: tuple[bool, bool]) -> None:
    torch.use_deterministic_algorithms(value[0], warn_only=value[1])


def _set_cudnn_deterministic(value: bool) -> None:
    torch.backends.cudnn.deterministic = value


def _set_cudnn_benchmark(value: bool) -> None:
    torch.backends.cudnn.benchmark = value


def _has_mkldnn_flag() -> bool:
    return hasattr(torch.backends.mkldnn, "deterministic")


def _set_mkldnn_deterministic(value: bool) -> None:
    torch.backends.mkldnn.deterministic = value  # type: ignore[attr-defined,assignment]


def _set_matmul_tf32(value: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = value


def _set_cudnn_tf32(value: bool) -> None:
    torch.backends.cudnn.allow_tf32 = value


def _inductor_config() -> Any:
    # read, never imported here: importing Inductor costs seconds; torch >= 2.10 imports it
    # in torch.use_deterministic_algorithms, before this setting is read or set
    return sys.modules.get("torch._inductor.config")


def _get_inductor_deterministic() -> bool | None:
    return getattr(_inductor_config(), "deterministic", None)


def _set_inductor_deterministic(value: bool | None) -> None:
    config = _inductor_config()
    if value is not None and config is not None and hasattr(config, "deterministic"):
        config.deterministic = value


_SETTINGS: dict[str, _Setting] = {
    "deterministic_algorithms": (
        lambda: (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ),
        _set_algorithms,
    ),
    "inductor.deterministic": (_get_inductor_deterministic, _set_inductor_deterministic),
    "cudnn.deterministic": (lambda: torch.backends.cudnn.deterministic, _set_cudnn_deterministic),
    "cudnn.benchmark": (lambda: torch.backends.cudnn.benchmark, _set_cudnn_benchmark),
    "mkldnn.deterministic": (
        lambda: torch.backends.mkldnn.deterministic if _has_mkldnn_flag() else None,  # type: ignore[attr-defined]
        _set_mkldnn_deterministic,
    ),
    "env." + CUBLAS_VAR: (lambda: os.environ.get(CUBLAS_VAR), _set_env),
    "fill_uninitialized_memory": (
        lambda: torch.utils.deterministic.fill_uninitialized_memory if _has_fill() else None,  # type: ignore[attr-defined]
        _set_fill,
    ),
    "cuda.matmul.allow_tf32": (lambda: torch.backends.cuda.matmul.allow_tf32, _set_matmul_tf32),
    "cudnn.allow_tf32": (lambda: torch.backends.cudnn.allow_tf32, _set_cudnn_tf32),
    "float32_matmul_precision": (
        torch.get_float32_matmul_precision,
        torch.set_float32_matmul_precision,
    ),
}


# The mode deterministic() last applied and that is still in force ("strict"/"warn"), or
# None: what verify_compiled checks compiled steps against.
_requested: str | None = None


def requested_mode() -> str | None:
    """The mode :func:`deterministic` last applied, unless undone or ``"off"``; else None."""
    return _requested


@dataclass
class DeterminismSettings:
    """What :func:`deterministic` changed, and the means to undo it.

    Attributes:
        mode: the mode that was applied.
        changed: ``{setting: (before, after)}`` for every setting whose value changed.

    Use it as a context manager to restore every previous value on exit, also when the
    block raises; or call :meth:`restore`.
    """

    mode: str
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    _restored: bool = field(default=False, repr=False)
    _requested_before: str | None = field(default=None, repr=False)

    def restore(self) -> None:
        """Put back every setting this call changed (idempotent)."""
        global _requested
        if self._restored:
            return
        for name, (before, _after) in reversed(list(self.changed.items())):
            _SETTINGS[name][1](before)
        _requested = self._requested_before
        self._restored = True

    def __enter__(self) -> DeterminismSettings:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()

    def __str__(self) -> str:
        if not self.changed:
            return f"deterministic({self.mode!r}): nothing changed"
        lines = [f"deterministic({self.mode!r}) changed:"]
        lines += [
            f"  {name}: {before!r} -> {after!r}" for name, (before, after) in self.changed.items()
        ]
        return "\n".join(lines)


def deterministic(
    mode: str = "strict", *, fill_uninitialized_memory: bool = True, tf32: bool | None = None
) -> DeterminismSettings:
    """Switch PyTorch to deterministic algorithms, or back.

    Modes:
        ``"strict"``: ``torch.use_deterministic_algorithms(True)`` (an op without a
        deterministic implementation raises), ``cudnn.deterministic = True``,
        ``cudnn.benchmark = False``, ``mkldnn.deterministic = True`` (torch versions that
        have it), and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` when unset.
        ``"warn"``: the same, but such ops warn instead of raising (``warn_only=True``).
        ``"off"``: PyTorch's defaults (deterministic algorithms off, cuDNN
        ``deterministic=False``, ``benchmark=False``); ``CUBLAS_WORKSPACE_CONFIG`` is left.

    Compiled code (``torch.compile``): ``use_deterministic_algorithms`` also makes Inductor
    fall back to eager's deterministic kernels for scatter and indexing (torch >= 2.1) and,
    on torch >= 2.10, turns on Inductor's deterministic mode
    (``torch._inductor.config.deterministic``: no benchmarking whose winner changes
    numerics, e.g. reduction configs, padding, template autotuning). Inductor's mode is set
    through ``use_deterministic_algorithms`` because Dynamo restores that flag after each
    compilation, which resets a value set only through Inductor's config or
    ``TORCHINDUCTOR_DETERMINISTIC=1``; where Inductor is already imported and its mode
    still differs, it is set directly too. :meth:`torchrepro.Trace.step` verifies at the
    first compiled step that both are still on, and raises :class:`DeterminismError` if not.

    Side effects: the torch flags above; ``torch._inductor.config.deterministic`` (torch
    >= 2.10, via ``use_deterministic_algorithms``); ``os.environ["CUBLAS_WORKSPACE_CONFIG"]``;
    ``torch.utils.deterministic.fill_uninitialized_memory``; with ``tf32`` set, the TF32
    flags for matmul and cuDNN and ``torch.set_float32_matmul_precision``; and the mode
    this module remembers for that verification (undone by :meth:`DeterminismSettings.restore`).

    Args:
        mode: ``"strict"``, ``"warn"`` or ``"off"``.
        fill_uninitialized_memory: fill ``torch.empty`` memory with NaN/max values while
            deterministic algorithms are on, so reads of uninitialised memory are repeatable.
        tf32: ``False`` turns TF32 off for matmul and cuDNN and sets float32 matmul
            precision to ``"highest"``; ``True`` allows TF32 (precision ``"high"``);
            ``None`` leaves them as they are.

    Returns:
        A :class:`DeterminismSettings` listing what changed; as a context manager it
        restores everything on exit.

    Raises:
        ValueError: ``mode`` is not one of the valid modes.
        TypeError: a flag is not a bool.
        DeterminismError: (``"strict"``) ``CUBLAS_WORKSPACE_CONFIG`` is unset and this
            process has already allocated CUDA memory, so cuBLAS may already have read the
            variable (it does when its first workspace is created, at the first GPU matmul,
            not at CUDA initialisation). CUDA initialised without allocations (e.g. by
            querying device properties) is fine.

    >>> import torch
    >>> with deterministic("strict") as settings:
    ...     torch.are_deterministic_algorithms_enabled()
    True
    >>> torch.are_deterministic_algorithms_enabled()
    False
    """
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}")
    if not isinstance(fill_uninitialized_memory, bool):
        raise TypeError(
            f"fill_uninitialized_memory must be a bool, got {fill_uninitialized_memory!r}"
        )
    if tf32 is not None and not isinstance(tf32, bool):
        raise TypeError(f"tf32 must be True, False or None, got {tf32!r}")

    wanted: dict[str, Any] = {}
    if mode == "off":
        wanted["deterministic_algorithms"] = (False, False)
        wanted["inductor.deterministic"] = False
        wanted["cudnn.deterministic"] = False
        wanted["cudnn.benchmark"] = False
        if _has_mkldnn_flag():
            wanted["mkldnn.deterministic"] = False
    else:
        wanted["deterministic_algorithms"] = (True, mode == "warn")
        wanted["inductor.deterministic"] = True
        wanted["cudnn.deterministic"] = True
        wanted["cudnn.benchmark"] = False
        if _has_mkldnn_flag():
            wanted["mkldnn.deterministic"] = True
        if os.environ.get(CUBLAS_VAR) is None:
            if _cuda_memory_used():
                message = (
                    f"this process has already allocated CUDA memory, so cuBLAS may already have "
                    f"created its workspace, which reads {CUBLAS_VAR} once: setting it now may not "
                    "make cuBLAS deterministic. Call torchrepro.deterministic() before any tensor "
                    "is put on a GPU, or launch with `torchrepro run -- python ...`, which sets it "
                    "before Python starts."
                )
                if mode == "strict":
                    raise DeterminismError(message)
                warnings.warn(message, TorchreproWarning, stacklevel=2)
            wanted["env." + CUBLAS_VAR] = CUBLAS_WORKSPACE_CONFIG
    if _has_fill():
        wanted["fill_uninitialized_memory"] = fill_uninitialized_memory
    if tf32 is not None:
        wanted["cuda.matmul.allow_tf32"] = tf32
        wanted["cudnn.allow_tf32"] = tf32
        wanted["float32_matmul_precision"] = "high" if tf32 else "highest"

    global _requested
    settings = DeterminismSettings(mode, _requested_before=_requested)
    try:
        for name, value in wanted.items():
            getter, setter = _SETTINGS[name]
            before = getter()
            if name == "inductor.deterministic" and before is None:
                continue  # Inductor not loaded (nothing compiled yet), or a torch without it
            if before != value:
                setter(value)
                settings.changed[name] = (before, value)
    except BaseException:
        settings.restore()
        raise
    _requested = None if mode == "off" else mode
    return settings


def current_settings() -> dict[str, Any]:
    """The present value of every setting :func:`deterministic` manages (for fingerprints)."""
    return {name: getter() for name, (getter, _setter) in _SETTINGS.items()}
