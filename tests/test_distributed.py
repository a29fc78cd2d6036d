"""torch.distributed (gloo on CPU) with 1, 2 and 3 processes started by the tests themselves."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchrepro.data._sampler import Order

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

# End-to-end: starts training processes (minutes in all); -m 'not slow' skips it.
pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).resolve().parent / "scripts"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_digits_ddp.py"
GLOBAL_BATCH = 12  # divisible by 1, 2 and 3, so global batches agree across world sizes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(script: str, world: int, *args: str) -> None:
    """Start `world` ranks of a script, wait for all, and fail if any failed or hung."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "PYTHONHASHSEED": "0",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(SCRIPTS / script), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errors = []
    try:
        for rank, proc in enumerate(procs):
            _out, err = proc.communicate(timeout=240)
            if proc.returncode != 0:
                errors.append(f"rank {rank} exited {proc.returncode}:\n{err[-3000:]}")
    finally:
        for proc in procs:  # never leave a rank behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not errors, "\n".join(errors)


@pytest.fixture(scope="module")
def data_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    tmp = tmp_path_factory.mktemp("dist-data")
    runs = {}
    for world, workers in ((1, 0), (2, 2), (3, 0)):
        out = tmp / f"w{world}.pt"
        _launch("dist_data.py", world, str(out), str(GLOBAL_BATCH), str(workers))
        runs[world] = torch.load(out, weights_only=False)
    return runs


def _global_batches(run: dict, drop_last: bool) -> list[list[dict[int, torch.Tensor]]]:
    return run[f"drop_last={drop_last}"]["epochs"]


@pytest.mark.parametrize("drop_last", [False, True])
def test_global_batches_and_augmentations_agree_across_world_sizes(data_runs, drop_last):
    reference = _global_batches(data_runs[1], drop_last)
    for world in (2, 3):
        epochs = _global_batches(data_runs[world], drop_last)
        assert len(epochs) == len(reference) == 2
        for epoch, (ref_batches, batches) in enumerate(zip(reference, epochs, strict=True)):
            assert len(batches) == len(ref_batches), (world, epoch)
            seen: dict[int, torch.Tensor] = {}
            for number, (ref_ranks, ranks) in enumerate(zip(ref_batches, batches, strict=True)):
                ref_samples = ref_ranks[0]
                samples: dict[int, torch.Tensor] = {}
                for per_rank in ranks:
                    for index, tensor in per_rank.items():
                        samples.setdefault(index, tensor)
                        assert torch.equal(samples[index], tensor)
                # The same samples in each global batch, each with the same augmentation.
                assert ref_samples.keys() <= samples.keys(), (world, epoch)
                for index, tensor in ref_samples.items():
                    assert torch.equal(samples[index], tensor), (world, epoch, index)
                padding = samples.keys() - ref_samples.keys()
                if padding:  # only the last, partial global batch is padded, with earlier samples
                    assert not drop_last and number == len(batches) - 1
                    for index in padding:
                        assert torch.equal(samples[index], seen[index])
                seen.update(ref_samples)


def test_every_rank_gets_the_same_number_of_batches_and_the_same_state(data_runs):
    for world in (2, 3):
        for drop_last in (False, True):
            run = data_runs[world][f"drop_last={drop_last}"]
            for batch in run["epochs"][0]:
                sizes = {len(per_rank) for per_rank in batch}
                assert len(sizes) == 1  # equal batch sizes on every rank: nobody waits
            for states in run["states"]:
                assert all(state == states[0] for state in states)
    # 50 samples, global batch 12: 4 full + a partial of 2, padded to ceil(2/3)*3 for world 3
    last = data_runs[3]["drop_last=False"]["epochs"][0][-1]
    assert [len(per_rank) for per_rank in last] == [1, 1, 1]
    assert len(data_runs[3]["drop_last=True"]["epochs"][0]) == 4


def test_epochs_differ(data_runs):
    first, second = _global_batches(data_runs[2], True)
    assert first[0][0].keys() != second[0][0].keys()


def test_per_rank_seeding(data_runs):
    masks = data_runs[3]["per_rank=False"]
    assert all(torch.equal(m, masks[0]) for m in masks)
    masks = data_runs[3]["per_rank=True"]
    assert not torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[1], masks[2])


def test_resume_with_another_world_size(tmp_path):
    ckpt, saved, loaded = tmp_path / "c.pt", tmp_path / "saved.pt", tmp_path / "loaded.pt"
    _launch("dist_resume.py", 2, "save", str(ckpt), str(saved), "5")
    _launch("dist_resume.py", 3, "load", str(ckpt), str(loaded))
    before = torch.load(saved, weights_only=False)
    after = torch.load(loaded, weights_only=False)
    assert before[0]["state"] == before[1]["state"]
    for rank, result in enumerate(after):
        assert "saved with world size 2, this run has world size 3" in result["strict_error"]
        assert any("re-derived from the seed" in w for w in result["warnings"])
        # 5 global batches of 2 x 4 = 40 samples consumed; world 3 reads 12 per global batch,
        # so it continues from sample 36 (rounded down to a whole batch: none skipped).
        # The global order of epoch 0 (world size 1), as the script's first loader draws it.
        whole = Order(length=100, batch_size=1, drop_last=False, shuffle=True, seed=3)
        perm = list(whole.indices(0, 0))
        assert result["next"] == perm[36 + 4 * rank : 36 + 4 * (rank + 1)]


def test_ddp_digits_loop_is_reproducible_across_workers_and_resume(tmp_path):
    pytest.importorskip("torchvision")
    pytest.importorskip("sklearn")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TORCHREPRO_SEED", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torchrepro",
            "check",
            "--vary",
            "num_workers=2,0",
            "--resume-at",
            "5",
            "--",
            *torchrun,
            str(EXAMPLE),
            "--limit",
            "256",
            "--batch-size",
            "32",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "REPRODUCIBLE: 4 runs x 16 steps bitwise identical" in proc.stdout
