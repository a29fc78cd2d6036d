from __future__ import annotations

import os
import random
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
    TorchreproWarning,
    isolated_rng,
    load_checkpoint,
    save_checkpoint,
)

# Building models draws from the global torch RNG; the autouse fixture restores it.
pytestmark = pytest.mark.rng_changes


class Counter:
    """The smallest Stateful: a user's own object."""

    def __init__(self, n: int = 0) -> None:
        self.n = n

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.n = state["n"]


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))


def _train(model, opt, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(16, 4)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        elif isinstance(value, dict):
            _assert_state_equal(value, b[key])
        else:
            assert value == b[key], key


def test_roundtrip_restores_objects_extra_and_rng(tmp_path):
    path = tmp_path / "ckpt.pt"
    with isolated_rng():
        torch.manual_seed(0)
        model = _model()
        opt = torch.optim.AdamW(model.parameters())
        _train(model, opt, 3)
        save_checkpoint(path, model=model, optimizer=opt, counter=Counter(5), extra={"step": 3})
        _train(model, opt, 4)
        reference = (model.state_dict(), opt.state_dict())

        model2 = _model()
        opt2 = torch.optim.AdamW(model2.parameters())
        counter = Counter()
        extra = load_checkpoint(path, model=model2, optimizer=opt2, counter=counter)
        _train(model2, opt2, 4)
    assert extra == {"step": 3}
    assert counter.n == 5
    _assert_state_equal(reference[0], model2.state_dict())
    _assert_state_equal(reference[1]["state"], opt2.state_dict()["state"])


def test_file_loads_with_weights_only_and_has_metadata(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, counter=Counter(1))
    content, digest = ckpt_mod.read_checkpoint(path)
    assert len(digest) == 64
    assert content["format_version"] == ckpt_mod.FORMAT_VERSION
    assert content["fingerprint"]["torch"]["version"] == str(torch.__version__)
    assert "deterministic_algorithms" in content["determinism"]
    assert content["rng"][0]["version"] == 1


def test_no_temporary_files_left(tmp_path):
    save_checkpoint(tmp_path / "c.pt", counter=Counter(1))
    save_checkpoint(tmp_path / "c.pt", counter=Counter(2))
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]


def _valid(tmp_path) -> bytes:
    save_checkpoint(tmp_path / "good.pt", counter=Counter(1))
    return (tmp_path / "good.pt").read_bytes()


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:20], "truncated"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 0x01]), "corrupted"),
        (lambda b: b[:100] + bytes([b[100] ^ 0x80]) + b[101:], "corrupted"),
        (lambda b: b"PK\x03\x04 not ours", "not a torchrepro checkpoint"),
        (lambda b: b"", "not a torchrepro checkpoint"),
    ],
)
def test_damaged_files_are_detected(tmp_path, corrupt, match):
    data = corrupt(_valid(tmp_path))
    (tmp_path / "bad.pt").write_bytes(data)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path / "bad.pt", counter=Counter())


def _write_payload(path, content) -> None:
    ckpt_file.write(path, content)


def test_unknown_format_version(tmp_path):
    _write_payload(tmp_path / "v.pt", {"format": "torchrepro.checkpoint", "format_version": 99})
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path / "v.pt")


def test_plain_torch_file_is_not_a_checkpoint(tmp_path):
    torch.save({"model": 1}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="is not a torchrepro checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_name_mismatch_strict_and_not(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, counter=Counter(3), other=Counter(4))
    with pytest.raises(
        CheckpointError, match=r"not in the file: model; in the file but not passed: other"
    ):
        load_checkpoint(path, counter=Counter(), model=Counter())
    counter = Counter()
    with pytest.warns(TorchreproWarning, match="in the file but not passed: other"):
        load_checkpoint(path, strict=False, counter=counter)
    assert counter.n == 3


def test_failed_object_load_names_the_object(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, model=torch.nn.Linear(2, 2))
    with pytest.raises(
        CheckpointError, match=r"(?s)loading model= from checkpoint .* failed: .*size mismatch"
    ):
        load_checkpoint(path, model=torch.nn.Linear(3, 2))


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint object model= must have state_dict\(\)"):
        save_checkpoint(tmp_path / "c.pt", model=object())
    with pytest.raises(TypeError, match="extra must be a dict or None, got list"):
        save_checkpoint(tmp_path / "c.pt", extra=[1], counter=Counter())  # type: ignore[arg-type]


def test_environment_difference_warns_with_reason(tmp_path, monkeypatch):
    real = ckpt_mod.fingerprint

    def other_machine():
        fp = real()
        fp["torch"]["cudnn"] = "1.0.0"
        return fp

    monkeypatch.setattr(ckpt_mod, "fingerprint", other_machine)
    save_checkpoint(tmp_path / "c.pt", counter=Counter())
    monkeypatch.setattr(ckpt_mod, "fingerprint", real)
    with pytest.warns(
        TorchreproWarning, match=r"torch.cudnn: 1.0.0 vs .*convolution algorithms can differ"
    ):
        load_checkpoint(tmp_path / "c.pt", counter=Counter())


def test_world_size_mismatch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHREPRO_SEED", "5")  # the run's seed, at save and at load
    save_checkpoint(tmp_path / "c.pt", counter=Counter())
    monkeypatch.setattr(ckpt_mod._dist, "world_size", lambda: 2)
    with pytest.raises(CheckpointError, match="saved with world size 1, this run has world size 2"):
        load_checkpoint(tmp_path / "c.pt", counter=Counter())
    with isolated_rng():
        with pytest.warns(TorchreproWarning, match="re-derived from the seed"):
            load_checkpoint(tmp_path / "c.pt", strict=False, counter=Counter())
        rank0 = (random.random(), float(np.random.random()), torch.rand(2))
        monkeypatch.setattr(ckpt_mod._dist, "group_rank", lambda: 1)
        with pytest.warns(TorchreproWarning, match="re-derived from the seed"):
            Checkpointer(tmp_path / "c.pt", every=1, counter=Counter()).resume(strict=False)
        rank1 = (random.random(), float(np.random.random()), torch.rand(2))
        # Every library's stream is re-derived per rank, NumPy's included.
        assert rank0[0] != rank1[0] and rank0[1] != rank1[1] and not torch.equal(rank0[2], rank1[2])
        monkeypatch.delenv("TORCHREPRO_SEED")
        with (
            pytest.warns(TorchreproWarning),
            pytest.raises(CheckpointError, match="needs the run's seed"),
        ):
            load_checkpoint(tmp_path / "c.pt", strict=False, counter=Counter())


def test_checkpointer_every_and_resume(tmp_path):
    path = tmp_path / "c.pt"
    counter = Counter()
    ckpt = Checkpointer(path, every=3, counter=counter)
    assert ckpt.resume() is None
    for i in range(1, 8):
        counter.n = i
        ckpt.step(extra={"at": i})
        assert path.exists() == (i >= 3)
    fresh = Counter()
    again = Checkpointer(path, every=3, counter=fresh)
    assert again.resume() == {"at": 6}
    assert again.steps == 6
    assert fresh.n == 6


def test_checkpointer_env_path_override(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHREPRO_CHECKPOINT", str(tmp_path / "elsewhere.pt"))
    ckpt = Checkpointer(tmp_path / "c.pt", every=1, counter=Counter())
    ckpt.step()
    assert (tmp_path / "elsewhere.pt").exists()
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize(
    ("every", "error"),
    [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)],
)
def test_checkpointer_bad_every(tmp_path, every, error):
    with pytest.raises(error, match="every must be an int >= 1"):
        Checkpointer(tmp_path / "c.pt", every=every, counter=Counter())


def test_checkpointer_without_path_only_counts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = Checkpointer(None, every=1, counter=Counter())
    assert ckpt.resume() is None
    ckpt.step()
    assert ckpt.steps == 1
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match="has no path"):
        ckpt.save()
    monkeypatch.setenv("TORCHREPRO_STOP_AT", "3")
    with pytest.raises(
        ValueError, match="TORCHREPRO_STOP_AT is set but the Checkpointer has no path"
    ):
        Checkpointer(None, every=1, counter=Counter())


def test_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "c.pt", counter=Counter())
    finally:
        os.umask(old)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o644
    save_checkpoint(tmp_path / "new" / "dir" / "c.pt", counter=Counter())
    assert (tmp_path / "new" / "dir" / "c.pt").exists()


def test_foreign_rng_devices_refused_before_anything_is_loaded(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, counter=Counter(9))
    monkeypatch.setattr(
        ckpt_mod, "rng_state_problems", lambda state: ["it holds 8 CUDA device state(s)"]
    )
    counter = Counter(1)
    with pytest.raises(CheckpointError, match=r"other devices: it holds 8 CUDA device state\(s\)"):
        load_checkpoint(path, counter=counter)
    assert counter.n == 1  # untouched


@pytest.mark.parametrize("value", ["0", "-2", "abc", "1.5"])
def test_checkpointer_bad_stop_at(tmp_path, monkeypatch, value):
    monkeypatch.setenv("TORCHREPRO_STOP_AT", value)
    with pytest.raises(
        ValueError, match="environment variable TORCHREPRO_STOP_AT must be an integer >= 1"
    ):
        Checkpointer(tmp_path / "c.pt", every=10, counter=Counter())


@pytest.mark.slow
def test_stop_at_saves_then_exits_zero(tmp_path):
    script = textwrap.dedent(
        """
        import torchrepro
        class C:
            n = 0
            def state_dict(self): return {"n": self.n}
            def load_state_dict(self, s): self.n = s["n"]
        c = C()
        ckpt = torchrepro.Checkpointer("c.pt", every=100, c=c)
        ckpt.resume()
        while ckpt.steps < 10:
            c.n += 1
            ckpt.step()
        print("finished", c.n)
        """
    )
    env = {**os.environ, "TORCHREPRO_STOP_AT": "4", "PYTHONHASHSEED": "0"}
    first = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    assert "finished" not in first.stdout
    env.pop("TORCHREPRO_STOP_AT")
    second = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == ["finished", "10"]


KILL_TEST = """
import os, random, signal, sys, time, torch, torchrepro

class Blob:
    def __init__(self): self.t = torch.zeros(1)
    def state_dict(self): return {"t": self.t}
    def load_state_dict(self, s): self.t = s["t"]

torch.set_num_threads(1)  # no OpenMP pool in the parent: forked children must not inherit one
path, kills = sys.argv[1], int(sys.argv[2])
rng = random.Random(1234)
blob = Blob()
version = 0
for k in range(kills):
    child = os.fork()  # torch is imported once; each child is a fresh writer
    if child == 0:
        while True:
            version += 1
            blob.t = torch.full((8_000_000,), float(version))  # 32 MB: the write takes a while
            torchrepro.save_checkpoint(path, blob=blob, extra={"version": version})
    time.sleep(rng.uniform(0.05, 0.7))
    os.kill(child, signal.SIGKILL)  # at a random instant, usually mid-save
    os.waitpid(child, 0)
    if not os.path.exists(path):
        continue
    loaded = Blob()
    extra = torchrepro.load_checkpoint(path, blob=loaded)  # raises on a torn file
    assert torch.equal(loaded.t, torch.full((8_000_000,), float(extra["version"]))), extra
    version = extra["version"] + 1000 * (k + 1)  # the next writer's versions are new
    print("ok", extra["version"], flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="uses os.fork to start writers quickly")
def test_kill_9_during_save_never_leaves_a_torn_file(tmp_path):
    path = tmp_path / "c.pt"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_TEST, str(path), "24"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    loads = proc.stdout.split("\n")
    assert (
        sum(line.startswith("ok ") for line in loads) >= 20
    )  # the file existed and loaded each time
    # Each load after a kill removed the killed writer's temporary file.
    assert os.listdir(tmp_path) == ["c.pt"]
