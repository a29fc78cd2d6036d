"""torchrepro.integrations.lightning: ReproCallback.

End to end (subprocesses): ``torchrepro check`` on examples/train_lightning.py, alone and
under a 2-process torchrun, and the failure the callback fixes (a mid-epoch resume through
Lightning's own checkpoint is not bitwise without it). In process: seeds, state, errors.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("sklearn")
pytest.importorskip("torchvision")

from _frameworks import EXAMPLES, SCRIPTS, check, run_json, torchrun  # noqa: E402

import torchrepro  # noqa: E402
from torchrepro.data import _streams  # noqa: E402
from torchrepro.integrations.lightning import ReproCallback  # noqa: E402
from torchrepro.trace._compare import read_trace  # noqa: E402

ARGS = ["--limit", "256"]  # 8 steps per epoch, 16 in all


@pytest.mark.slow
def test_check_varied_workers_and_mid_epoch_resume_is_reproducible(tmp_path):
    command = [sys.executable, str(EXAMPLES / "train_lightning.py"), *ARGS]
    proc = check("--vary", "num_workers=0,2", "--resume-at", "11", command=command, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "REPRODUCIBLE: 4 runs x 16 steps bitwise identical" in proc.stdout


@pytest.mark.slow
def test_mid_epoch_resume_differs_without_the_callback_and_is_bitwise_with_it(tmp_path):
    result = run_json("lightning_resume.py", tmp_path)
    assert result["plain"], "without ReproCallback the resumed run was expected to differ"
    assert result["repro"] == [], f"with ReproCallback these tensors differ: {result['repro']}"


@pytest.mark.slow
def test_torchrun_two_processes_resume_is_reproducible(tmp_path):
    proc = check(
        "--resume-at",
        "11",
        command=torchrun("train_lightning.py", *ARGS),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "REPRODUCIBLE: 3 runs x 16 steps bitwise identical" in proc.stdout


# -- in process ---------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for name in (
        "TORCHREPRO_SEED",
        "PL_GLOBAL_SEED",
        "TORCHREPRO_CHECKPOINT",
        "TORCHREPRO_STOP_AT",
        "TORCHREPRO_TRACE",
    ):
        monkeypatch.setenv(name, "")  # so that monkeypatch restores it, whoever sets it
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.rng_changes
def test_seed_comes_from_the_argument_then_torchrepro_then_lightning(clean_env):
    clean_env.setenv("PL_GLOBAL_SEED", "7")
    assert ReproCallback().seed == 7
    clean_env.setenv("TORCHREPRO_SEED", "5")
    assert ReproCallback().seed == 5
    assert ReproCallback(seed=3).seed == 3


def test_bad_lightning_seed_is_refused(clean_env):
    clean_env.setenv("PL_GLOBAL_SEED", "-1")
    with pytest.raises(ValueError, match="PL_GLOBAL_SEED"):
        ReproCallback()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"trace": "yes"}, TypeError, "trace must be"),
        ({"deterministic": "on"}, ValueError, "deterministic must be"),
    ],
)
def test_bad_arguments_are_refused(clean_env, kwargs, error, message):
    with pytest.raises(error, match=message):
        ReproCallback(**kwargs)


@pytest.mark.rng_changes
def test_state_from_another_world_size_or_seed_is_refused(clean_env):
    callback = ReproCallback(seed=1, trace=False)
    state = callback.state_dict()
    assert state["world_size"] == 1 and len(state["rng"]) == 1
    with pytest.raises(torchrepro.TorchreproError, match="saved by 2 processes"):
        callback.load_state_dict({**state, "world_size": 2, "rng": state["rng"] * 2})
    with pytest.raises(torchrepro.TorchreproError, match="seed 9"):
        callback.load_state_dict({**state, "seed": 9})


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).sum()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(callback: ReproCallback, loader: Any, ckpt_path: str | None = None) -> None:
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with torchrepro.deterministic("strict"):  # restores the flags the callback sets
        trainer.fit(_Tiny(), loader, ckpt_path=ckpt_path)


@pytest.mark.rng_changes
def test_torch_loader_is_refused_with_the_fix(clean_env):
    loader = torch.utils.data.DataLoader(torch.zeros(4, 2), batch_size=2)
    with pytest.raises(torchrepro.TorchreproError, match=r"return torchrepro\.DataLoader"):
        _fit(ReproCallback(seed=0, trace=False), loader)


@pytest.mark.rng_changes
def test_recorded_stop_not_resumed_is_an_error(clean_env, tmp_path):
    clean_env.setenv("TORCHREPRO_CHECKPOINT", str(tmp_path / "ckpt.pt"))
    clean_env.setenv("TORCHREPRO_STOP_AT", "1")
    loader = torchrepro.DataLoader(torch.zeros(8, 2), batch_size=2, seed=0)
    with pytest.raises(SystemExit) as stopped:
        _fit(ReproCallback(seed=0, trace=False), loader)
    assert stopped.value.code == 0
    assert (tmp_path / "ckpt.pt.lightning.ckpt").exists()
    clean_env.delenv("TORCHREPRO_STOP_AT")
    callback = ReproCallback(seed=0, trace=False)
    with pytest.raises(torchrepro.TorchreproError, match=r"ckpt_path=repro\.resume_path\(\)"):
        _fit(callback, torchrepro.DataLoader(torch.zeros(8, 2), batch_size=2, seed=0))
    assert callback.resume_path() == str(tmp_path / "ckpt.pt.lightning.ckpt")


# -- epoch ends (issue 24) ----------------------------------------------------------------


def _train(root: Any, epochs: int, ckpt_path: str | None = None) -> dict[str, torch.Tensor]:
    """Train lightning_resume.py's module with Lightning's default ModelCheckpoint in ``root``."""
    _streams.reset_created()  # a fresh process: loaders are keyed by creation order
    from lightning_resume import Module, Noisy

    callback = ReproCallback(seed=0, trace=False)
    model = Module()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=[callback],
        logger=False,
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torchrepro.DataLoader(Noisy(), batch_size=8, shuffle=True, seed=0)
    with torchrepro.deterministic("strict"):
        trainer.fit(model, loader, ckpt_path=ckpt_path)
    return model.state_dict()


@pytest.mark.rng_changes
def test_resume_from_the_default_model_checkpoint_at_an_epoch_end_trains_the_next_epoch(
    clean_env, tmp_path
):
    clean_env.syspath_prepend(str(SCRIPTS))
    whole = _train(tmp_path / "whole", epochs=2)
    _train(tmp_path / "first", epochs=1)
    (saved,) = (tmp_path / "first" / "checkpoints").glob("*.ckpt")
    assert saved.name == "epoch=0-step=8.ckpt"
    resumed = _train(tmp_path / "resumed", epochs=2, ckpt_path=str(saved))
    assert [k for k in whole if not torch.equal(whole[k], resumed[k])] == []


@pytest.mark.slow
def test_check_resume_at_an_epoch_end_takes_the_epoch_end_checkpoint_path(tmp_path):
    # 8 batches per epoch: the stop at 8 saves where ModelCheckpoint saves (train epoch end).
    command = [sys.executable, str(SCRIPTS / "lightning_epochs.py")]
    proc = check("--resume-at", "8", command=command, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "REPRODUCIBLE: 3 runs x 16 steps bitwise identical" in proc.stdout


@pytest.mark.rng_changes
@pytest.mark.parametrize(("stop", "epochs_done"), [(8, 1), (7, 0)])
def test_a_stop_at_an_epochs_last_batch_saves_an_epoch_end_checkpoint(
    clean_env, tmp_path, stop, epochs_done
):
    clean_env.setenv("TORCHREPRO_CHECKPOINT", str(tmp_path / "ckpt.pt"))
    clean_env.setenv("TORCHREPRO_STOP_AT", str(stop))
    clean_env.syspath_prepend(str(SCRIPTS))
    with pytest.raises(SystemExit):
        _train(tmp_path, epochs=2)
    saved = torch.load(tmp_path / "ckpt.pt.lightning.ckpt", weights_only=False)
    assert saved["global_step"] == stop
    assert saved["loops"]["fit_loop"]["epoch_progress"]["total"]["processed"] == epochs_done


@pytest.mark.rng_changes
@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_a_reload_after_fit_keeps_the_fits_trace(clean_env, tmp_path, stage):
    clean_env.syspath_prepend(str(SCRIPTS))
    from lightning_resume import Module, Noisy

    class Evaluated(Module):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.training_step(batch, batch_idx)

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.training_step(batch, batch_idx)

        def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0])

    trace_path = tmp_path / "trace.jsonl"
    clean_env.setenv("TORCHREPRO_TRACE", str(trace_path))
    callback = ReproCallback(seed=0)
    model = Evaluated()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        callbacks=[callback, pl.callbacks.ModelCheckpoint(save_top_k=-1)],
        logger=False,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torchrepro.DataLoader(Noisy(), batch_size=8, shuffle=True, seed=0)
    with torchrepro.deterministic("strict"):
        trainer.fit(model, loader)
        # the first epoch's checkpoint, as ckpt_path="best" names it with a monitor
        getattr(trainer, stage)(model, loader, ckpt_path=str(next(tmp_path.rglob("epoch=0*"))))
    assert callback.trace is not None
    callback.trace.close()
    assert callback.trace.steps == 16
    assert read_trace(trace_path).steps == list(range(1, 17))


# -- manual optimization, several optimizers (issue 24) -----------------------------------


@pytest.mark.rng_changes
def test_manual_optimization_counts_one_step_per_batch_and_stops_there(clean_env, tmp_path):
    clean_env.syspath_prepend(str(SCRIPTS))
    from lightning_gan import train

    clean_env.setenv("TORCHREPRO_TRACE", str(tmp_path / "trace.jsonl"))
    with torchrepro.deterministic("strict"):
        whole, trainer = train()
    assert trainer.global_step == 32  # two optimizer steps per batch
    assert read_trace(tmp_path / "trace.jsonl").steps == list(range(1, 17))

    clean_env.setenv("TORCHREPRO_TRACE", str(tmp_path / "resumed.jsonl"))
    clean_env.setenv("TORCHREPRO_CHECKPOINT", str(tmp_path / "ckpt.pt"))
    clean_env.setenv("TORCHREPRO_STOP_AT", "5")  # odd: global_step is never 5
    with torchrepro.deterministic("strict"), pytest.raises(SystemExit):
        train()
    saved = torch.load(tmp_path / "ckpt.pt.lightning.ckpt", weights_only=False)
    assert saved["global_step"] == 10
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 5
    clean_env.delenv("TORCHREPRO_STOP_AT")
    with torchrepro.deterministic("strict"):
        resumed, _ = train()
    assert read_trace(tmp_path / "resumed.jsonl").steps == list(range(1, 17))
    differing = [
        k for k, v in whole.state_dict().items() if not torch.equal(v, resumed.state_dict()[k])
    ]
    assert differing == []


@pytest.mark.slow
def test_check_resume_at_with_manual_optimization_is_reproducible(tmp_path):
    command = [sys.executable, str(SCRIPTS / "lightning_gan.py")]
    proc = check("--resume-at", "5", command=command, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "REPRODUCIBLE: 3 runs x 16 steps bitwise identical" in proc.stdout
