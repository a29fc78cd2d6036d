"""One step's per-module capture: checksums of every module's forward output and gradient.

A run started with ``TORCHREPRO_LOCALIZE_STEP=N`` captures step ``N`` only: once
:class:`torchrepro.Trace` has counted step ``N - 1`` (or at its creation or resume when that
is where the run stands), :class:`Capture` arms global module hooks
(``register_module_forward_hook``): every module's forward output is checksummed when the
call returns, and a tensor hook on each output that requires grad checksums the gradient
reaching it during backward. At ``trace.step()`` for step ``N`` the events of the model's
modules are named (``model.named_modules()``), the parameters' gradients are checksummed,
:func:`torchrepro.audit` is run once on the model's inputs of that step to collect the ops
PyTorch flags as nondeterministic on this device, and the record is written to
``<trace file>.localize.json``. Then the process ends with status 0: the captured run is
bounded by the steps from its starting checkpoint to ``N``.

A compiled model (``torch.compile``) runs step ``N`` eagerly: compiled code calls no module
hooks inside its graph, so while the hooks are armed the capture sets
``torch.compiler.set_stance("force_eager")`` (torch >= 2.6; the stance is put back when
they are disarmed), and names modules by the original module's names (no ``_orig_mod.``).
The captured step thus checksums eager's module outputs and gradients, computed from the
state the compiled steps before it left: a divergence that only compiled kernels produce
within step ``N`` shows in the trace, not in the capture.

The capture file has one owner, this module: it writes (:meth:`Capture.finish`), reads
(:func:`read_capture`) and versions it. Comparing two captures is the check layer's
(:func:`torchrepro.check._localize.compare_captures`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from .._errors import TraceError
from ..core import _envvars
from ..core._compiled import unwrap
from ._audit import audit
from ._checksum import tensor_checksums

__all__ = ["CAPTURE_SUFFIX", "Capture", "read_capture"]

CAPTURE_FORMAT = "torchrepro-localize"
CAPTURE_VERSION = 1
CAPTURE_SUFFIX = ".localize.json"
_ROOT = "(model)"


def _tensors(value: object) -> list[torch.Tensor]:
    """Every tensor inside nested tuples, lists and dicts, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _force_eager() -> contextlib.AbstractContextManager[Any] | None:
    """Make compiled code run eagerly until the returned context exits (None: nothing to do).

    Only where Dynamo is loaded (else nothing is compiled) and torch has ``set_stance``.
    """
    if "torch._dynamo" not in sys.modules:
        return None
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        return None
    stance: contextlib.AbstractContextManager[Any] = set_stance("force_eager")
    stance.__enter__()
    return stance


def _hex(values: list[int]) -> list[str]:
    return [f"{v:016x}" for v in values]


def _sum_outputs(output: object) -> torch.Tensor:
    """A scalar that backpropagates into every floating-point output (for the audit pass)."""
    parts = [t.float().sum() for t in _tensors(output) if t.is_floating_point() and t.requires_grad]
    if not parts:
        return torch.zeros((), requires_grad=False)
    return torch.stack(parts).sum()


class Capture:
    """Capture one step's per-module checksums; armed and finished by :class:`Trace`.

    Args:
        step: the step to capture (``TORCHREPRO_LOCALIZE_STEP``), at least 1.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self._handles: list[RemovableHandle] = []
        # (phase, id(module), call number, class name, checksums)
        self._events: list[tuple[str, int, int, str, list[str]]] = []
        self._calls: dict[int, int] = {}
        self._depth = 0
        self._first_args: dict[int, tuple[Any, ...]] = {}
        self._eager: contextlib.AbstractContextManager[Any] | None = None  # while armed

    @classmethod
    def from_env(cls, *, traced: bool) -> Capture | None:
        """A capture for ``TORCHREPRO_LOCALIZE_STEP``, armed if the run is at step 0.

        Args:
            traced: whether the trace writes a file (the capture goes next to it).

        Returns:
            None when the variable is unset.

        Raises:
            ValueError: the variable is not an integer >= 1, or the trace is disabled.
        """
        step = _envvars.env_int(_envvars.LOCALIZE_STEP, low=1)
        if step is None:
            return None
        if not traced:
            raise ValueError(
                f"{_envvars.LOCALIZE_STEP} is set but the Trace writes no file: set "
                f"{_envvars.TRACE} (the capture is written next to the trace)"
            )
        capture = cls(step)
        capture.sync(0)
        return capture

    def after_step(self, steps_done: int, model: torch.nn.Module | None, trace: str | None) -> None:
        """Called by ``Trace.step``: finish the captured step and end the process, or re-arm.

        Raises:
            SystemExit: (status 0) after the captured step's record is written.
        """
        if steps_done != self.step:
            self.sync(steps_done)
            return
        self.finish(model, None if trace is None else trace + CAPTURE_SUFFIX)
        raise SystemExit(0)

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def sync(self, steps_done: int) -> None:
        """Arm the hooks when the run stands right before the captured step, else disarm."""
        if steps_done == self.step - 1:
            self._arm()
        else:
            self._disarm()

    def _arm(self) -> None:
        self._disarm()
        self._eager = _force_eager()
        self._events, self._calls, self._first_args, self._depth = [], {}, {}, 0
        modules = torch.nn.modules.module
        self._handles = [
            modules.register_module_forward_pre_hook(self._pre),
            modules.register_module_forward_hook(self._post),
        ]

    def _disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._eager is not None:
            self._eager.__exit__(None, None, None)
            self._eager = None

    def _pre(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self._depth += 1
        # The inputs of the outermost calls (the model, or a wrapper and the model under
        # it), kept by reference for the audit pass.
        if self._depth <= 2 and id(module) not in self._first_args:
            self._first_args[id(module)] = args

    def _post(self, module: torch.nn.Module, args: object, output: object) -> None:
        self._depth = max(self._depth - 1, 0)
        key = id(module)
        call = self._calls[key] = self._calls.get(key, 0) + 1
        kind = type(module).__name__
        tensors = _tensors(output)
        with torch.no_grad():
            sums = _hex(tensor_checksums([t.detach() for t in tensors]))
        self._events.append(("forward", key, call, kind, sums))
        for index, t in enumerate(tensors):
            if t.requires_grad:
                t.register_hook(self._grad_hook(key, call, kind, index))

    def _grad_hook(self, key: int, call: int, kind: str, index: int) -> Any:
        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                sums = _hex(tensor_checksums([grad.detach()]))
            self._events.append(("backward", key, call, kind, [f"{index}:{sums[0]}"]))

        return hook

    def finish(self, model: torch.nn.Module | None, path: str | None) -> None:
        """Write the capture of the step just finished to ``path`` (None: write nothing).

        Raises:
            ValueError: no ``model`` was passed to ``trace.step()``.
        """
        self._disarm()
        if model is None:
            raise ValueError(
                f"{_envvars.LOCALIZE_STEP}={self.step} needs the model: call "
                "trace.step(loss=loss, model=model) so the capture can name its modules"
            )
        if path is None:
            return
        model = unwrap(model)
        names = {id(m): (name or _ROOT) for name, m in model.named_modules()}
        events = [
            {"phase": phase, "module": names[key], "class": kind, "call": call, "checksums": sums}
            for phase, key, call, kind, sums in self._events
            if key in names
        ]
        params = list(model.named_parameters())
        grads = [p.grad for _, p in params]
        sums = iter(_hex(tensor_checksums([g.detach() for g in grads if g is not None])))
        param_grads = [
            {"name": name, "checksum": None if g is None else next(sums)}
            for (name, _), g in zip(params, grads, strict=True)
        ]
        args = self._first_args.get(id(model))
        inputs = None if args is None else _tensors(args)
        record = {
            "format": CAPTURE_FORMAT,
            "version": CAPTURE_VERSION,
            "step": self.step,
            "device": str(next((p.device for _, p in params), torch.device("cpu"))),
            # The model's first call's positional tensors: the batch, whatever the loader.
            "inputs": None
            if inputs is None
            else _hex(tensor_checksums([t.detach() for t in inputs])),
            "events": events,
            "param_grads": param_grads,
            **self._audit(model),
        }
        self._events, self._first_args = [], {}
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)

    def _audit(self, model: torch.nn.Module) -> dict[str, Any]:
        """``audit`` once on the model's inputs of this step: flagged ops, in-process check."""
        args = self._first_args.get(id(model))
        if args is None:
            return {"flagged_ops": [], "audit": None, "audit_error": "the model was not called"}
        try:
            report = audit(model, *args, loss_fn=_sum_outputs, runs=2)
        except Exception as exc:  # the audit is a bonus; the checksums above stand
            return {"flagged_ops": [], "audit": None, "audit_error": f"{type(exc).__name__}: {exc}"}
        return {
            "flagged_ops": list(report.flagged_ops),
            "audit": {
                "deterministic": report.deterministic,
                "first_module": report.first_module,
                "modules": list(report.modules),
            },
            "audit_error": None,
        }


def read_capture(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a capture written by a run with ``TORCHREPRO_LOCALIZE_STEP``.

    Raises:
        TraceError: the file is missing, not a capture, or of another version.
    """
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as exc:
        raise TraceError(
            f"{name} does not exist: the run did not reach the captured step with "
            f"{_envvars.LOCALIZE_STEP} set (does it call trace.step(model=model)?)"
        ) from exc
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TraceError(f"{name} is not a torchrepro localize capture: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != CAPTURE_FORMAT:
        raise TraceError(f"{name} is not a torchrepro localize capture (no {CAPTURE_FORMAT} tag)")
    if data.get("version") != CAPTURE_VERSION:
        raise TraceError(
            f"{name} is a localize capture of version {data.get('version')!r}; "
            f"this torchrepro reads version {CAPTURE_VERSION}"
        )
    return data
