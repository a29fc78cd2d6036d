"""The resume guarantee end to end: a real loop stopped at step k in one process and resumed
in a fresh one ends bitwise identical to the loop that never stopped.

The loop is examples/train_digits.py (CNN with BatchNorm and dropout on scikit-learn's digits,
torchvision v2 augmentation and a NumPy draw in __getitem__, AdamW, OneCycleLR,
torchrepro.DataLoader with workers), and train_digits_bf16.py (the same with bfloat16 autocast
and a GradScaler); --limit 512 --batch-size 32 gives 16 steps per epoch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("sklearn")

# End-to-end: starts training processes (minutes in all); -m 'not slow' skips it.
pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ARGS = ["--limit", "512", "--batch-size", "32", "--epochs", "2", "--every", "1000"]
STEPS = 32
BF16 = "train_digits_bf16.py"


def _run(
    tmp: Path,
    name: str,
    *,
    workers: int,
    extra: list[str] = (),
    env: dict[str, str] | None = None,
    script: str = "train_digits.py",
) -> Path:
    final = tmp / f"{name}.final.pt"
    full_env = {
        **os.environ,
        "PYTHONHASHSEED": "0",
        "TORCHREPRO_SEED": "0",
        "TORCHREPRO_NUM_WORKERS": str(workers),
        "TORCHREPRO_CHECKPOINT": str(tmp / f"{name}.ckpt.pt"),
        **(env or {}),
    }
    full_env.pop("TORCHREPRO_TRACE", None)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *ARGS, *extra, "--save-final", str(final)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return final


def _stop_then_resume(
    tmp: Path,
    name: str,
    k: int,
    *,
    before: int,
    after: int,
    extra: list[str],
    script: str = "train_digits.py",
) -> Path:
    stop = {"TORCHREPRO_STOP_AT": str(k)}
    stopped = _run(tmp, name, workers=before, extra=extra, env=stop, script=script)
    assert not stopped.exists()  # the first process really ended at step k
    assert (tmp / f"{name}.ckpt.pt").exists()
    return _run(tmp, name, workers=after, extra=extra, script=script)


def _assert_bitwise_equal(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key, value in a.items():
            _assert_bitwise_equal(value, b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def reference(work: Path) -> dict:
    return torch.load(_run(work, "reference", workers=2), weights_only=True)


@pytest.mark.parametrize(
    ("k", "before", "after", "persistent"),
    [
        (1, 0, 2, False),
        (9, 2, 0, False),  # mid-epoch
        (16, 2, 2, True),  # the epoch boundary
        (STEPS - 1, 0, 2, True),
    ],
)
def test_resume_is_bitwise_identical(work, reference, k, before, after, persistent):
    extra = ["--persistent-workers"] if persistent else []
    final = _stop_then_resume(work, f"k{k}", k, before=before, after=after, extra=extra)
    _assert_bitwise_equal(reference, torch.load(final, weights_only=True), "final")


def test_resume_with_bf16_autocast_and_grad_scaler(work):
    reference = torch.load(_run(work, "bf16-reference", workers=0, script=BF16), weights_only=True)
    final = _stop_then_resume(work, "bf16", 9, before=2, after=0, extra=[], script=BF16)
    _assert_bitwise_equal(reference, torch.load(final, weights_only=True), "final")


MANUAL_LOOP = """
import sys, torch, torch.nn.functional as F, torchrepro
sys.path.insert(0, sys.argv[1])
from digits import Digits, Net
stop_at, path, out = int(sys.argv[2]), sys.argv[3], sys.argv[4]
torchrepro.seed_everything(0)
torchrepro.deterministic("strict")
loader = torchrepro.DataLoader(Digits(512), batch_size=32, shuffle=True, drop_last=True, num_workers=2)
model = Net()
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=2 * len(loader))
objects = dict(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader)
step = torchrepro.load_checkpoint(path, **objects)["step"] if stop_at < 0 else 0
for epoch in range(loader.epoch, 2):
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step(); scheduler.step()
        step += 1
        if step == stop_at:
            torchrepro.save_checkpoint(path, extra={"step": step}, **objects)
            raise SystemExit(0)
torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, out)
"""


def test_manual_save_and_load_checkpoint_loop(work):
    def run(stop_at: int, out: Path, workers: int) -> None:
        env = {**os.environ, "PYTHONHASHSEED": "0", "TORCHREPRO_NUM_WORKERS": str(workers)}
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                MANUAL_LOOP,
                str(EXAMPLES),
                str(stop_at),
                str(work / "manual.pt"),
                str(out),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr

    run(0, work / "manual-ref.pt", 2)
    run(12, work / "unused.pt", 0)
    run(-1, work / "manual-resumed.pt", 2)
    _assert_bitwise_equal(
        torch.load(work / "manual-ref.pt", weights_only=True),
        torch.load(work / "manual-resumed.pt", weights_only=True),
        "final",
    )
