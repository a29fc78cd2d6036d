"""Comparing traces: identical, a one-ulp nudge, later steps, different lengths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from torchrepro.core._rng import isolated_rng
from torchrepro.trace._compare import Comparison, TraceData, TraceError, compare_traces, read_trace
from torchrepro.trace._trace import Trace


def _train(
    path: Path,
    *,
    steps: int = 12,
    nudge_at: int | None = None,
    every: int = 1,
    state_every: int = 1,
    after_update: bool = False,
    close: bool = True,
) -> None:
    """A tiny deterministic training loop; optionally nudge one weight by one ulp.

    The nudge comes before step ``nudge_at``'s forward, or with ``after_update`` after its
    optimizer step (so its loss is still the same).
    """
    g = torch.Generator().manual_seed(0)
    with isolated_rng():  # default initialisation draws from the global RNG
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
    trace = Trace(path, every=every, state_every=state_every)

    def nudge() -> None:
        with torch.no_grad():
            w = model[2].weight
            w[0, 3] = torch.nextafter(w[0, 3], torch.tensor(float("inf")))

    for step in range(1, steps + 1):
        if step == nudge_at and not after_update:
            nudge()
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == nudge_at and after_update:
            nudge()
        trace.step(loss=loss, model=model)
    if close:
        trace.close()
    else:
        trace._unrecorded = None  # as if the process was killed: no end line


def test_identical_runs(tmp_path: Path) -> None:
    _train(tmp_path / "a")
    _train(tmp_path / "b")
    result = compare_traces(tmp_path / "a", tmp_path / "b")
    assert result.identical
    assert (result.steps_compared, result.first_step, result.entries, result.notes) == (
        12,
        None,
        [],
        [],
    )
    assert result.verdict == 'IDENTICAL: 12 traced steps bitwise identical (run "run 2" vs "run 1")'


def test_one_ulp_nudge_is_found_at_its_step_and_named(tmp_path: Path) -> None:
    """Holds compare's guarantees, not this CPU's rounding.

    Guaranteed: step 7 is the first divergent step (steps 1-6 ran the same code on the same
    bits), and the entries come in recording order. The nudged ``2.weight`` is among those
    named on any IEEE CPU: step 7's update of the nudged element (-0.248 minus 0.1 x grad, -0.0082)
    stays in the weight's binade, so its ulp cannot round away, and the nudge moves that
    gradient by ulps of the gradient, some 100x too little to cancel it. Not guaranteed, so
    not asserted: whether the change also reaches other tensors' bits (``0.weight`` on an
    AVX-512 Xeon, not elsewhere) and how many later steps.
    """
    _train(tmp_path / "a")
    _train(tmp_path / "b", nudge_at=7)
    result = compare_traces(tmp_path / "a", tmp_path / "b", names=("run 1", "nudged"))
    assert not result.identical
    assert result.first_step == 7
    assert result.exact and result.earliest_step == 7
    named = [(e.kind, e.name) for e in result.entries]
    assert ("param", "2.weight") in named
    # "in recording order": the order step 7's record holds them in (the loss, then the
    # parameters in the model's order), taken from the trace, not from compare
    (record,) = [r for r in read_trace(tmp_path / "a").records if r["step"] == 7]
    recorded = [(e["kind"], e["name"]) for e in record["entries"]]
    assert named == [k for k in recorded if k in named]
    assert result.verdict == 'DIVERGED at step 7 (run "nudged" vs "run 1")'
    text = result.format()
    assert text.splitlines()[0] == result.verdict
    assert "param 2.weight: checksum" in text  # norms are recorded every 10 steps
    assert "step 7 recorded no norms" in text
    later = result.later_differing_steps
    assert 0 <= later <= 5  # steps 8-12; how many the ulp reaches is the CPU's rounding
    assert f"{later} later compared step{'s' if later != 1 else ''} also differ" in text
    json.dumps(result.to_dict(), allow_nan=False)


def test_state_every_bounds_the_first_divergent_step(tmp_path: Path) -> None:
    """With the state recorded every 10 steps, a nudge at step 7 is bounded, never missed."""
    _train(tmp_path / "a", state_every=10)
    _train(tmp_path / "b", nudge_at=7, state_every=10, after_update=True)
    result = compare_traces(tmp_path / "a", tmp_path / "b", names=("run 1", "nudged"))
    assert not result.identical and not result.exact
    # the losses of steps 1-7 are equal (the nudge follows step 7's update)
    assert result.earliest_step is not None and result.first_step is not None
    assert result.earliest_step <= 7 < result.first_step <= 10
    assert result.verdict == (
        f'DIVERGED at a step in {result.earliest_step}-{result.first_step} (run "nudged" vs "run 1")'
    )
    assert "TORCHREPRO_TRACE_STATE_EVERY=1" in result.format()
    assert result.to_dict()["exact"] is False


def test_state_every_records_the_state_at_state_steps_only(tmp_path: Path) -> None:
    _train(tmp_path / "a", state_every=5)
    trace = read_trace(tmp_path / "a")
    held = [r["step"] for r in trace.records if any(e["kind"] == "param" for e in r["entries"])]
    assert held == [1, 5, 10]  # the process's first traced step, then every 5th
    assert [r["state"] for r in trace.records] == [s in (1, 5, 10) for s in range(1, 13)]
    assert trace.header["state_every"] == 5
    # after step 12 (no state), the trace ends with the state it closed with
    assert trace.end is not None and trace.end["step"] == 12
    assert [e["kind"] for e in trace.end["entries"]] == ["param"] * 4


def test_a_change_after_the_last_state_step_is_found_in_the_end_state(tmp_path: Path) -> None:
    """The last update of a run is compared even when no step record held the state."""
    _train(tmp_path / "a", state_every=10)
    _train(tmp_path / "b", nudge_at=12, state_every=10, after_update=True)
    result = compare_traces(tmp_path / "a", tmp_path / "b", names=("run 1", "nudged"))
    assert not result.identical
    assert (result.first_step, result.earliest_step, result.at_end) == (12, 11, True)
    # exact, on any CPU: the nudge follows step 12's update and nothing is computed after it
    assert [(e.kind, e.name) for e in result.entries] == [("param", "2.weight")]
    assert "the state after step 12, which the runs ended with," in result.format()


def test_identical_sparse_traces_compare_their_end_states(tmp_path: Path) -> None:
    _train(tmp_path / "a", state_every=5)
    _train(tmp_path / "b", state_every=5)
    result = compare_traces(tmp_path / "a", tmp_path / "b")
    assert result.identical and result.end_compared and result.state_steps == 3
    _train(tmp_path / "c", state_every=5, close=False)  # killed: no end line
    unended = compare_traces(tmp_path / "a", tmp_path / "c")
    assert unended.identical and not unended.end_compared
    assert any("the state after step 12 was not compared" in n for n in unended.notes)


def test_nudge_after_the_loss_names_the_parameter_first(tmp_path: Path) -> None:
    header = {"format": "torchrepro-trace", "version": 2}
    loss = {
        "name": "loss",
        "kind": "loss",
        "checksum": "aa",
        "bits": "0x3f800000",
        "value": 1.0,
        "norm": 1.0,
    }

    def param(checksum: str, norm: float) -> dict[str, object]:
        return {
            "name": "fc.weight",
            "kind": "param",
            "checksum": checksum,
            "norm": norm,
            "dtype": "float32",
        }

    a = TraceData(
        "a", header, [{"step": s, "entries": [loss, param("01", 2.0)]} for s in range(1, 10)]
    )
    b = TraceData(
        "b",
        header,
        [{"step": s, "entries": [loss, param("01" if s < 7 else "02", 2.0)]} for s in range(1, 10)],
    )
    result = compare_traces(a, b)
    assert result.first_step == 7
    assert [(e.kind, e.name) for e in result.entries] == [("param", "fc.weight")]
    entry = result.entries[0]
    assert (entry.reference_checksum, entry.other_checksum, entry.difference) == ("01", "02", 0.0)
    assert "(equal; bits differ)" in entry.format()
    assert result.later_differing_steps == 2


def test_shorter_trace_is_a_mismatch(tmp_path: Path) -> None:
    _train(tmp_path / "a", steps=12)
    _train(tmp_path / "b", steps=9)
    result = compare_traces(tmp_path / "a", tmp_path / "b")
    assert not result.identical
    assert (result.first_step, result.steps_compared, result.entries) == (10, 9, [])
    assert result.notes == [
        'run "run 2" lacks 3 traced step(s) that the other has (steps 10-12); it traced 9 step(s)'
    ]
    assert result.to_dict()["first_step"] == 10


def test_every_mismatch_is_noted(tmp_path: Path) -> None:
    _train(tmp_path / "a", steps=4)
    _train(tmp_path / "b", steps=4, every=2)
    result = compare_traces(tmp_path / "a", tmp_path / "b")
    assert result.first_step == 1
    assert any("different every: 1 vs 2" in n for n in result.notes)


def test_missing_entries_and_none_grads() -> None:
    header = {"format": "torchrepro-trace", "version": 2}
    a = TraceData(
        "a",
        header,
        [{"step": 1, "entries": [{"name": "w", "kind": "grad", "checksum": "01", "norm": 1.0}]}],
    )
    b = TraceData(
        "b",
        header,
        [
            {
                "step": 1,
                "entries": [
                    {"name": "w", "kind": "grad", "checksum": None},
                    {"name": "x", "kind": "tensor", "checksum": "02", "norm": 3.0},
                ],
            }
        ],
    )
    result = compare_traces(a, b, names=("ref", "oth"))
    notes = [e.note for e in result.entries]
    assert notes == ['grad is None in run "oth"', 'only in run "oth"']


def test_torn_line_is_noted_not_fatal(tmp_path: Path) -> None:
    _train(tmp_path / "a", steps=3)
    _train(tmp_path / "b", steps=3)
    with open(tmp_path / "b", "a") as f:
        f.write('{"step": 4, "ent')
    result = compare_traces(tmp_path / "a", tmp_path / "b")
    assert result.identical
    assert result.notes == [
        'run "run 2": a torn last trace line was ignored (the run stopped mid-write)'
    ]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", r"is empty; the run recorded no traced step"),
        ('{"format": "other"}\n', r"is not a torchrepro trace"),
        ("hello\n", r"is not a torchrepro trace"),
        (
            '{"format": "torchrepro-trace", "version": 9}\n',
            r"of format version 9; this torchrepro reads versions 2, 3",
        ),
        (
            '{"format": "torchrepro-trace", "version": 2}\nxx\n{"step": 2, "entries": []}\n',
            r"line 2: corrupted trace line",
        ),
        (
            '{"format": "torchrepro-trace", "version": 2}\n{"step": "1"}\n',
            r"line 2: not a trace record",
        ),
    ],
)
def test_bad_files(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "t"
    path.write_text(content)
    with pytest.raises(TraceError, match=match):
        read_trace(path)


def test_missing_file_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(
        TraceError, match=r"does not exist; did the run create a torchrepro\.Trace\?"
    ):
        read_trace(tmp_path / "nope")
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike, got int"):
        read_trace(3)  # type: ignore[arg-type]
    header = {"format": "torchrepro-trace", "version": 2}
    empty = TraceData("a", header, [])
    with pytest.raises(TypeError, match=r"names must be a tuple of two str"):
        compare_traces(empty, empty, names=["a", "b"])  # type: ignore[arg-type]


def test_comparison_format_truncates_entries() -> None:
    from torchrepro.trace._compare import EntryDiff

    entries = [
        EntryDiff(f"p{i}", "param", "norm", 1.0, float("inf"), float("inf"), "01", "02")
        for i in range(5)
    ]
    result = Comparison(("a", "b"), False, 3, 3, 3, 2, entries, 1, ["n"])
    lines = result.format(max_entries=2).splitlines()
    assert lines == [
        'DIVERGED at step 2 (run "b" vs "a")',
        "  param p0: norm 1.0 vs inf (diff +inf)",
        "  param p1: norm 1.0 vs inf (diff +inf)",
        "  ... and 3 more differing entries at step 2",
        "  1 later compared step also differ",
        "  note: n",
    ]
    assert str(result) == result.format()
    assert (
        json.loads(json.dumps(result.to_dict(), allow_nan=False))["entries"][0]["other_value"]
        == "inf"
    )


def test_garbled_last_line_with_newline_counts_as_torn(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_text(
        '{"format": "torchrepro-trace", "version": 2}\n{"step": 1, "entries": []}\n\0\0\0\n'
    )
    data = read_trace(path)
    assert (data.steps, data.torn) == ([1], True)


@pytest.mark.parametrize("nudge", [False, True])
def test_an_end_line_compares_with_a_last_record_that_held_the_state(
    tmp_path: Path, nudge: bool
) -> None:
    """E.g. a resumed process whose first (state) step is the last: ends still compare."""
    _train(tmp_path / "a", state_every=6)  # states at 1, 6, 12: the last record holds it
    _train(tmp_path / "b", state_every=5, nudge_at=12 if nudge else None, after_update=True)
    assert read_trace(tmp_path / "a").end is None
    assert read_trace(tmp_path / "b").end is not None
    result = compare_traces(tmp_path / "a", tmp_path / "b")
    assert result.end_compared
    if not nudge:
        assert result.identical
        return
    assert (result.first_step, result.earliest_step, result.at_end) == (12, 2, True)
    # exact, on any CPU: the nudge follows step 12's update and nothing is computed after it
    assert [(e.kind, e.name) for e in result.entries] == [("param", "2.weight")]
