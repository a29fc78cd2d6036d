"""Which module? Compare two captures of one step (:mod:`torchrepro.trace._capture`).

:func:`compare_captures` names the first event, in execution order (forward outputs in the
order their calls return, then gradients in the order backward reaches them), whose
checksums differ between two captures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Localization", "compare_captures"]

_ROOT = "(model)"


@dataclass(frozen=True)
class Localization:
    """Where two captures of the same step first differ.

    Attributes:
        step: the captured step.
        module: qualified name of the first differing module (``"(model)"`` for the model
            itself), None when no module's output or gradient differed.
        module_class: its class name.
        phase: ``"forward output"`` or ``"gradient"`` (of the module's output).
        call: which call of the module (1 for the first) differed.
        param: with no differing module, the first parameter whose gradient differed.
        flagged_ops: ops PyTorch flags as nondeterministic on each run's device.
        device: the device of each capture, ``(reference, other)``.
        modules: every differing module, in execution order.
        note: a sentence when nothing or only a parameter gradient differed.
        input_differs: the model's input (its first call's positional tensors) already
            differed: the data pipeline, whichever loader the script uses.
    """

    step: int
    module: str | None
    module_class: str | None = None
    phase: str | None = None
    call: int = 1
    param: str | None = None
    flagged_ops: list[str] = field(default_factory=list)
    device: tuple[str, str] = ("cpu", "cpu")
    modules: list[str] = field(default_factory=list)
    note: str = ""
    input_differs: bool = False

    def describe(self) -> str:
        """``first difference in `features.0` (Conv2d) forward output`` or what was found."""
        if self.input_differs:
            text = (
                "the model's input already differed (the batch differs: the data pipeline); "
                f"first difference in `{self.module}` ({self.module_class}) {self.phase}"
            )
        elif self.module is not None:
            call = f", call {self.call}" if self.call > 1 else ""
            text = f"first difference in `{self.module}` ({self.module_class}) {self.phase}{call}"
        elif self.param is not None:
            text = f"no module output or output gradient differed; first differing parameter gradient `{self.param}`"
        else:
            text = self.note or "no difference in the captured step"
        devices = sorted(set(self.device))
        if self.flagged_ops:
            text += f"; ops PyTorch flags as nondeterministic on {'/'.join(devices)}: " + ", ".join(
                self.flagged_ops
            )
        elif self.module is not None:
            text += f"; no op flagged as nondeterministic by PyTorch on {'/'.join(devices)}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "module": self.module,
            "module_class": self.module_class,
            "phase": self.phase,
            "call": self.call,
            "param": self.param,
            "flagged_ops": list(self.flagged_ops),
            "device": list(self.device),
            "modules": list(self.modules),
            "note": self.note,
            "input_differs": self.input_differs,
            "description": self.describe(),
        }


_PHASES = {"forward": "forward output", "backward": "gradient"}


def compare_captures(reference: dict[str, Any], other: dict[str, Any]) -> Localization:
    """Name the first module, in execution order, whose output or gradient differs.

    Forward events come first in the order their calls returned (so a module is named
    before the containers around it), then backward events in the order backward reached
    them. An event present in one capture only counts as differing.

    Args:
        reference, other: captures from :func:`read_capture` of the same step.

    Returns:
        A :class:`Localization`.

    Raises:
        ValueError: the captures are of different steps.

    >>> ev = lambda s: {"phase": "forward", "module": "fc", "class": "Linear", "call": 1, "checksums": [s]}
    >>> a = {"step": 3, "events": [ev("01")], "param_grads": [], "flagged_ops": []}
    >>> b = {"step": 3, "events": [ev("02")], "param_grads": [], "flagged_ops": []}
    >>> compare_captures(a, b).describe()
    'first difference in `fc` (Linear) forward output; no op flagged as nondeterministic by PyTorch on cpu'
    """
    if reference.get("step") != other.get("step"):
        raise ValueError(
            f"captures must be of the same step, got steps {reference.get('step')} and {other.get('step')}"
        )
    step = int(reference["step"])

    def keyed(capture: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
        out: dict[tuple[str, str, int], dict[str, Any]] = {}
        for event in capture.get("events", []):
            key = (str(event["phase"]), str(event["module"]), int(event["call"]))
            if key in out:  # several output tensors' gradients: keep them together
                out[key] = {**out[key], "checksums": out[key]["checksums"] + event["checksums"]}
            else:
                out[key] = dict(event)
        return out

    ref, oth = keyed(reference), keyed(other)
    order = [k for k in ref if k[0] == "forward"] + [
        k for k in oth if k[0] == "forward" and k not in ref
    ]
    order += [k for k in ref if k[0] == "backward"] + [
        k for k in oth if k[0] == "backward" and k not in ref
    ]
    differing = [
        k
        for k in order
        if k not in ref
        or k not in oth
        or sorted(ref[k]["checksums"]) != sorted(oth[k]["checksums"])
    ]
    flagged: list[str] = []
    for capture in (reference, other):
        flagged += [op for op in capture.get("flagged_ops", []) if op not in flagged]
    device = (str(reference.get("device", "cpu")), str(other.get("device", "cpu")))
    modules: list[str] = []
    for _, name, _ in differing:
        if name not in modules:
            modules.append(name)
    inputs = reference.get("inputs"), other.get("inputs")
    input_differs = None not in inputs and inputs[0] != inputs[1]
    if differing:
        phase, name, call = differing[0]
        event = ref.get(differing[0]) or oth[differing[0]]
        return Localization(
            step,
            name,
            str(event.get("class", "?")),
            _PHASES[phase],
            call,
            flagged_ops=flagged,
            device=device,
            modules=modules,
            input_differs=input_differs,
        )
    grads_a = {g["name"]: g["checksum"] for g in reference.get("param_grads", [])}
    grads_b = {g["name"]: g["checksum"] for g in other.get("param_grads", [])}
    param = next((n for n in grads_a if grads_a[n] != grads_b.get(n)), None)
    if param is None:
        param = next((n for n in grads_b if n not in grads_a), None)
    note = ""
    if param is None:
        note = (
            f"step {step}'s forward outputs and gradients were identical in both re-runs: the "
            "difference arose outside forward and backward (the optimizer step or code between "
            "backward and trace.step()), or did not recur when re-run from the checkpoint"
        )
    return Localization(
        step, None, param=param, flagged_ops=flagged, device=device, modules=[], note=note
    )
