"""Trace format version 2: headers with observed facts, bounded reading, exact records."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import torchrepro
from torchrepro.core import _runinfo
from torchrepro.trace._compare import TraceError, compare_traces, read_trace
from torchrepro.trace._trace import Trace


@pytest.fixture(autouse=True)
def _fresh_runinfo() -> Any:
    _runinfo.clear()
    with torchrepro.isolated_rng():  # model initialisation and seeding draw from the globals
        yield
    _runinfo.clear()


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_header_records_observed_facts_and_full_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    try:
        torchrepro.seed_everything(123)
        loader = torchrepro.DataLoader(list(range(8)), batch_size=4, num_workers=0)
        model = torch.nn.Linear(2, 1)
        checkpoint = tmp_path / "c.pt"
        torchrepro.save_checkpoint(checkpoint, model=model)
        torchrepro.load_checkpoint(checkpoint, model=model)
        trace = Trace(path)
        for batch in loader:
            trace.step(loss=float(batch.sum()), model=model)
    finally:
        os.environ.pop("TORCHREPRO_SEED", None)
    header = _lines(path)[0]
    assert header["version"] == 3
    facts = header["facts"]
    assert facts["seed"] == 123
    assert facts["loaders"] == [{"num_workers": 0, "iterable": False}]
    assert facts["world_size"] == 1
    assert facts["torch_threads"] == torch.get_num_threads()
    assert "resumed_from" in facts
    assert header["fingerprint"]["torch"]["version"] == torch.__version__
    assert len(header["fingerprint_digest"]) == 16


def test_checkpointer_resume_is_a_fact(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 1)
    ckpt = torchrepro.Checkpointer(tmp_path / "c.pt", every=3, model=model)
    for _ in range(3):
        ckpt.step()
    again = torchrepro.Checkpointer(tmp_path / "c.pt", every=3, model=model)
    again.resume()
    assert _runinfo.facts()["resumed_from"] == 3


def test_a_resumed_process_appends_its_own_header(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    first = Trace(path)
    for i in range(3):
        first.step(loss=float(i))
    state = first.state_dict()
    first.close()
    _runinfo.note("resumed_from", 3)
    second = Trace(path)
    second.load_state_dict(state)
    second.step(loss=3.0)
    data = read_trace(path)
    assert data.steps == [1, 2, 3, 4]
    assert [h["facts"]["resumed_from"] for h in data.headers] == [None, 3]
    assert [[r["step"] for r in records] for _, records in data.segments()] == [[1, 2, 3], [4]]


def test_resume_onto_a_shorter_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    trace = Trace(path)
    trace.step(loss=1.0)
    trace.close()
    with pytest.raises(TraceError, match=r"last traced step up to 10 is 1, expected 10; .*gap"):
        Trace(path).load_state_dict({"version": 1, "step": 10})


def test_python_int_losses_are_recorded_exactly(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    Trace(a).step(loss=2**53)
    Trace(b).step(loss=2**53 + 1)
    assert _lines(a)[1]["entries"][0]["value"] == 2**53
    assert _lines(b)[1]["entries"][0]["value"] == 2**53 + 1
    result = compare_traces(a, b)
    assert not result.identical
    assert result.entries[0].format().startswith("loss: value")  # not "loss loss:"
    with pytest.raises(ValueError, match="must fit in int64"):
        Trace(tmp_path / "c").step(loss=2**70)


def test_environment_variable_wins_over_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TORCHREPRO_TRACE", str(tmp_path / "env.jsonl"))
    monkeypatch.setattr("torchrepro.trace._trace._precedence_logged", False)
    with caplog.at_level(logging.INFO, logger="torchrepro"):
        trace = Trace(tmp_path / "script.jsonl")
        Trace(tmp_path / "script.jsonl")
    assert trace.path == str(tmp_path / "env.jsonl")
    messages = [
        r.getMessage() for r in caplog.records if "replaces the Trace path" in r.getMessage()
    ]
    assert len(messages) == 1  # once per process


def test_a_failed_write_is_cut_back_to_the_last_complete_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.jsonl"
    trace = Trace(path)
    trace.step(loss=1.0)
    real_write = os.write

    def full_disk(fd: int, data: Any) -> int:
        real_write(fd, bytes(data[:10]))  # half a line reaches the file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError, match=r"cannot write trace step 2 .* cut back"):
        trace.step(loss=2.0)
    monkeypatch.setattr(os, "write", real_write)
    trace.step(loss=3.0)
    trace.close()
    data = read_trace(path)
    assert data.steps == [1, 3]
    assert not data.torn


def test_batch_checksums_tell_data_from_model(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 1)
    x = torch.ones(3, 2)

    def run(path: Path, batch: torch.Tensor, nudge: bool) -> None:
        m = torch.nn.Linear(2, 1)
        m.load_state_dict(model.state_dict())
        if nudge:
            with torch.no_grad():
                m.bias.add_(1e-3)
        trace = Trace(path)
        trace.step(loss=m(batch).sum(), model=m, batch=(batch, {"y": torch.zeros(3)}))
        trace.close()

    run(tmp_path / "ref", x, False)
    run(tmp_path / "data", x * 2, False)
    run(tmp_path / "model", x, True)
    data = compare_traces(tmp_path / "ref", tmp_path / "data")
    assert data.batch_differs is True
    assert "batch differs: data pipeline" in data.format()
    computation = compare_traces(tmp_path / "ref", tmp_path / "model")
    assert computation.batch_differs is False
    assert "batch identical: the model's computation differed" in computation.format()
    assert computation.to_dict()["batch_differs"] is False


def test_loader_batches_are_recorded_without_arguments(tmp_path: Path) -> None:
    loader = torchrepro.DataLoader(torch.arange(8.0), batch_size=4, seed=0)
    trace = Trace(tmp_path / "t")
    for batch in loader:
        trace.step(loss=batch.sum())
    trace.close()
    entries = [r["entries"] for r in read_trace(tmp_path / "t").records]
    assert all(e[-1]["kind"] == "batch" and e[-1]["tensors"] == 1 for e in entries)
    assert entries[0][-1]["checksum"] != entries[1][-1]["checksum"]


def test_a_step_records_only_the_batch_handed_out_since_the_previous_step(tmp_path: Path) -> None:
    loader = torchrepro.DataLoader(torch.arange(8.0), batch_size=4, seed=0)
    trace = Trace(tmp_path / "t")
    batch = next(iter(loader))
    trace.step(loss=batch.sum())
    trace.step(loss=batch.sum())  # no new batch: an earlier step's must not be recorded again
    trace.close()
    first, second = (r["entries"] for r in read_trace(tmp_path / "t").records)
    assert [e["kind"] for e in first] == ["loss", "batch"]
    assert [e["kind"] for e in second] == ["loss"]


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    return path


HEADER = '{"format": "torchrepro-trace", "version": 2}\n'


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"format": "torchrepro-trace", "version": 1}\n', "version 1.*re-run the command"),
        (HEADER + '{"step": 1, "entries": []}\n{"step": 1, "entries": []}\n', "step 1 repeats"),
        (HEADER + '{"step": 2, "entries": []}\n{"step": 1, "entries": []}\n', "goes back"),
        (HEADER + "[" * 100_000 + "]" * 100_000 + "\n" + HEADER, "nested too deeply"),
        (HEADER + '{"step": ' + "9" * 5000 + ', "entries": []}\n' + HEADER, "corrupted"),
        (b"\xff\xfe\x00garbage\n", "not a torchrepro trace"),
        (HEADER.encode() + b'{"step": 1, "entries": [\xff]}\n' + HEADER.encode(), "corrupted"),
    ],
)
def test_hostile_or_old_files_give_a_trace_error(
    tmp_path: Path, content: str | bytes, message: str
) -> None:
    with pytest.raises(TraceError, match=message):
        read_trace(_write(tmp_path / "t", content))


def test_devices_and_fifos_are_refused_without_blocking(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="not a regular file"):
        read_trace("/dev/zero")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(TraceError, match="not a regular file"):
        read_trace(fifo)


def test_size_is_bounded(tmp_path: Path) -> None:
    path = _write(tmp_path / "t", HEADER + '{"step": 1, "entries": []}\n')
    with pytest.raises(TraceError, match="more than max_bytes=10"):
        read_trace(path, max_bytes=10)


def test_empty_traces_are_not_identical(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", HEADER)
    b = _write(tmp_path / "b", HEADER)
    with pytest.raises(TraceError, match="has no traced step: nothing to compare"):
        compare_traces(a, b)
