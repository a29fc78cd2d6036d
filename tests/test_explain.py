"""Which environment difference: ranking by the evidence, and `torchrepro compare`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torchrepro._cli import main
from torchrepro.check._explain import explain, rank_differences
from torchrepro.trace._compare import read_trace

BASE = {
    "torch": {"version": "2.4.0", "cudnn": "9.1.0"},
    "gpus": [{"name": "A100"}],
    "determinism": {"deterministic_algorithms": [True, False]},
    "env": {"TORCHREPRO_SEED": "0", "TORCHREPRO_NUM_WORKERS": "0"},
    "hostname": "a",
}


def _other(**changes: object) -> dict:
    fp = json.loads(json.dumps(BASE))
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = fp
        for part in path:
            node = node[part]
        node[last] = value
    return fp


def _keys(suspects) -> list[str]:
    return [s.difference.key for s in suspects]


def test_without_evidence_the_order_is_env_diffs():
    b = _other(torch__cudnn="9.3.0", env__TORCHREPRO_SEED="1", hostname="b")
    assert _keys(rank_differences(BASE, b)) == ["torch.cudnn", "env.TORCHREPRO_SEED"]


@pytest.mark.parametrize(
    ("batch_differs", "first"), [(True, "env.TORCHREPRO_SEED"), (False, "torch.cudnn")]
)
def test_the_batch_decides_between_data_and_model(batch_differs, first):
    b = _other(torch__cudnn="9.3.0", env__TORCHREPRO_SEED="1")
    ranked = rank_differences(BASE, b, first_step=1, batch_differs=batch_differs)
    assert _keys(ranked)[0] == first
    assert ranked[0].likelihood == "high" and ranked[0].why


def test_a_late_divergence_points_at_run_to_run_differences():
    b = _other(torch__version="2.5.0", determinism__deterministic_algorithms=[False, False])
    from_start = rank_differences(BASE, b, first_step=1, batch_differs=False)
    late = rank_differences(BASE, b, first_step=40, first_traced_step=1, batch_differs=False)
    assert _keys(from_start)[0] == "torch.version"
    assert _keys(late)[0].startswith("determinism")
    assert "earlier steps agreed" in late[-1].why


def test_num_workers_is_a_suspect_only_when_the_batch_differed():
    b = _other(env__TORCHREPRO_NUM_WORKERS="2")
    assert rank_differences(BASE, b, first_step=1, batch_differs=False) == []
    (suspect,) = rank_differences(BASE, b, first_step=1, batch_differs=True)
    assert suspect.difference.key == "env.TORCHREPRO_NUM_WORKERS"
    assert "other loaders' batches depend on it" in suspect.why


def _trace(path: Path, fingerprint: dict | None, values: list[float]) -> Path:
    header = {"format": "torchrepro-trace", "version": 2}
    if fingerprint is not None:
        header["fingerprint"] = fingerprint
    lines = [json.dumps(header)]
    for step, v in enumerate(values, start=1):
        entry = {
            "name": "fc.weight",
            "kind": "param",
            "checksum": f"{int(v * 1000):016x}",
            "norm": v,
        }
        lines.append(json.dumps({"step": step, "entries": [entry]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_compare_names_the_result_changing_header_field_first(tmp_path, capsys):
    a = _trace(tmp_path / "a.jsonl", BASE, [1.0, 2.0, 3.0])
    other = _other(torch__cudnn="9.3.0", hostname="b", env__TORCHREPRO_NUM_WORKERS="4")
    b = _trace(tmp_path / "b.jsonl", other, [1.0, 2.5, 3.5])
    assert main(["compare", str(a), str(b)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f'DIVERGED at step 2 (run "{b}" vs "{a}")'
    suspects = [line.strip() for line in out if line.strip().startswith("[")]
    assert suspects[0].startswith("[") and "torch.cudnn: 9.1.0 vs 9.3.0" in suspects[0]
    assert not any("hostname" in s for s in suspects)

    assert main(["compare", "--json", str(a), str(b)]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["suspects"][0]["key"] == "torch.cudnn"
    assert data["comparison"]["first_step"] == 2
    assert {d["key"] for d in data["differences"]} >= {"torch.cudnn", "hostname"}


def test_compare_identical_and_unreadable(tmp_path, capsys):
    a = _trace(tmp_path / "a.jsonl", BASE, [1.0, 2.0])
    assert main(["compare", str(a), str(a)]) == 0
    assert capsys.readouterr().out.startswith("IDENTICAL: 2 traced steps")
    assert main(["compare", str(a), str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_traces_without_a_fingerprint_say_so(tmp_path):
    a = _trace(tmp_path / "a.jsonl", None, [1.0])
    b = _trace(tmp_path / "b.jsonl", BASE, [2.0])
    found = explain(read_trace(a), read_trace(b))
    assert found.suspects == [] and "no environment fingerprint in the header of" in found.note
    assert str(a) in found.note and str(b) not in found.note


def _header_with_loader(path: Path, fingerprint: dict, iterable: bool) -> Path:
    _trace(path, fingerprint, [1.0, 2.0])
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    header["facts"] = {"loaders": [{"num_workers": 0, "iterable": iterable}]}
    path.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    return path


@pytest.mark.parametrize("iterable", [False, True])
def test_num_workers_with_an_iterable_dataset_is_not_called_harmless(tmp_path, iterable):
    # Issue 23, rule 8: an IterableDataset's batches depend on num_workers today.
    a = _header_with_loader(tmp_path / "a.jsonl", BASE, iterable)
    b = _header_with_loader(tmp_path / "b.jsonl", _other(env__TORCHREPRO_NUM_WORKERS="2"), iterable)
    found = explain(read_trace(a), read_trace(b))
    (workers,) = [d for d in found.differences if d.key == "env.TORCHREPRO_NUM_WORKERS"]
    assert ("do not depend on it" in workers.reason) is not iterable
    assert workers.changes_results is iterable
    assert (_keys(found.suspects) == ["env.TORCHREPRO_NUM_WORKERS"]) is iterable
    if iterable:
        assert "IterableDataset" in str(found.suspects[0])


def test_a_loader_notes_whether_it_reads_an_iterable_dataset():
    import torch

    import torchrepro
    from torchrepro.core import _runinfo

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(4))

    seen = []
    for dataset in (Stream(), list(range(4))):
        _runinfo.clear()
        next(iter(torchrepro.DataLoader(dataset, batch_size=2, seed=0)))
        seen.append(_runinfo.facts()["loaders"][-1]["iterable"])
    _runinfo.clear()
    assert seen == [True, False]
