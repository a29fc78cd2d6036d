"""What a checkpoint evidently lacks: state that drives training but is not saved.

A resumed run that differs from the uninterrupted one usually lost something its
checkpoint did not hold. Two losses are visible at save time from the saved objects alone:

- an LR scheduler of a saved optimizer, or a GradScaler in use, that is not itself saved
  (the resumed run restarts its schedule or its loss scale);
- a save in the middle of gradient accumulation: ``backward()`` ran since the optimizer's
  last ``step()``, and the accumulated ``.grad`` is not saved.

Each finding is a sentence; the Checkpointer warns it once per process and writes it into
every checkpoint's meta, and ``torchrepro check`` names it in a resume fault.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["SaveAudit", "unsaved_drivers"]


def _scheduler_types() -> tuple[type, ...]:
    sched = torch.optim.lr_scheduler
    types = [getattr(sched, name) for name in ("LRScheduler", "ReduceLROnPlateau")]
    return tuple(t for t in types if isinstance(t, type))


def unsaved_drivers(objects: Mapping[str, Any]) -> list[str]:
    """LR schedulers of a saved optimizer, and GradScalers in use, that are not saved.

    Scans the live objects once (``gc.get_objects``): a scheduler holds its optimizer, but
    nothing in the optimizer points back at it. Schedulers nested in a saved one
    (``SequentialLR``'s) count as saved.
    """
    optimizers = {id(o): n for n, o in objects.items() if isinstance(o, torch.optim.Optimizer)}
    saved = {id(o) for o in objects.values()}
    for obj in objects.values():
        saved.update(id(s) for s in getattr(obj, "_schedulers", None) or [])
    scheduler_types = _scheduler_types()
    scaler_type = getattr(getattr(torch, "amp", None), "GradScaler", None)
    found = []
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance reads __class__, which some module proxies
        # (torch.distributed.reduce_op) answer with a deprecation warning
        kind = type(obj)
        if id(obj) in saved:
            continue
        if optimizers and issubclass(kind, scheduler_types):
            owner = optimizers.get(id(getattr(obj, "optimizer", None)))
            if owner is not None:
                found.append(
                    f"the LR scheduler {type(obj).__name__} of the saved optimizer {owner!r} is "
                    "not saved (a resumed run restarts its schedule): pass it to the "
                    "Checkpointer, e.g. scheduler=scheduler"
                )
        elif (
            isinstance(scaler_type, type)
            and issubclass(kind, scaler_type)
            and getattr(obj, "is_enabled", bool)()
            and getattr(obj, "_scale", None) is not None
        ):
            found.append(
                f"the {type(obj).__name__} in use is not saved (a resumed run restarts its loss "
                "scale): pass it to the Checkpointer, e.g. scaler=scaler"
            )
    return found


class SaveAudit:
    """Watches the saved optimizers for ``backward()`` since their last ``step()``.

    One hook per optimizer, on its first parameter that requires a gradient, and one
    step hook: a flag, no per-step cost beyond two Python calls.
    """

    def __init__(self, objects: Mapping[str, Any]) -> None:
        self.objects = objects
        self.reported: set[str] = set()
        self._pending: dict[str, bool] = {}
        self._drivers: list[str] | None = None
        for name, obj in objects.items():
            if isinstance(obj, torch.optim.Optimizer):
                self._watch(name, obj)

    def _watch(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        hook = getattr(params[0], "register_post_accumulate_grad_hook", None) if params else None
        if hook is None:
            return
        self._pending[name] = False

        def grad(_param: torch.Tensor) -> None:
            self._pending[name] = True

        def stepped(*_args: object) -> None:
            self._pending[name] = False

        hook(grad)
        optimizer.register_step_post_hook(stepped)

    def findings(self, steps: int) -> list[str]:
        """What this save at ``steps`` lacks (unsaved drivers are looked for at the first)."""
        if self._drivers is None:
            self._drivers = unsaved_drivers(self.objects)
        found = list(self._drivers)
        for name, pending in self._pending.items():
            if pending:
                found.append(
                    f"the save at step {steps} came in the middle of gradient accumulation "
                    f"(backward() ran since {name!r}.step()), and the accumulated .grad is not "
                    "saved: call Checkpointer.step() once per optimizer step, after "
                    "optimizer.step()"
                )
        return found
