"""audit(): run a model several times from identical state and name what differs."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core._rng import get_rng_state, set_rng_state
from ._checksum import tensor_checksums

__all__ = ["AuditReport", "audit"]

_NONDETERMINISTIC = re.compile(r"^(.*?) does not have a deterministic implementation")
_ROOT = "(model)"


@dataclass(frozen=True)
class AuditReport:
    """What :func:`audit` found.

    Attributes:
        deterministic: every run gave bitwise-identical module outputs, loss and gradients.
        first_module: qualified name of the first module, in the order their forward calls
            returned, whose output differed between runs (``"(model)"`` for the model
            itself); None when none differed.
        grads: names of the parameters whose gradients differed (or were None in some run).
        flagged_ops: ops PyTorch reports as lacking a deterministic implementation on this
            device (from ``use_deterministic_algorithms(True, warn_only=True)``).
        modules: every module whose output differed, in the same order as ``first_module``.
        loss_differs: the loss (from ``loss_fn``) differed.
        runs: how many runs were compared.
        backward: whether backward was run (so gradients were compared).
        module_types: class name of each module named above, for messages.
    """

    deterministic: bool
    first_module: str | None
    grads: list[str]
    flagged_ops: list[str]
    modules: list[str] = field(default_factory=list)
    loss_differs: bool = False
    runs: int = 2
    backward: bool = False
    module_types: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        what = "forward and backward" if self.backward else "forward"
        if self.deterministic:
            lines = [
                f"audit: deterministic: {self.runs} runs ({what}) gave bitwise-identical results"
            ]
        else:
            lines = [f"audit: NOT deterministic: {self.runs} runs ({what}) differed"]
            if self.first_module is not None:
                kind = self.module_types.get(self.first_module, "?")
                lines.append(f"  first module whose output differed: {self.first_module} ({kind})")
            if len(self.modules) > 1:
                shown = ", ".join(self.modules[:8]) + (", ..." if len(self.modules) > 8 else "")
                lines.append(f"  {len(self.modules)} modules' outputs differed: {shown}")
            if self.loss_differs:
                lines.append("  the loss differed")
            if self.grads:
                shown = ", ".join(self.grads[:8]) + (", ..." if len(self.grads) > 8 else "")
                lines.append(f"  {len(self.grads)} gradients differed: {shown}")
        if self.flagged_ops:
            lines.append(
                "  ops PyTorch reports as nondeterministic here: " + ", ".join(self.flagged_ops)
            )
        else:
            lines.append("  no op reported as nondeterministic by PyTorch")
        return "\n".join(lines)


def _tensors(value: object) -> Iterator[torch.Tensor]:
    """Every tensor inside nested tuples, lists and dicts (and dataclass-like outputs)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


Record = dict[tuple[str, int], tuple[int, ...]]


def _run_once(
    model: torch.nn.Module,
    names: dict[torch.nn.Module, str],
    inputs: tuple[Any, ...],
    loss_fn: Callable[[Any], torch.Tensor] | None,
    params: list[tuple[str, torch.nn.Parameter]],
) -> tuple[Record, tuple[int, ...] | None, dict[str, int | None], bool]:
    outputs: Record = {}
    calls: dict[str, int] = {}

    def hook(module: torch.nn.Module, args: object, output: object) -> None:
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        tensors = list(_tensors(output))
        outputs[(name, calls[name])] = tuple(tensor_checksums(tensors))

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.enable_grad():
            output = model(*inputs)
            loss: torch.Tensor | None = None
            if loss_fn is not None:
                loss = loss_fn(output)
                if not isinstance(loss, torch.Tensor):
                    raise TypeError(
                        f"loss_fn must return a torch.Tensor, got {type(loss).__name__}"
                    )
            elif isinstance(output, torch.Tensor) and output.numel() == 1 and output.requires_grad:
                loss = output
            backward = loss is not None and loss.requires_grad
            if backward:
                assert loss is not None
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    loss_sum = tuple(tensor_checksums([loss])) if loss is not None else None
    grads = [p.grad for _, p in params]
    present = [g for g in grads if g is not None]
    sums = iter(tensor_checksums(present))
    grad_sums = {
        name: (next(sums) if g is not None else None)
        for (name, _), g in zip(params, grads, strict=True)
    }
    return outputs, loss_sum, grad_sums, backward


def audit(
    model: torch.nn.Module,
    *inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    runs: int = 2,
) -> AuditReport:
    """Run ``model`` several times from identical state and report what differed.

    Each run starts from the same weights and buffers (BatchNorm statistics and
    non-persistent buffers included)
    and the same global RNG state, with gradients cleared, and runs the forward pass,
    then backward when ``loss_fn`` is given or the output is a one-element tensor that
    requires grad. Forward hooks record an exact checksum of every submodule's output
    (all tensors inside tuples, lists and dicts), and the gradients are checksummed.
    Dropout in train mode is therefore not reported: it draws the same numbers each run.

    An extra forward (and backward) runs under
    ``torch.use_deterministic_algorithms(True, warn_only=True)`` to collect the ops
    PyTorch reports as lacking a deterministic implementation; the compared runs use the
    current settings, so they behave as training does.

    Afterwards the model's parameters, buffers, gradients (values, identity and
    ``None``-ness), the train/eval mode of every submodule, the global RNGs and the
    deterministic-algorithms setting are as they were. Hooks are removed even when the
    model raises. Tensor inputs that require grad get their ``.grad`` back too.

    Args:
        model: the module to audit, in the mode to audit (``train()`` or ``eval()``).
        *inputs: positional arguments for ``model``.
        loss_fn: maps the model's output to a scalar loss to backpropagate.
        runs: how many runs to compare, at least 2.

    Returns:
        An :class:`AuditReport`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``loss_fn`` is not callable or does
            not return a tensor, or ``runs`` is not an int.
        ValueError: ``runs`` < 2.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))
    >>> report = audit(model, torch.ones(2, 4), loss_fn=lambda y: y.sum())
    >>> report.deterministic, report.first_module, report.grads
    (True, None, [])
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
    if isinstance(runs, bool) or not isinstance(runs, int):
        raise TypeError(f"runs must be an int >= 2, got {type(runs).__name__} {runs!r}")
    if runs < 2:
        raise ValueError(f"runs must be an int >= 2 (runs are compared with the first), got {runs}")

    names = {m: (name or _ROOT) for name, m in model.named_modules()}
    types = {name: type(m).__name__ for m, name in names.items()}
    params = list(model.named_parameters())
    saved_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # state_dict() leaves out non-persistent buffers (register_buffer(persistent=False)),
    # which forward may change too (running statistics, caches): keep every buffer.
    persistent = set(saved_state)
    buffers = []  # (owner, attribute, the buffer tensor itself, a copy of its value)
    for qualified, buffer in model.named_buffers():
        if qualified not in persistent:
            prefix, _, attribute = qualified.rpartition(".")
            buffers.append(
                (model.get_submodule(prefix), attribute, buffer, buffer.detach().clone())
            )
    saved_grads = [p.grad for _, p in params]
    saved_modes = [(m, m.training) for m in names]
    input_leaves = [
        t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf
    ]
    saved_input_grads = [t.grad for t in input_leaves]
    rng = get_rng_state()
    flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )

    def reset() -> None:
        with torch.no_grad():
            model.load_state_dict(saved_state)
            for owner, attribute, buffer, value in buffers:
                buffer.copy_(value)
                owner._buffers[attribute] = buffer  # the same tensor, also if forward rebound it
        for _, p in params:
            p.grad = None
        for t in input_leaves:
            t.grad = None
        for m, mode in saved_modes:
            m.training = mode
        set_rng_state(rng)

    results = []
    flagged: list[str] = []
    try:
        for _ in range(runs):
            reset()
            results.append(_run_once(model, names, inputs, loss_fn, params))
        reset()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.use_deterministic_algorithms(True, warn_only=True)
            try:
                _run_once(model, names, inputs, loss_fn, params)
            finally:
                torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        for w in caught:
            match = _NONDETERMINISTIC.match(str(w.message))
            if match and match.group(1) not in flagged:
                flagged.append(match.group(1))
    finally:
        reset()
        for (_, p), g in zip(params, saved_grads, strict=True):
            p.grad = g
        for t, g in zip(input_leaves, saved_input_grads, strict=True):
            t.grad = g

    first_outputs, first_loss, first_grads, backward = results[0]
    order = list(first_outputs)
    for outputs, _, _, _ in results[1:]:
        order.extend(k for k in outputs if k not in first_outputs and k not in order)
    differing_keys = [
        k for k in order if any(r[0].get(k) != first_outputs.get(k) for r in results[1:])
    ]
    modules: list[str] = []
    for name, _ in differing_keys:
        if name not in modules:
            modules.append(name)
    grads = [
        name for name, _ in params if any(r[2][name] != first_grads[name] for r in results[1:])
    ]
    loss_differs = any(r[1] != first_loss for r in results[1:])
    return AuditReport(
        deterministic=not (modules or grads or loss_differs),
        first_module=modules[0] if modules else None,
        grads=grads,
        flagged_ops=flagged,
        modules=modules,
        loss_differs=loss_differs,
        runs=runs,
        backward=backward,
        module_types={name: types[name] for name in modules},
    )
