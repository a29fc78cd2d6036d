"""Trace: what it records, when, where, and how it resumes."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from torchrepro.core._rng import isolated_rng
from torchrepro.trace._checksum import tensor_checksum
from torchrepro.trace._compare import TraceError, compare_traces, read_trace
from torchrepro.trace._trace import Trace


def _model() -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with isolated_rng():  # default initialisation draws from the global RNG
        model = torch.nn.Sequential(
            torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1)
        )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_loss_params_buffers_grads_and_tensors_in_order(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    model = _model()
    x = torch.ones(5, 3)
    loss = model(x).sum()
    loss.backward()
    model[2].bias.grad = None  # a None gradient is recorded as such
    trace = Trace(path, grads=True, state_every=1)
    extra = torch.arange(6.0).reshape(2, 3).t()
    trace.step(loss=loss, model=model, logits=extra, lr=0.5)
    header, record = _lines(path)
    assert header["format"] == "torchrepro-trace"
    assert header["version"] == 3
    assert record["state"] is True
    assert (header["rank"], header["world_size"], header["every"], header["grads"]) == (
        0,
        1,
        1,
        True,
    )
    assert record["step"] == 1
    kinds = [(e["kind"], e["name"]) for e in record["entries"]]
    params = [n for n, _ in model.named_parameters()]
    buffers = [n for n, _ in model.named_buffers()]
    assert kinds == [
        ("loss", "loss"),
        *[("param", n) for n in params],
        *[("buffer", n) for n in buffers],
        *[("grad", n) for n in params],
        ("tensor", "logits"),
        ("tensor", "lr"),
    ]
    entries = {(e["kind"], e["name"]): e for e in record["entries"]}
    for name, p in model.named_parameters():
        assert entries["param", name]["checksum"] == f"{tensor_checksum(p):016x}"
        assert entries["param", name]["norm"] == pytest.approx(
            float(p.detach().double().norm()), rel=1e-6
        )
    assert entries["grad", "2.bias"]["checksum"] is None
    assert (
        entries["grad", "0.weight"]["checksum"] == f"{tensor_checksum(model[0].weight.grad):016x}"
    )
    assert entries["buffer", "1.num_batches_tracked"]["dtype"] == "int64"
    assert entries["tensor", "logits"]["shape"] == [3, 2]
    assert entries["tensor", "logits"]["checksum"] == f"{tensor_checksum(extra.contiguous()):016x}"
    loss_entry = entries["loss", "loss"]
    assert loss_entry["value"] == loss.item()
    assert loss_entry["bits"] == "0x" + struct.pack(">f", loss.item()).hex()
    assert loss_entry["dtype"] == "float32"


@pytest.mark.parametrize(
    ("loss", "dtype", "bits"),
    [
        (torch.tensor(1.0, dtype=torch.bfloat16), "bfloat16", "0x3f80"),
        (torch.tensor(-2.0, dtype=torch.float16), "float16", "0xc000"),
        (1.5, "float64", "0x3ff8000000000000"),
        (torch.tensor([3], dtype=torch.int64), "int64", "0x0000000000000003"),
    ],
)
def test_loss_bits_and_value(tmp_path: Path, loss: object, dtype: str, bits: str) -> None:
    path = tmp_path / "t.jsonl"
    Trace(path).step(loss=loss)
    entry = _lines(path)[1]["entries"][0]
    assert (entry["dtype"], entry["bits"]) == (dtype, bits)
    assert entry["value"] == float(loss if not isinstance(loss, torch.Tensor) else loss.item())


def test_non_finite_loss_is_strict_json(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    Trace(path).step(loss=torch.tensor(float("nan")))
    text = path.read_text()
    assert "NaN" not in text
    assert _lines(path)[1]["entries"][0]["value"] == "nan"


def test_every_k_traces_multiples_of_k(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    trace = Trace(path, every=3)
    for i in range(10):
        trace.step(loss=float(i))
    assert read_trace(path).steps == [3, 6, 9]
    assert [r["entries"][0]["value"] for r in read_trace(path).records] == [2.0, 5.0, 8.0]
    assert trace.steps == 10


def test_disabled_writes_nothing_and_only_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHREPRO_TRACE", raising=False)
    monkeypatch.chdir(tmp_path)
    trace = Trace()
    assert not trace.enabled
    assert trace.path is None
    trace.step(loss=object(), model="not a model")  # not even looked at
    trace.step()
    assert trace.steps == 2
    assert list(tmp_path.iterdir()) == []


def test_env_var_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sub" / "env.jsonl"
    monkeypatch.setenv("TORCHREPRO_TRACE", str(path))
    trace = Trace()
    trace.step(loss=1.0)
    assert trace.path == str(path)
    assert read_trace(path).steps == [1]


def test_per_rank_suffix_and_non_zero_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.jsonl"
    monkeypatch.setenv("RANK", "1")
    silent = Trace(path)
    silent.step(loss=1.0)
    assert silent.path is None
    assert not path.exists()
    monkeypatch.setenv("TORCHREPRO_TRACE_ALL_RANKS", "1")
    per_rank = Trace(path)
    per_rank.step(loss=1.0)
    assert per_rank.path == f"{path}.rank1"
    assert _lines(Path(f"{path}.rank1"))[0]["rank"] == 1
    monkeypatch.setenv("TORCHREPRO_TRACE_ALL_RANKS", "yes")
    with pytest.raises(
        ValueError, match=r"TORCHREPRO_TRACE_ALL_RANKS must be an integer in \[0, 1\], got 'yes'"
    ):
        Trace(path)


def test_fresh_trace_overwrites_stale_file(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("stale\n")
    trace = Trace(path)
    trace.step(loss=1.0)
    trace.step(loss=2.0)
    assert read_trace(path).steps == [1, 2]


def test_torn_last_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    trace = Trace(path)
    for _ in range(3):
        trace.step(loss=1.0)
    full = path.read_text()
    path.write_text(full[: len(full) - 20])  # a crash in the middle of step 3's line
    data = read_trace(path)
    assert data.steps == [1, 2]
    assert data.torn


def _run(path: Path, steps: range, trace: Trace, model: torch.nn.Module) -> None:
    for i in steps:
        with torch.no_grad():
            model[0].weight.add_(0.5)
        trace.step(loss=float(i), model=model)


def test_resume_continues_numbering_and_drops_steps_after_the_checkpoint(tmp_path: Path) -> None:
    uninterrupted, resumed = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _run(uninterrupted, range(1, 11), Trace(uninterrupted), _model())

    model = _model()
    first = Trace(resumed)
    _run(resumed, range(1, 5), first, model)
    state, weights = first.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
    _run(resumed, range(5, 8), first, model)  # traced, then the process crashes
    assert read_trace(resumed).steps == list(range(1, 8))

    second = Trace(resumed)
    second.load_state_dict(state)
    assert read_trace(resumed).steps == [1, 2, 3, 4]
    model.load_state_dict(weights)
    _run(resumed, range(5, 11), second, model)
    assert second.steps == 10
    data = read_trace(resumed)
    assert len(data.headers) == 2 and data.segment_starts == [0, 4]  # one header per process
    assert compare_traces(uninterrupted, resumed).identical
    lines = resumed.read_text().splitlines()
    assert lines[:5] == uninterrupted.read_text().splitlines()[:5]


def test_resume_into_missing_file_is_a_gap(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    trace = Trace(path)
    with pytest.raises(TraceError, match=r"does not exist, so steps 1-4 would be missing"):
        trace.load_state_dict({"version": 1, "step": 4})
    trace.load_state_dict({"version": 1, "step": 0})  # nothing traced yet: no gap
    trace.step(loss=1.0)
    assert read_trace(path).steps == [1]


def test_resume_refuses_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("my notes\n")
    with pytest.raises(
        TraceError, match=r"cannot continue trace .*notes\.txt.* is not a torchrepro trace"
    ):
        Trace(path).load_state_dict({"version": 1, "step": 4})
    assert path.read_text() == "my notes\n"


def test_state_dict_round_trip_is_plain_and_json_safe(tmp_path: Path) -> None:
    trace = Trace(tmp_path / "t.jsonl", every=2)
    for _ in range(5):
        trace.step(loss=1.0)
    state = json.loads(json.dumps(trace.state_dict()))
    other = Trace(tmp_path / "t.jsonl", every=2)
    other.load_state_dict(state)
    assert other.steps == 5
    assert other.state_dict() == trace.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every": 0}, ValueError, r"every must be an int >= 1, got 0"),
        ({"every": 2.0}, TypeError, r"every must be an int >= 1, got float 2\.0"),
        ({"every": True}, TypeError, r"every must be an int >= 1, got bool True"),
        ({"grads": 1}, TypeError, r"grads must be a bool, got int 1"),
        ({"path": 3}, TypeError, r"path must be a str, os\.PathLike or None, got int 3"),
        ({"path": ""}, ValueError, r"path must be a non-empty path"),
        ({"per_rank": "yes"}, TypeError, r"per_rank must be a bool or None, got str 'yes'"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Trace(**kwargs)


@pytest.mark.parametrize(
    ("state", "error", "match"),
    [
        ([1], TypeError, r"state must be a dict from Trace\.state_dict\(\), got list"),
        ({"version": 2, "step": 1}, ValueError, r"Trace state 'version' must be 1, got 2"),
        ({"version": 1, "step": "3"}, TypeError, r"'step' must be an int >= 0, got str '3'"),
        ({"version": 1, "step": -1}, ValueError, r"'step' must be an int >= 0, got -1"),
    ],
)
def test_bad_state(state: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Trace(None).load_state_dict(state)


def test_bad_step_arguments(tmp_path: Path) -> None:
    trace = Trace(tmp_path / "t.jsonl")
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module or None, got str"):
        trace.step(model="model")
    with pytest.raises(TypeError, match=r"loss must be a torch\.Tensor or a real number, got str"):
        trace.step(loss="0.5")
    with pytest.raises(
        TypeError, match=r"tensor 'x' must be a torch\.Tensor or a real number, got list"
    ):
        trace.step(x=[1.0])


def test_file_is_flushed_each_traced_step(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    trace = Trace(path)
    trace.step(loss=1.0)
    size = os.path.getsize(path)
    trace.step(loss=2.0)
    assert os.path.getsize(path) > size  # visible to another reader without closing anything


def test_members_match_named_parameters_and_buffers_with_tied_weights() -> None:
    from torchrepro.trace._trace import _members

    with isolated_rng():
        model = torch.nn.Sequential(
            torch.nn.Embedding(5, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 5)
        )
    model[2].weight = model[0].weight  # tied: recorded once, under its first name
    model[1].register_buffer("scratch", torch.zeros(2), persistent=False)
    params, buffers = _members(model)
    assert [(n, id(t)) for n, t in params] == [(n, id(t)) for n, t in model.named_parameters()]
    assert [(n, id(t)) for n, t in buffers] == [(n, id(t)) for n, t in model.named_buffers()]


def test_close_then_step_appends_and_context_manager_closes(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with Trace(path) as trace:
        trace.step(loss=1.0)
        assert trace._fd is not None
    assert trace._fd is None
    trace.step(loss=2.0)  # reopens, appending after the header and step 1
    trace.close()
    trace.close()  # idempotent
    assert read_trace(path).steps == [1, 2]
    assert path.read_text().count('"format"') == 1


def _batch_checksum(batch: object) -> dict[str, Any]:
    from torchrepro.trace._trace import _batch_entry

    return _batch_entry(batch)


def test_numpy_leaves_are_checksummed_by_content() -> None:
    # Issue 23, rule 8: a batch of NumPy arrays was recorded by type, so any two matched.
    np = pytest.importorskip("numpy")
    ids = np.arange(8)
    same = _batch_checksum({"x": np.ones((2, 3), np.float32), "id": ids.copy()})
    assert same == _batch_checksum({"x": np.ones((2, 3), np.float32), "id": np.arange(8)})
    changed = ids.copy()
    changed[5] += 1
    other = _batch_checksum({"x": np.ones((2, 3), np.float32), "id": changed})
    assert other["checksum"] != same["checksum"]
    # the dtype, a scalar, text and object arrays count too; none is opaque
    for a, b in [
        (np.zeros(3, np.float32), np.zeros(3, np.float64)),
        (np.int64(3), np.int64(4)),
        (np.array(["a", "b"]), np.array(["a", "c"])),
        (np.array([{"k": 1}], dtype=object), np.array([{"k": 2}], dtype=object)),
        (np.zeros(2, np.uint16), np.ones(2, np.uint16)),
    ]:
        left, right = _batch_checksum([a]), _batch_checksum([b])
        assert left["checksum"] != right["checksum"], (a, b)
        assert "opaque" not in left
    # the same content, strided or not, is the same batch
    grid = np.arange(12).reshape(3, 4)
    assert (
        _batch_checksum(grid[:, ::2])["checksum"]
        == _batch_checksum(np.ascontiguousarray(grid[:, ::2]))["checksum"]
    )


def test_leaves_known_only_by_type_leave_the_batch_unknown(tmp_path: Path) -> None:
    class Blob:
        def __init__(self, value: int) -> None:
            self.value = value

    entry = _batch_checksum({"x": torch.ones(2), "blob": Blob(1)})
    assert entry["opaque"] == 1
    paths = []
    for name, value in (("a", 1), ("b", 2)):
        path = tmp_path / f"{name}.jsonl"
        with Trace(path) as trace:
            trace.step(loss=torch.tensor(float(value)), batch={"blob": Blob(value)})
        paths.append(path)
    comparison = compare_traces(read_trace(paths[0]), read_trace(paths[1]))
    assert comparison.first_step == 1
    # the blobs differ but were never compared: neither "identical" nor "differs"
    assert comparison.batch_differs is None
