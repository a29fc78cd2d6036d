"""Peak memory of save_checkpoint/load_checkpoint vs torch.save/torch.load, side by side.

Each measure runs in a fresh Python process (Linux: ``/proc/self/status``), which builds a
model whose state is ``--mb`` megabytes, resets the peak (``/proc/self/clear_refs``),
runs one operation and reports its peak resident set size. The model and the imports
are counted in both columns alike; the "extra" column is the peak above what the process
held before the operation. Goal: torchrepro's peak at most 1.2x torch's.

    python benchmarks/checkpoint_memory.py              # 256 MB state, about a minute
    python benchmarks/checkpoint_memory.py --mb 512
    python benchmarks/checkpoint_memory.py --code /path/to/other/checkout   # another version
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURES = ("torch.save", "save_checkpoint", "torch.load", "load_checkpoint")
AGAINST = {"save_checkpoint": "torch.save", "load_checkpoint": "torch.load"}


def _status(field: str) -> int:
    """A ``VmRSS``/``VmHWM``-style field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(measure: str, directory: Path, megabytes: int) -> None:
    import torch

    import torchrepro

    torch.set_num_threads(1)
    pieces = 16
    numel = megabytes * 2**20 // 4 // pieces
    model = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.full((numel,), float(k))) for k in range(pieces)]
    )
    plain, ours = directory / "plain.pt", directory / "ckpt.pt"
    torchrepro.fingerprint()  # cached per process: not part of either operation's cost
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = _status("VmRSS")
    if measure == "torch.save":
        torch.save(model.state_dict(), plain)
    elif measure == "save_checkpoint":
        torchrepro.save_checkpoint(ours, model=model)
    elif measure == "torch.load":
        model.load_state_dict(torch.load(plain, weights_only=True))
    else:
        torchrepro.load_checkpoint(ours, model=model)
    print(json.dumps({"before": before, "peak": _status("VmHWM")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="state size in MB (default 256)")
    parser.add_argument("--code", help="run another checkout's torchrepro (its repository root)")
    parser.add_argument("--child", nargs=2, metavar=("MEASURE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], Path(args.child[1]), args.mb)
        return
    if not os.path.exists("/proc/self/clear_refs"):
        sys.exit("checkpoint_memory.py needs Linux (/proc/self/status and clear_refs)")
    root = Path(args.code or Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        for measure in MEASURES:  # the saves write the files the loads read
            out = subprocess.run(
                [sys.executable, __file__, "--mb", str(args.mb), "--child", measure, directory],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            results[measure] = json.loads(out.stdout.strip().splitlines()[-1])
    mb = 2**20
    print(f"checkpoint peak memory, {args.mb} MB state, torchrepro from {root}")
    print()
    print("| operation | peak RSS (MB) | extra over before (MB) | ratio to torch (peak) |")
    print("| --- | --- | --- | --- |")
    for measure in MEASURES:
        r = results[measure]
        ratio = ""
        if measure in AGAINST:
            ratio = f"{r['peak'] / results[AGAINST[measure]]['peak']:.2f}x"
        print(
            f"| {measure} | {r['peak'] / mb:,.0f} | {(r['peak'] - r['before']) / mb:+,.0f} | {ratio} |"
        )


if __name__ == "__main__":
    main()
