"""Hardening of checkpoints (issue 11): never write what cannot be loaded, validate before
touching anything, clean up after killed saves, symlinks, argument types, user messages."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import torchrepro.checkpoint._file as ckpt_file
import torchrepro.checkpoint._io as ckpt_mod
from torchrepro import (
    Checkpointer,
    CheckpointError,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
)

pytestmark = pytest.mark.rng_changes  # building models draws from torch's RNG


class Counter:
    def __init__(self, n: object = 0) -> None:
        self.n = n

    def state_dict(self) -> dict[str, object]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.n = state["n"]


class Color(enum.Enum):
    RED = 1


@dataclasses.dataclass
class Point:
    x: int = 1


UNLOADABLE = [
    (np.float64(0.9), "numpy.float64"),
    (np.int32(3), "numpy.int32"),
    (np.zeros(3), "numpy.ndarray"),
    (datetime.datetime(2026, 1, 1), "datetime.datetime"),
    (datetime.date(2026, 1, 1), "datetime.date"),
    (Point(), "Point"),
    (Color.RED, "Color"),
    (pathlib.Path("x"), "PosixPath" if os.name != "nt" else "WindowsPath"),
    (range(3), "range"),
    (collections.defaultdict(int), "collections.defaultdict"),
    (torch.Generator(), "Generator"),
    (frozenset([1]), "frozenset"),
    ({1, np.float64(2.0)}, "numpy.float64"),  # inside a set, which itself is fine
]


@pytest.mark.parametrize(("value", "kind"), UNLOADABLE, ids=[repr(v)[:30] for v, _ in UNLOADABLE])
def test_values_weights_only_refuses_are_refused_at_save(tmp_path, value, kind):
    path = tmp_path / "c.pt"
    save_checkpoint(path, counter=Counter(1))
    before = path.read_bytes()
    with pytest.raises(
        TypeError, match=rf"extra\['metrics'\]\['acc'\]( item .*)?: \S*{kind}.*store"
    ):
        save_checkpoint(path, counter=Counter(2), extra={"metrics": {"acc": value}})
    with pytest.raises(
        CheckpointError, match=rf"counter.state_dict\(\)\['n'\]\[0\]( item .*)?: \S*{kind}"
    ):
        save_checkpoint(path, counter=Counter([value]))
    assert path.read_bytes() == before  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ["c.pt"]  # and nothing else was written
    assert load_checkpoint(path, counter=Counter()) == {}


def test_what_weights_only_accepts_is_kept(tmp_path):
    extra = {
        "t": (1, 2.5, "s", None, True),
        "o": collections.OrderedDict(a=1),
        "size": torch.Size([2]),
        "dtype": torch.float16,
        "set": {1, 2},
    }
    save_checkpoint(tmp_path / "c.pt", extra=extra, counter=Counter(np.float64(1).item()))
    assert load_checkpoint(tmp_path / "c.pt", counter=Counter()) == extra


def _tamper(path: pathlib.Path, change) -> None:
    """Rewrite a valid checkpoint with ``change`` applied: checksum-valid, content bad."""
    content, _digest = ckpt_mod.read_checkpoint(path)
    change(content)
    ckpt_file.write(path, content)


BAD_CONTENT = {
    "torch RNG of another build": lambda c: c["rng"][0].update(
        torch=torch.zeros(10, dtype=torch.uint8)
    ),
    "Python RNG of wrong size": lambda c: c["rng"][0].update(python=[3, [1] * 10, None]),
    "NumPy RNG of wrong size": lambda c: c["rng"][0]["numpy"].update(keys=[1, 2]),
    "CUDA RNG of wrong type": lambda c: c["rng"][0].update(cuda=[torch.zeros(2)]),
    "no RNG": lambda c: c.update(rng=[]),
    "world size a string": lambda c: c.update(world_size="2"),
    "objects not a dict": lambda c: c.update(objects=[1]),
}


@pytest.mark.parametrize("change", list(BAD_CONTENT.values()), ids=list(BAD_CONTENT))
def test_bad_content_is_refused_before_anything_is_touched(tmp_path, change):
    path = tmp_path / "c.pt"
    torch.manual_seed(0)
    save_checkpoint(path, model=torch.nn.Linear(2, 2), counter=Counter(7))
    _tamper(path, change)
    model, counter = torch.nn.Linear(2, 2), Counter(1)
    weights = model.weight.detach().clone()
    rng = get_rng_state()
    with pytest.raises(CheckpointError, match=r"c\.pt"):
        load_checkpoint(path, counter=counter, model=model)
    assert counter.n == 1 and torch.equal(model.weight, weights)  # untouched
    assert get_rng_state()["python"] == rng["python"]


def test_module_mismatch_is_found_before_other_objects_load(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, counter=Counter(7), model=torch.nn.Linear(2, 2))
    counter = Counter(1)
    with pytest.raises(CheckpointError, match=r"size mismatch for weight.*nothing was loaded"):
        load_checkpoint(path, counter=counter, model=torch.nn.Linear(3, 2))
    assert counter.n == 1


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_files_of_killed_saves_are_removed(tmp_path):
    path = tmp_path / "c.pt"
    host = ckpt_file._HOST
    stale = tmp_path / f".c.pt.torchrepro.{host}.{_dead_pid()}.0a1b2c3d.tmp"
    live = tmp_path / f".c.pt.torchrepro.{host}.{os.getppid()}.0a1b2c3d.tmp"
    other_host = (
        tmp_path
        / f".c.pt.torchrepro.{'0' * 8 if host != '0' * 8 else '1' * 8}.{_dead_pid()}.aa.tmp"
    )
    not_ours = [tmp_path / ".c.pt.x1y2z3.tmp", tmp_path / ".d.pt.torchrepro.{host}.1.aa.tmp"]
    for p in (stale, live, other_host, *not_ours):
        p.write_bytes(b"x" * 100)
    save_checkpoint(path, counter=Counter(1))
    assert not stale.exists()
    assert live.exists() and other_host.exists() and all(p.exists() for p in not_ours)
    stale.write_bytes(b"x")
    load_checkpoint(path, counter=Counter())  # the next load cleans up too
    assert not stale.exists()


def test_saving_through_a_symlink_updates_the_target(tmp_path):
    real = tmp_path / "runs" / "real.pt"
    save_checkpoint(real, counter=Counter(1))
    link = tmp_path / "latest.pt"
    link.symlink_to(real)
    save_checkpoint(link, counter=Counter(2))
    assert link.is_symlink()
    counter = Counter()
    load_checkpoint(real, counter=counter)
    assert counter.n == 2
    assert sorted(os.listdir(tmp_path / "runs")) == ["real.pt"]


@pytest.mark.parametrize("strict", ["no", 0, None])
def test_strict_must_be_a_bool(tmp_path, strict):
    save_checkpoint(tmp_path / "c.pt", counter=Counter())
    with pytest.raises(TypeError, match="strict must be True or False"):
        load_checkpoint(tmp_path / "c.pt", strict=strict, counter=Counter())
    with pytest.raises(TypeError, match="strict must be True or False"):
        Checkpointer(tmp_path / "c.pt", every=1, counter=Counter()).resume(strict=strict)


@pytest.mark.parametrize("path", [None, 3, b"c.pt"])
def test_path_must_be_a_path(path):
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike"):
        load_checkpoint(path, counter=Counter())
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike"):
        save_checkpoint(path, counter=Counter())


def test_none_objects_are_skipped(tmp_path):
    save_checkpoint(tmp_path / "c.pt", counter=Counter(3), scheduler=None)
    counter = Counter()
    load_checkpoint(tmp_path / "c.pt", counter=counter, scheduler=None)
    assert counter.n == 3
    ckpt = Checkpointer(tmp_path / "d.pt", every=1, counter=counter, scheduler=None)
    ckpt.step()
    assert (
        Checkpointer(tmp_path / "d.pt", every=1, counter=Counter(), scheduler=None).resume() == {}
    )


def test_torch_dataloader_is_named_and_the_fix_suggested(tmp_path):
    loader = torch.utils.data.DataLoader(list(range(4)))
    with pytest.raises(
        TypeError, match=r"got torch\.utils\.data\.DataLoader: .*use torchrepro\.DataLoader"
    ):
        Checkpointer(tmp_path / "c.pt", every=1, loader=loader)


def test_resume_says_where_it_resumed(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path / "c.pt", every=2, counter=Counter())
    ckpt.step()
    ckpt.step()
    with caplog.at_level(logging.WARNING, logger="torchrepro"):
        Checkpointer(tmp_path / "c.pt", every=2, counter=Counter()).resume()
    assert f"resumed from {tmp_path / 'c.pt'} at step 2" in caplog.text


FINISHED = textwrap.dedent(
    """
    import torchrepro
    class C:
        def state_dict(self): return {}
        def load_state_dict(self, s): pass
    ckpt = torchrepro.Checkpointer("c.pt", every=5, c=C())
    ckpt.resume()
    while ckpt.steps < 10:
        ckpt.step()
    """
)


def test_rerunning_a_finished_script_says_so(tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("TORCHREPRO_CHECKPOINT", None)
    run = [sys.executable, "-c", FINISHED]
    first = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert first.returncode == 0 and "resumed" not in first.stderr, first.stderr
    second = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert "resumed from c.pt at step 10" in second.stderr
    assert "already at the end of training" in second.stderr


def test_never_writes_a_file_it_cannot_read(tmp_path, monkeypatch):
    # Whatever slips past the key-path check, the written file is unpickled (weights-only)
    # before it replaces the old one.
    monkeypatch.setattr(ckpt_file, "unloadable", lambda value, where: None)
    path = tmp_path / "c.pt"
    save_checkpoint(path, counter=Counter(1))
    with pytest.raises(CheckpointError, match="would not load back"):
        save_checkpoint(path, counter=Counter(np.float64(1.0)))
    assert os.listdir(tmp_path) == ["c.pt"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only")
def test_memory_benchmark_runs():
    script = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "checkpoint_memory.py"
    out = subprocess.run(
        [sys.executable, str(script), "--mb", "8"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "| load_checkpoint |" in out.stdout and "x |" in out.stdout


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_or_directory_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo.pt")
    (tmp_path / "dir.pt").mkdir()
    for name in ("fifo.pt", "dir.pt"):
        with pytest.raises(CheckpointError, match="is not a regular file"):
            load_checkpoint(tmp_path / name, counter=Counter())


def test_module_with_a_load_hook_is_not_prechecked_for_keys(tmp_path):
    # A module that renames keys on load (a migration) must not be refused by the pre-check.
    path = tmp_path / "c.pt"
    old = torch.nn.Linear(2, 2)
    save_checkpoint(path, model=old)
    content, _digest = ckpt_mod.read_checkpoint(path)
    content["objects"]["model"] = {f"old_{k}": v for k, v in content["objects"]["model"].items()}
    ckpt_file.write(path, content)

    def rename(state_dict, prefix, *args):  # type: ignore[no-untyped-def]
        for key in list(state_dict):
            if key.startswith(prefix + "old_"):
                state_dict[prefix + key[len(prefix) + 4 :]] = state_dict.pop(key)

    model = torch.nn.Linear(2, 2)
    model._register_load_state_dict_pre_hook(rename)
    load_checkpoint(path, model=model)
    assert torch.equal(model.weight, old.weight)
