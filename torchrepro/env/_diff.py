"""Compare two environment fingerprints: which differences can change results, and why.

Pure functions over the dicts :func:`torchrepro.fingerprint` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Difference", "diff_fingerprints"]


@dataclass(frozen=True)
class Difference:
    """One field that differs between two fingerprints.

    Attributes:
        key: dotted path of the field, e.g. ``"torch.cudnn"``.
        a, b: the two values (``None`` when absent on one side).
        reason: one line saying what the difference can do to results.
        changes_results: whether it can change what training computes.
        rank: importance among those that change results (lower is more important).
    """

    key: str
    a: Any
    b: Any
    reason: str
    changes_results: bool
    rank: int

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.a)} vs {_show(self.b)}: {self.reason}"


# (key prefix, rank, reason); the first matching prefix wins. Rank orders the report.
_RULES: tuple[tuple[str, int, str], ...] = (
    ("git.commit", 0, "the code differs"),
    ("git.dirty", 1, "one checkout has uncommitted changes"),
    ("torch.version", 2, "PyTorch versions differ: kernels and default algorithms can differ"),
    ("torch.git_version", 2, "PyTorch builds differ: kernels can differ"),
    ("torch.cuda", 3, "CUDA versions differ: cuBLAS and kernel implementations can differ"),
    ("torch.cudnn", 3, "cuDNN versions differ: convolution algorithms can differ"),
    ("gpus", 4, "GPU models or counts differ: kernels, SM counts and reduction order differ"),
    (
        "determinism.inductor.deterministic",
        5,
        "Inductor's deterministic mode differs: without it compiled code may pick kernels "
        "(reduction configs, padding, templates) by timing, which changes results run to run",
    ),
    ("determinism", 5, "determinism settings differ: nondeterministic kernels may be allowed"),
    (
        "compile.model.compiled",
        1,
        "one model runs compiled (torch.compile), the other eagerly: compiled kernels fuse "
        "and reorder float operations, so results differ",
    ),
    ("compile.model.backend", 1, "torch.compile backends differ: the kernels run differ"),
    (
        "compile.model.options",
        2,
        "torch.compile mode or options differ: Inductor generates other kernels",
    ),
    (
        "compile.inductor.deterministic",
        5,
        "Inductor's deterministic mode differs: without it compiled code may pick kernels "
        "(reduction configs, padding, templates) by timing, which changes results run to run",
    ),
    (
        "compile.inductor.fallback_random",
        5,
        "Inductor's fallback_random differs: compiled random ops (dropout) draw from eager's "
        "generator in one run and Inductor's own in the other",
    ),
    (
        "compile.inductor.align_random_eager",
        5,
        "Inductor's align_random_eager differs: compiled random ops draw differently",
    ),
    (
        "compile.inductor.max_autotune",
        5,
        "Inductor autotuning differs: kernels are picked by timing, so compiled numerics "
        "can differ",
    ),
    (
        "compile.inductor.coordinate_descent_tuning",
        5,
        "Inductor autotuning differs: kernels are picked by timing, so compiled numerics "
        "can differ",
    ),
    (
        "compile.inductor.cpp.",
        8,
        "Inductor's CPU code generation (threads, SIMD width) differs: compiled reductions "
        "are split differently",
    ),
    ("compile.inductor.", 6, "an Inductor setting differs: compiled kernels can differ"),
    (
        "compile.cpp_compiler",
        7,
        "the C++ compilers Inductor builds CPU kernels with differ: generated code can "
        "compile to other float operations",
    ),
    (
        "compile.env.TORCHINDUCTOR_DISTORT_BENCHMARKING_RESULT",
        6,
        "autotune timings are distorted in one run (as PyTorch's CI does): outside "
        "Inductor's deterministic mode the picked kernels, and so results, can differ",
    ),
    (
        "compile.env.",
        6,
        "an Inductor/Triton/Dynamo environment variable differs: compiled code can differ",
    ),
    (
        "env.CUBLAS_WORKSPACE_CONFIG",
        5,
        "cuBLAS workspace config differs: needed for deterministic cuBLAS",
    ),
    (
        "env.PYTHONHASHSEED",
        6,
        "str hashing differs: set and dict iteration order of strings changes",
    ),
    ("env.TORCHREPRO_SEED", 6, "the seed differs"),
    ("torch.nccl", 7, "NCCL versions differ: all-reduce summation order can differ"),
    ("env.NCCL_", 7, "NCCL algorithm/protocol selection changes all-reduce summation order"),
    ("env.NVIDIA_TF32_OVERRIDE", 5, "TF32 override changes float32 matmul rounding"),
    ("env.TORCH_ALLOW_TF32", 5, "TF32 override changes float32 matmul rounding"),
    ("cpu.model", 8, "CPU models differ: SIMD width changes MKL/oneDNN float results"),
    ("threads", 8, "thread counts differ: CPU reductions can be split differently"),
    ("env.OMP_NUM_THREADS", 8, "thread counts differ: CPU reductions can be split differently"),
    ("env.MKL", 8, "MKL settings differ: its float results can differ"),
    ("env.ONEDNN", 8, "oneDNN math mode differs: float results can differ"),
    ("env.DNNL", 8, "oneDNN math mode differs: float results can differ"),
    ("env.OPENBLAS", 8, "BLAS threads differ: float results can differ"),
    ("torch.mkldnn", 8, "oneDNN availability differs: CPU kernels differ"),
    ("packages.torchvision", 9, "torchvision versions differ: transforms and models can differ"),
    ("packages.numpy", 9, "NumPy versions differ: numerics and random distributions can differ"),
    ("numpy", 9, "NumPy versions differ: numerics and random distributions can differ"),
    ("packages.", 10, "package versions differ: this library can change what is computed"),
    ("python.version", 10, "Python versions differ: library code paths can differ"),
    ("os.machine", 10, "CPU architectures differ: float results differ"),
)

_HARMLESS: tuple[tuple[str, str], ...] = (
    (
        "env.TORCHREPRO_NUM_WORKERS",
        "num_workers: torchrepro.DataLoader's results do not depend on it",
    ),
    ("env.CUDA_LAUNCH_BLOCKING", "changes timing and error reporting, not results"),
    (
        "env.CUDA_VISIBLE_DEVICES",
        "which devices are visible; the GPU models are compared separately",
    ),
    ("driver", "driver versions rarely change results; compared for completeness"),
    ("hostname", "a different machine name"),
    ("os.release", "kernel release"),
    ("cpu.logical_cores", "core count; the thread counts are compared separately"),
    ("fingerprint_version", "fingerprint format"),
    ("gpus.", "GPU memory"),
    (
        "compile.env.TORCHINDUCTOR_CACHE_DIR",
        "where Inductor caches compiled code; a cold or warm cache gives the same kernels",
    ),
    (
        "compile.env.TORCHINDUCTOR_FX_GRAPH_CACHE",
        "whether compiled graphs are cached; a cached graph is the one compiled before",
    ),
    (
        "compile.env.TORCHINDUCTOR_AUTOGRAD_CACHE",
        "whether compiled graphs are cached; a cached graph is the one compiled before",
    ),
    ("compile.env.TORCHINDUCTOR_FORCE_DISABLE_CACHES", "compile caches off: compiles afresh"),
)

# Settings that read None while Inductor is not loaded in the process (nothing compiled yet,
# e.g. a checkpoint loaded before the first compiled step): a difference with None there
# says when the fingerprint was taken, not how the runs compute.
_LOADED_ONLY = ("compile.inductor", "compile.cpp_compiler", "determinism.inductor.")


def _show(value: Any) -> str:
    return "(absent)" if value is None else str(value)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        flat = {}
        for index, item in enumerate(value):
            flat.update(_flatten(item, f"{prefix}[{index}]"))
        return flat
    return {prefix: value}


def _classify(key: str, a: Any = 0, b: Any = 0) -> tuple[bool, int, str]:
    if key.startswith(_LOADED_ONLY) and (a is None or b is None):
        return False, 99, "Inductor is not loaded in one process: nothing compiled there yet"
    if key.startswith("gpus[") and key.endswith("memory_gib"):
        return False, 99, "GPU memory size"
    for prefix, reason in _HARMLESS:
        if key.startswith(prefix):
            return False, 99, reason
    for prefix, rank, reason in _RULES:
        if key.startswith(prefix) or (prefix == "gpus" and key.startswith("gpus[")):
            return True, rank, reason
    return False, 99, "not known to change results"


def diff_fingerprints(a: dict[str, Any], b: dict[str, Any]) -> list[Difference]:
    """List the fields that differ between two fingerprints, most important first.

    Differences that can change results come first (ordered by importance: code,
    PyTorch/CUDA/cuDNN versions, GPU model, determinism settings, ...), then harmless ones.

    Args:
        a, b: dicts returned by :func:`torchrepro.fingerprint` (or loaded from its JSON).

    Returns:
        A list of :class:`Difference`; empty when the fingerprints agree.

    Raises:
        TypeError: an argument is not a dict.

    >>> base = {"torch": {"cudnn": "9.1.0"}, "hostname": "a"}
    >>> other = {"torch": {"cudnn": "9.3.0"}, "hostname": "b"}
    >>> [str(d) for d in diff_fingerprints(base, other)][0]
    'torch.cudnn: 9.1.0 vs 9.3.0: cuDNN versions differ: convolution algorithms can differ'
    """
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, dict):
            raise TypeError(f"{name} must be a fingerprint dict, got {type(value).__name__}")
    flat_a, flat_b = _flatten(a), _flatten(b)
    diffs = []
    for key in sorted(set(flat_a) | set(flat_b)):
        va, vb = flat_a.get(key), flat_b.get(key)
        if va == vb:
            continue
        changes, rank, reason = _classify(key, va, vb)
        diffs.append(Difference(key, va, vb, reason, changes, rank))
    return sorted(diffs, key=lambda d: (not d.changes_results, d.rank, d.key))
