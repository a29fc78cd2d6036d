"""A drawn seed under torch.distributed: every rank must train on the same one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

import torchrepro

CODE = """
import torch.distributed as dist, torchrepro
dist.init_process_group("gloo")
seed = torchrepro.seed_everything()
order = torchrepro.DataLoader(list(range(16)), batch_size=4, shuffle=True)
print(seed, [b.tolist() for b in order])
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_every_rank_uses_rank_0s_drawn_seed():
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if k != "TORCHREPRO_SEED"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CODE],
            env={
                **base,
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "TORCHREPRO_DIST_TIMEOUT": "60",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    seeds = [out.split(" ", 1)[0] for out, _ in outs]
    assert seeds[0] == seeds[1]  # each rank drew its own; rank 0's draw won on both
    # the two ranks split one global order: together they cover every sample once
    batches = [eval(out.split(" ", 1)[1]) for out, _ in outs]
    assert sorted(x for rank in batches for batch in rank for x in batch) == list(range(16))


def test_no_seed_under_a_launcher_before_the_process_group_is_refused(monkeypatch):
    monkeypatch.delenv("TORCHREPRO_SEED", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2 .*TORCHREPRO_SEED=0 torchrun"):
        torchrepro.seed_everything()
