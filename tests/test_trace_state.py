"""Trace's state records: every ``state_every`` steps, the first, and the end line.

The invariant: every state a run passes through at a state step, and the state it ends
with, is in the trace; nothing else about the model is claimed. Each test reads the file
back and checks it against checksums computed here, not against the writer's code path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from torchrepro import isolated_rng, tensor_checksum
from torchrepro.trace._compare import TraceError, compare_traces, read_trace
from torchrepro.trace._trace import Trace


def _model() -> torch.nn.Module:
    with isolated_rng():  # the suite checks that tests leave the global RNGs alone
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _train(model: torch.nn.Module, trace: Trace, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        loss = model(torch.ones(5, 3)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        trace.step(loss=loss, model=model)


@pytest.mark.parametrize("state_every", [1, 3, 10])
def test_state_steps_are_the_first_and_every_nth(tmp_path, state_every):
    path = tmp_path / "t.jsonl"
    trace = Trace(path, state_every=state_every)
    _train(_model(), trace, 7)
    held = [r["step"] for r in read_trace(path).records if r["state"]]
    assert held == [s for s in range(1, 8) if s == 1 or s % state_every == 0]
    for record in read_trace(path).records:
        kinds = {e["kind"] for e in record["entries"]}
        assert ("param" in kinds) == record["state"] and "loss" in kinds


def test_close_appends_the_state_the_run_ended_with(tmp_path):
    path = tmp_path / "t.jsonl"
    model = _model()
    trace = Trace(path)
    _train(model, trace, 4)
    assert read_trace(path).end is None  # not yet: the run may go on
    trace.close()
    end = read_trace(path).end
    assert end is not None and end["step"] == 4
    expected = {n: f"{tensor_checksum(t):016x}" for n, t in model.state_dict().items()}
    assert {e["name"]: e["checksum"] for e in end["entries"]} == expected
    trace.close()  # twice: no second end line
    assert sum("end" in line for line in _lines(path)) == 1


def test_no_end_line_after_a_state_step(tmp_path):
    path = tmp_path / "t.jsonl"
    with Trace(path, state_every=2) as trace:
        _train(_model(), trace, 4)
    assert read_trace(path).end is None
    assert not any("end" in line for line in _lines(path))


def test_an_end_line_followed_by_more_steps_is_not_the_end(tmp_path):
    path = tmp_path / "t.jsonl"
    model = _model()
    trace = Trace(path)
    _train(model, trace, 2)
    trace.close()
    _train(model, trace, 2)  # the run went on after close(): the file reopens
    data = read_trace(path)
    assert data.steps == [1, 2, 3, 4] and data.end is None
    trace.close()
    end = read_trace(path).end
    assert end is not None and end["step"] == 4


SCRIPT = """
import sys, torch
from torchrepro import Trace
torch.manual_seed(0)
def main(path, keep_global):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = Trace(path)
    if keep_global:
        globals()["TRACE"] = trace
    for _ in range(3):
        loss = model(torch.ones(2, 3)).sum()
        opt.zero_grad(); loss.backward(); opt.step()
        trace.step(loss=loss, model=model)
    torch.save(model.state_dict(), path + ".weights")
main(sys.argv[1], sys.argv[2] == "1")
"""


@pytest.mark.parametrize("keep_global", [False, True], ids=["collected", "at-exit"])
def test_a_script_that_never_closes_its_trace_still_ends_it(tmp_path, keep_global):
    """A trace dropped when main() returns, or alive until exit, writes its end line."""
    path = tmp_path / "t.jsonl"
    subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), str(path), "1" if keep_global else "0"],
        check=True,
        timeout=120,
    )
    end = read_trace(path).end
    assert end is not None and end["step"] == 3
    weights = torch.load(str(path) + ".weights")
    assert {e["name"]: e["checksum"] for e in end["entries"]} == {
        n: f"{tensor_checksum(t):016x}" for n, t in weights.items()
    }


def test_state_every_from_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHREPRO_TRACE_STATE_EVERY", "1")
    trace = Trace(tmp_path / "t.jsonl", state_every=10)
    _train(_model(), trace, 3)
    assert all(r["state"] for r in read_trace(tmp_path / "t.jsonl").records)
    monkeypatch.setenv("TORCHREPRO_TRACE_STATE_EVERY", "0")
    with pytest.raises(ValueError, match="TORCHREPRO_TRACE_STATE_EVERY"):
        Trace(tmp_path / "u.jsonl")


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_state_every_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="state_every must be an int >= 1"):
        Trace(None, state_every=bad)


def test_a_resumed_process_states_its_first_step_and_still_compares_equal(tmp_path):
    """Resumed at step 4, a process records the state at step 5; the reference does not."""
    ref_path, res_path = tmp_path / "ref.jsonl", tmp_path / "res.jsonl"
    model = _model()
    trace = Trace(ref_path)
    _train(model, trace, 4)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, trace, 4)
    trace.close()
    first = Trace(res_path)
    again = _model()
    _train(again, first, 4)
    first.close()  # the stopped process: an end line for step 4
    resumed = Trace(res_path)
    resumed.load_state_dict(first.state_dict())
    again.load_state_dict(saved)
    _train(again, resumed, 4)
    resumed.close()
    data = read_trace(res_path)
    assert [r["step"] for r in data.records if r["state"]] == [1, 5]
    result = compare_traces(ref_path, res_path)
    assert result.identical and result.end_compared, result.format()


def _write(path: Path, *lines: dict) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_the_reader_takes_version_2_records_as_holding_the_state(tmp_path):
    entry = {"name": "loss", "kind": "loss", "checksum": "01"}
    path = _write(
        tmp_path / "v2.jsonl",
        {"format": "torchrepro-trace", "version": 2},
        {"step": 1, "entries": [entry]},
    )
    assert read_trace(path).records[0]["state"] is True


def test_only_an_end_line_after_the_last_record_counts(tmp_path):
    head = {"format": "torchrepro-trace", "version": 3}
    entry = {"name": "loss", "kind": "loss", "checksum": "01"}
    end = {"end": 1, "entries": [{"name": "w", "kind": "param", "checksum": "02"}]}
    step = lambda n: {"step": n, "state": False, "entries": [entry]}  # noqa: E731
    early = read_trace(_write(tmp_path / "a", head, step(1), end, step(2)))
    assert early.end is None and early.steps == [1, 2]
    wrong = read_trace(_write(tmp_path / "b", head, step(1), step(2), end))
    assert wrong.end is None  # it names step 1, not the last record's
    last = read_trace(_write(tmp_path / "c", head, step(1), end))
    assert last.end == {"step": 1, "entries": end["entries"]}
    with pytest.raises(TraceError, match=r"not a trace record \(\{'end': int"):
        read_trace(_write(tmp_path / "d", head, step(1), {"end": "1", "entries": []}))


def test_no_end_line_when_untraced_steps_moved_the_model_on(tmp_path):
    """With every=3, steps after the last traced one change the model: no mislabelled end."""
    path = tmp_path / "t.jsonl"
    trace = Trace(path, every=3)
    _train(_model(), trace, 7)  # traces 3 and 6; step 7 is counted, not traced
    trace.close()
    data = read_trace(path)
    assert data.steps == [3, 6] and data.end is None
    again = tmp_path / "u.jsonl"
    trace = Trace(again, every=3)
    _train(_model(), trace, 6)
    trace.close()
    end = read_trace(again).end
    assert end is not None and end["step"] == 6
