"""What determinism costs on a GPU, and whether it holds: one prepared script, one table.

Under ``torchrepro.deterministic("off")``, ``"strict"`` and strict with
``fill_uninitialized_memory=False``:

- step time (forward, backward, optimizer; bf16 autocast) of a ResNet-18-style conv net
  (batch 64, 224x224, SGD) and a transformer encoder block (SDPA, batch 32, sequence 512,
  width 768, AdamW); modes interleaved (ABBA), median of repeats, ratios to "off";
- whether two 20-step runs from the same seed are bitwise equal (every parameter,
  ``torch.equal``), per mode;
- ``torchrepro.audit`` of a model pooling with ``index_add_`` and ``scatter_add_``
  (thousands of rows into a few slots, so CUDA's atomic adds race): is it deterministic,
  the first module whose output differed, and the ops PyTorch flags; and of a bilinear
  upsampling model, whose backward PyTorch flags on CUDA (strict refuses to run it).

``CUBLAS_WORKSPACE_CONFIG=:4096:8`` is set (when unset) before CUDA is initialised, since
cuBLAS reads it only then; it therefore applies to every mode, "off" included, as it does
under ``torchrepro run``.

    python benchmarks/gpu_determinism.py                      # CUDA; repeats stop at 150 s
    python benchmarks/gpu_determinism.py --quick              # CUDA, fewer repeats
    python benchmarks/gpu_determinism.py --device cpu --quick # tiny sizes: a smoke test

Sized for well under 4 minutes on one H100 (by estimate: it has not run on a GPU yet).
Every cell that raises (an op strict mode refuses) shows the error instead of a number.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import _common
import torch
import torch.nn.functional as F
from torch import nn

import torchrepro

MODES: dict[str, dict[str, Any]] = {
    "off": {"mode": "off"},
    "strict": {"mode": "strict"},
    "strict, no fill": {"mode": "strict", "fill_uninitialized_memory": False},
}
CUBLAS_VAR, CUBLAS_VALUE = "CUBLAS_WORKSPACE_CONFIG", ":4096:8"


@dataclass(frozen=True)
class Sizes:
    conv_width: int  # ResNet-18's is 64
    conv_batch: int
    image: int
    attn_batch: int
    seq: int
    width: int
    heads: int
    steps: int  # timed steps per block
    repeats: int
    equal_steps: int
    pool_rows: int
    deadline_s: float  # stop adding timing repeats after this (the script must end in time)


SIZES = {
    ("cuda", False): Sizes(64, 64, 224, 32, 512, 768, 12, 10, 7, 20, 1 << 18, 150.0),
    ("cuda", True): Sizes(64, 64, 224, 32, 512, 768, 12, 5, 3, 20, 1 << 18, 90.0),
    ("cpu", False): Sizes(32, 8, 64, 4, 64, 128, 4, 3, 3, 20, 4096, 120.0),
    ("cpu", True): Sizes(16, 2, 32, 2, 16, 64, 4, 2, 2, 5, 1024, 30.0),
}


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries the machine line and the table."""
    print(message, file=sys.stderr, flush=True)


# --- models -------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18's layout; the head averages with ``mean`` (AdaptiveAvgPool2d's CUDA
    backward has no deterministic kernel, so strict mode would refuse torchvision's)."""

    def __init__(self, width: int = 64, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks: list[nn.Module] = []
        cin = width
        for cout, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(8 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(self.layers(self.stem(x)).mean((2, 3)))
        return logits


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block with ``scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, w // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.0
        )
        x = x + self.drop(self.proj(attn.transpose(1, 2).reshape(b, s, w)))
        out: torch.Tensor = x + self.drop(self.mlp(self.norm2(x)))
        return out


class IndexAddPool(nn.Module):
    """Sums rows into ``slots`` groups with ``index_add_``."""

    def __init__(self, slots: int) -> None:
        super().__init__()
        self.slots = slots

    def forward(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.slots, x.shape[1], device=x.device, dtype=x.dtype)
        return out.index_add_(0, groups, x)


class ScatterAddPool(nn.Module):
    """Sums rows into ``slots`` groups with ``scatter_add_``."""

    def __init__(self, slots: int) -> None:
        super().__init__()
        self.slots = slots

    def forward(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.slots, x.shape[1], device=x.device, dtype=x.dtype)
        return out.scatter_add_(0, groups[:, None].expand_as(x), x)


class Pooling(nn.Module):
    def __init__(self, features: int = 64, slots: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(16, features)
        self.index_pool = IndexAddPool(slots)
        self.scatter_pool = ScatterAddPool(slots)
        self.head = nn.Linear(2 * features, 1)

    def forward(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        pooled = torch.cat([self.index_pool(h, groups), self.scatter_pool(h, groups)], dim=1)
        loss: torch.Tensor = self.head(pooled).sum()
        return loss


class Upsampling(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.out = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        loss: torch.Tensor = self.out(self.upsample(self.conv(x))).square().mean()
        return loss


# --- workloads ----------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    make: Callable[[], tuple[nn.Module, torch.optim.Optimizer]]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def workloads(device: torch.device, s: Sizes) -> list[Workload]:
    def conv() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = ResNet18(s.conv_width).to(device).to(memory_format=torch.channels_last)
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def conv_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(s.conv_batch, 3, s.image, s.image, generator=gen)
        y = torch.randint(0, 1000, (s.conv_batch,), generator=gen)
        return x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)

    def attn() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = EncoderBlock(s.width, s.heads).to(device)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4)

    def attn_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(s.attn_batch, s.seq, s.width, generator=gen)
        return x.to(device), torch.randn(s.attn_batch, s.seq, s.width, generator=gen).to(device)

    return [
        Workload(
            f"ResNet-18-style (width {s.conv_width}), batch {s.conv_batch}, {s.image}x{s.image}",
            conv,
            conv_batch,
            F.cross_entropy,
        ),
        Workload(
            f"encoder block (SDPA), batch {s.attn_batch}, seq {s.seq}, width {s.width}",
            attn,
            attn_batch,
            F.mse_loss,
        ),
    ]


def _step(
    model: nn.Module, opt: torch.optim.Optimizer, work: Workload, x: torch.Tensor, y: torch.Tensor
) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        loss = work.loss(model(x).float(), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _short(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"raises {type(error).__name__}: {text[:90]}"


def step_times(
    device: torch.device, work: Workload, s: Sizes, deadline: float
) -> dict[str, float | str]:
    """Median seconds per step per mode (or the error text), interleaved ABBA."""
    torch.manual_seed(0)
    model, opt = work.make()
    x, y = work.batch(torch.Generator().manual_seed(0))
    results: dict[str, float | str] = {}
    times: dict[str, list[float]] = {}
    for name, kwargs in MODES.items():  # warm up: cuDNN picks other kernels per mode
        try:
            with torchrepro.deterministic(**kwargs):
                for _ in range(2):
                    _step(model, opt, work, x, y)
                _sync(device)
            times[name] = []
        except RuntimeError as e:
            results[name] = _short(e)
    names = list(times)
    for repeat in range(s.repeats):
        if repeat > 0 and time.perf_counter() > deadline:
            break
        for name in names if repeat % 2 == 0 else names[::-1]:
            with torchrepro.deterministic(**MODES[name]):
                _sync(device)
                start = time.perf_counter()
                for _ in range(s.steps):
                    _step(model, opt, work, x, y)
                _sync(device)
                times[name].append((time.perf_counter() - start) / s.steps)
    for name, values in times.items():
        values.sort()
        results[name] = values[len(values) // 2]
    return results


def run_steps(device: torch.device, work: Workload, steps: int) -> list[torch.Tensor]:
    """Train ``steps`` steps from seed 0 under the current settings; every parameter after."""
    torch.manual_seed(0)
    model, opt = work.make()
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        x, y = work.batch(gen)
        _step(model, opt, work, x, y)
    return [p.detach().cpu().clone() for p in model.parameters()]


def equal_runs(device: torch.device, work: Workload, steps: int) -> dict[str, str]:
    """Per mode: are two ``steps``-step runs from the same seed bitwise equal?"""
    out = {}
    for name, kwargs in MODES.items():
        try:
            with torchrepro.deterministic(**kwargs):
                a, b = run_steps(device, work, steps), run_steps(device, work, steps)
        except RuntimeError as e:
            out[name] = _short(e)
            continue
        same = all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
        out[name] = "yes" if same else "no"
    return out


def audits(device: torch.device, s: Sizes) -> list[tuple[str, dict[str, str]]]:
    """Rows: the pooling model's verdict, first module and flagged ops; the upsampler's."""
    torch.manual_seed(0)
    pooling = Pooling().to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(s.pool_rows, 16, generator=gen).to(device)
    groups = torch.randint(0, 8, (s.pool_rows,), generator=gen).to(device)
    upsampling = Upsampling().to(device)
    image = torch.randn(2, 3, 32, 32, generator=gen).to(device)
    verdict: dict[str, str] = {}
    first: dict[str, str] = {}
    flagged: dict[str, str] = {}
    upsampler: dict[str, str] = {}
    for name, kwargs in MODES.items():
        with torchrepro.deterministic(**kwargs):
            try:
                report = torchrepro.audit(pooling, x, groups, runs=3)
            except RuntimeError as e:
                verdict[name] = first[name] = flagged[name] = _short(e)
            else:
                verdict[name] = "yes" if report.deterministic else "no"
                first[name] = (
                    f"{report.first_module} ({report.module_types[report.first_module]})"
                    if report.first_module
                    else "none"
                )
                flagged[name] = ", ".join(report.flagged_ops) or "none"
            try:
                up = torchrepro.audit(upsampling, image)
            except RuntimeError as e:
                upsampler[name] = _short(e)
            else:
                upsampler[name] = ", ".join(up.flagged_ops) or "none"
                upsampler[name] += "; deterministic" if up.deterministic else "; NOT deterministic"
    return [
        ("audit, index_add_/scatter_add_ model: 3 runs bitwise equal", verdict),
        ("audit, index_add_/scatter_add_ model: first module that differed", first),
        ("audit, index_add_/scatter_add_ model: ops PyTorch flags", flagged),
        ("audit, bilinear upsampling model: ops PyTorch flags", upsampler),
    ]


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        cudnn = torch.backends.cudnn.version()
        where = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, cuDNN {cudnn}"
    else:
        where = f"CPU, {torch.get_num_threads()} torch thread(s) (smoke sizes, not the study)"
    return (
        f"{_common.machine_line({'torchrepro': torchrepro.__version__})}; {where}; "
        f"{CUBLAS_VAR}={os.environ.get(CUBLAS_VAR)}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (CPU: tiny sizes)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.device == "cuda":
        # Before anything initialises CUDA: cuBLAS reads it once, at initialisation.
        os.environ.setdefault(CUBLAS_VAR, CUBLAS_VALUE)
        if not torch.cuda.is_available():
            parser.error("CUDA is not available; use --device cpu for the smoke run")
    else:
        torch.set_num_threads(1)  # two threads on a busy small CPU thrash; a smoke run
    device = torch.device(args.device)
    s = SIZES[(args.device, args.quick)]
    deadline = start + s.deadline_s
    rows: list[list[str]] = []
    for work in workloads(device, s):
        log(f"step times: {work.name}")
        times = step_times(device, work, s, deadline)
        off = times.get("off")
        cells = []
        for name in MODES:
            value = times[name]
            if isinstance(value, str):
                cells.append(value)
            elif name == "off" or not isinstance(off, float):
                cells.append(f"{value * 1e3:.2f} ms")
            else:
                cells.append(f"{value * 1e3:.2f} ms ({value / off:.2f}x)")
        rows.append([f"step time, {work.name}", *cells])
        log(f"equal runs: {work.name}")
        equal = equal_runs(device, work, s.equal_steps)
        rows.append(
            [f"two {s.equal_steps}-step runs bitwise equal, {work.name}"]
            + [equal[name] for name in MODES]
        )
    log("audit")
    for what, cells_by_mode in audits(device, s):
        rows.append([what, *(cells_by_mode[name] for name in MODES)])
    print(f"gpu_determinism: {machine(device)}")
    print()
    header = [
        "measure",
        'deterministic("off")',
        '"strict"',
        '"strict", fill_uninitialized_memory=False',
    ]
    print(_common.markdown_table(header, rows))
    log(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
