"""The README's promises a new user meets first: its script runs as printed, and its test
command is the one CI runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from torchrepro import read_trace

pytest.importorskip("sklearn")

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def _snippet() -> str:
    """The README's first Python block, verbatim."""
    blocks = re.findall(r"^```python\n(.*?)^```$", README, flags=re.DOTALL | re.MULTILINE)
    assert blocks, "README.md has no ```python block"
    return blocks[0]


def test_snippet_seeds_before_it_builds_anything() -> None:
    code = _snippet()
    seed = code.index("torchrepro.seed_everything()")
    for built in ("Digits()", "DataLoader(", "nn.Sequential(", "torch.optim."):
        assert seed < code.index(built), f"seed_everything() must come before {built}"
    assert re.search(r"#.*(RNG|random)", code[:seed]), "the snippet must say why it seeds first"


def test_snippet_runs_as_printed_and_traces_every_step(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(_snippet(), encoding="utf-8")
    trace = tmp_path / "trace.jsonl"
    env = {
        **os.environ,
        "PYTHONHASHSEED": "0",
        "TORCHREPRO_SEED": "0",
        "TORCHREPRO_NUM_WORKERS": "0",  # the same results, without the workers' start-up
        "TORCHREPRO_TRACE": str(trace),
    }
    env.pop("TORCHREPRO_CHECKPOINT", None)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"(\d+) steps, train accuracy ([\d.]+)", proc.stdout)
    assert match, proc.stdout
    steps, accuracy = int(match[1]), float(match[2])
    assert steps == 5 * 29  # 5 epochs of ceil(1797 / 64) batches
    assert accuracy > 0.8  # it trained (chance is 0.1)
    assert read_trace(trace).steps == list(range(1, steps + 1))
    assert list(tmp_path.glob("*.pt")), "the snippet's Checkpointer wrote no checkpoint"


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    marker = re.search(r"grep -m1 -F \"(.*?)\" README.md", ci)
    assert marker, "CI no longer reads its test command from README.md"
    commands = [line for line in README.splitlines() if marker[1] in line]
    assert commands, f"README.md has no line with {marker[1]!r} for CI to run"
    assert commands[0].endswith("python -m pytest -q")  # the whole suite, slow tests included
