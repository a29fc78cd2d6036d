"""The environment fingerprint: everything about this machine that can change results.

This module reads the system (``/proc/cpuinfo``, package metadata, ``git``); the pure
comparison of two fingerprints lives in ``_envdiff``.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from typing import Any

import torch

from ..core._compiled import compile_info, cpp_compiler, inductor_env, inductor_settings
from ..core._determinism import current_settings

__all__ = ["NUMERIC_ENV_VARS", "fingerprint"]

FINGERPRINT_VERSION = 1

# Environment variables that change numerics, kernel choice or data order.
NUMERIC_ENV_VARS = (
    "PYTHONHASHSEED",
    "CUBLAS_WORKSPACE_CONFIG",
    "CUDA_LAUNCH_BLOCKING",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_TF32_OVERRIDE",
    "TORCH_CUDNN_V8_API_DISABLED",
    "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",
    "NCCL_ALGO",
    "NCCL_PROTO",
    "NCCL_NTHREADS",
    "NCCL_MIN_NCHANNELS",
    "NCCL_MAX_NCHANNELS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_CBWR",
    "ONEDNN_DEFAULT_FPMATH_MODE",
    "DNNL_DEFAULT_FPMATH_MODE",
    "TORCHREPRO_SEED",
    "TORCHREPRO_NUM_WORKERS",
)

# Distributions whose version can change what a training script computes.
ML_PACKAGES = (
    "torch",
    "torchvision",
    "torchaudio",
    "torchtext",
    "torchdata",
    "triton",
    "numpy",
    "scipy",
    "scikit-learn",
    "pillow",
    "lightning",
    "pytorch-lightning",
    "transformers",
    "accelerate",
    "timm",
    "deepspeed",
    "xformers",
    "flash-attn",
    "apex",
    "mmengine",
    "mosaicml",
    "pytorch-ignite",
    "nvidia-cudnn-cu12",
    "nvidia-cublas-cu12",
    "nvidia-nccl-cu12",
    "nvidia-cudnn-cu13",
    "nvidia-cublas-cu13",
    "nvidia-nccl-cu13",
)


@functools.lru_cache(maxsize=1)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)  # installed versions do not change within a process
def _packages() -> dict[str, str]:
    found = {}
    for name in ML_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


@functools.lru_cache(maxsize=8)  # read once per directory and process: saves call git once
def _git(cwd: str) -> dict[str, Any] | None:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def _gpus() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(
            {
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "sm_count": props.multi_processor_count,
                "memory_gib": round(props.total_memory / 2**30, 1),
            }
        )
    return gpus


def _driver() -> str | None:
    getter = getattr(torch._C, "_cuda_getDriverVersion", None)
    if getter is None or not torch.cuda.is_available():
        return None
    version = int(getter())
    return f"{version // 1000}.{version % 1000 // 10}"


def _cudnn() -> str | None:
    if not torch.backends.cudnn.is_available():
        return None
    version = torch.backends.cudnn.version()
    if version is None:
        return None
    if version >= 90000:  # cuDNN 9 encodes major * 10000 + minor * 100 + patch
        return f"{version // 10000}.{version % 10000 // 100}.{version % 100}"
    return f"{version // 1000}.{version % 1000 // 100}.{version % 100}"


def _nccl() -> str | None:
    try:
        version = torch.cuda.nccl.version()
    except Exception:  # no NCCL in this build
        return None
    return ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)


def _copy(value: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if value is None else dict(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _compile_section(model: torch.nn.Module | None) -> dict[str, Any]:
    section: dict[str, Any] = {
        "inductor": inductor_settings(),
        "env": inductor_env(),
        "cpp_compiler": cpp_compiler(),
    }
    if model is not None:
        section["model"] = compile_info(model)
    return section


def fingerprint(model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Describe this machine and process in the ways that can change training results.

    Reads ``/proc/cpuinfo``, installed package metadata and, when the current directory
    is in a git repository, ``git rev-parse``/``git status``; once Inductor is loaded, runs
    its C++ compiler's ``--version`` (no other side effects; querying GPUs initialises CUDA
    when it is available; Inductor is never imported by this call). The CPU model, package
    versions, compiler version and git state are read once per process (per directory for
    git) and then reused.

    Args:
        model: the model being trained, if known: the ``compile`` section then says
            whether it runs compiled, with which backend and Inductor options (the ones
            ``mode=`` and ``options=`` set). :class:`torchrepro.Trace` passes its model.

    Returns:
        A JSON-serialisable dict with sections ``python``, ``os``, ``cpu``, ``torch``,
        ``gpus``, ``threads``, ``determinism``, ``env``, ``compile``, ``packages``, ``git``.
        ``compile`` holds ``inductor`` (the Inductor settings that change compiled
        numerics, or None while Inductor is not loaded: torch loads it at the first
        compile and, from 2.10, in ``use_deterministic_algorithms``),
        ``env`` (every ``TORCHINDUCTOR_*``, ``TRITON_*``, ``TORCH_COMPILE_*`` and
        ``TORCHDYNAMO_*`` variable set), ``cpp_compiler`` (command and version line, or None
        while Inductor is not loaded) and, with ``model``, ``model``.
        Compare two with ``torchrepro env --diff`` or :func:`torchrepro.diff_fingerprints`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or None.

    >>> import json
    >>> fp = fingerprint()
    >>> fp["torch"]["version"] == __import__("torch").__version__
    True
    >>> isinstance(json.dumps(fp), str)
    True
    """
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    packages = _packages()
    settings = {name: _jsonable(value) for name, value in current_settings().items()}
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
        },
        "os": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
        },
        "hostname": platform.node(),
        "cpu": {"model": _cpu_model(), "logical_cores": os.cpu_count()},
        "torch": {
            "version": str(torch.__version__),
            "git_version": getattr(torch.version, "git_version", None),
            "cuda": torch.version.cuda,
            "cudnn": _cudnn(),
            "nccl": _nccl(),
            "mkldnn": torch.backends.mkldnn.is_available(),
        },
        "gpus": _gpus(),
        "driver": _driver(),
        "numpy": packages.get("numpy"),
        "threads": {
            "torch_intra_op": torch.get_num_threads(),
            "torch_inter_op": torch.get_num_interop_threads(),
        },
        "determinism": settings,
        "env": {name: os.environ.get(name) for name in NUMERIC_ENV_VARS},
        "compile": _compile_section(model),
        "packages": dict(packages),
        "git": _copy(_git(os.getcwd())),
    }
