"""Compiled training on a GPU: is ``mode="max-autotune"`` bitwise run to run, and at what cost?

Prepared for a GPU machine; not run in CI. Each run is a fresh process training a small
transformer block (batch 16, sequence 256, width 512, AdamW, 20 steps, fp32) under
``torch.compile(mode="max-autotune")`` with its own empty Inductor cache
(``TORCHINDUCTOR_CACHE_DIR``), so every run autotunes afresh. Runs:

- ``strict``: ``torchrepro.deterministic("strict")`` (Inductor's deterministic mode on);
- ``strict, distorted``: the same with ``TORCHINDUCTOR_DISTORT_BENCHMARKING_RESULT=inverse``
  (autotuning sees inverted timings and so would pick other kernels), as PyTorch's CI
  tests determinism;
- ``off`` and ``off, distorted``: the same without deterministic mode, to show what the
  distortion changes there.

Printed: per run, the final parameters' checksum and whether they are ``torch.equal`` to
the first run of the same mode; and the median step time after compilation, strict over
off (the cost of Inductor's deterministic mode and deterministic algorithms).

    python benchmarks/gpu_compiled.py            # CUDA: ~4 cold max-autotune compiles
    python benchmarks/gpu_compiled.py --quick    # fewer steps, a smaller block

Sized, by estimate (it has not run on a GPU yet), for under 8 minutes on one H100.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import torchrepro

RUNS = (
    ("strict", "strict", ""),
    ("strict, distorted", "strict", "inverse"),
    ("off", "off", ""),
    ("off, distorted", "off", "inverse"),
)


def train(mode: str, steps: int, width: int, out: Path) -> None:
    """One run, in this process: train, then write the final state and step times to ``out``."""
    torchrepro.seed_everything(0)
    torchrepro.deterministic(mode)  # type: ignore[arg-type]
    device = torch.device("cuda")
    block = torch.nn.TransformerEncoderLayer(
        width, nhead=8, dim_feedforward=4 * width, dropout=0.1, batch_first=True
    ).to(device)
    model = torch.compile(block, mode="max-autotune")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    trace = torchrepro.Trace()  # verifies determinism at the first compiled step (strict)
    times = []
    for _ in range(steps):
        x = torch.randn(16, 256, width, device=device)
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        trace.step(loss=loss, model=model)
    torch.save({k: v.cpu() for k, v in block.state_dict().items()}, out)
    out.with_suffix(".json").write_text(json.dumps({"times": times[3:]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "STEPS", "WIDTH", "OUT"))
    args = parser.parse_args()
    if args.child:
        mode, steps, width, out = args.child
        train(mode, int(steps), int(width), Path(out))
        return
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA: max-autotune benchmarks kernels on the GPU")
    steps, width = (8, 256) if args.quick else (20, 512)
    print(
        f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, steps {steps}, width {width}"
    )
    with tempfile.TemporaryDirectory(prefix="gpu-compiled-") as tmp:
        first: dict[str, dict[str, torch.Tensor]] = {}
        medians: dict[str, float] = {}
        for name, mode, distort in RUNS:
            out = Path(tmp) / (name.replace(", ", "-") + ".pt")
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / f"cache-{out.stem}")}
            env.pop("TORCHINDUCTOR_DISTORT_BENCHMARKING_RESULT", None)
            if distort:
                env["TORCHINDUCTOR_DISTORT_BENCHMARKING_RESULT"] = distort
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, __file__, "--child", mode, str(steps), str(width), str(out)],
                env=env,
                capture_output=True,
                text=True,
            )
            took = time.perf_counter() - started
            if done.returncode != 0:
                print(f"{name:18s} FAILED ({took:.0f} s): {done.stderr.strip()[-400:]}")
                continue
            state = torch.load(out, weights_only=True)
            times = json.loads(out.with_suffix(".json").read_text())["times"]
            medians[name] = statistics.median(times)
            checksum = torchrepro.tensor_checksum(
                torch.cat([v.flatten().float() for v in state.values()])
            )
            reference = first.setdefault(mode, state)
            same = all(torch.equal(state[k], reference[k]) for k in state)
            print(
                f"{name:18s} {took:6.0f} s  step {medians[name] * 1e3:7.2f} ms  "
                f"checksum {checksum:016x}  bitwise equal to {mode!r} run 1: {same}"
            )
        if "strict" in medians and "off" in medians:
            print(f"strict / off step time: {medians['strict'] / medians['off']:.2f}x")


if __name__ == "__main__":
    main()
