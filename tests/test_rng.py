from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch

from torchrepro import RNGStateError, TorchreproWarning, get_rng_state, isolated_rng, set_rng_state


def _draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.random()), torch.rand(5)


def _same(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_restores_exactly_after_weights_only_roundtrip():
    with isolated_rng():
        random.gauss(0, 1)  # leaves a cached gaussian in Python's state
        state = _roundtrip(get_rng_state())
        first = _draws()
        set_rng_state(state)
        assert _same(first, _draws())


def test_state_round_trips_through_a_fresh_process(run_python, tmp_path):
    code = """
import random, sys, json, numpy as np, torch, torchrepro
torchrepro.seed_everything(11)
if sys.argv[-1] == "save":
    torch.save(torchrepro.get_rng_state(), "state.pt")
else:
    torchrepro.set_rng_state(torch.load("state.pt", weights_only=True))
print(json.dumps([random.random(), float(np.random.random()), torch.rand(3).tolist()]))
"""
    saved = run_python(code.replace('sys.argv[-1] == "save"', "True")).stdout
    # A process that saved nothing draws from the seed; a restored one must repeat the saver.
    run_python(
        code.replace('sys.argv[-1] == "save"', "False").replace(
            "seed_everything(11)", "seed_everything(12)"
        )
    )
    restored = run_python(
        code.replace('sys.argv[-1] == "save"', "False").replace(
            "seed_everything(11)", "seed_everything(12)"
        )
    ).stdout
    assert json.loads(saved) == json.loads(restored)


def test_isolated_rng_restores_after_exception():
    before = get_rng_state()
    with pytest.raises(ZeroDivisionError), isolated_rng():
        _draws()
        raise ZeroDivisionError
    after = get_rng_state()
    assert before["python"] == after["python"]
    assert before["numpy"] == after["numpy"]
    assert torch.equal(before["torch"], after["torch"])


def test_foreign_device_state_strict_raises_non_strict_warns():
    with isolated_rng():
        state = get_rng_state()
        state["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.zeros(16, dtype=torch.uint8)]
        with pytest.raises(
            RNGStateError, match=r"2 CUDA device state\(s\), this machine has 0.*strict=False"
        ):
            set_rng_state(state)
        first = _draws()
        with pytest.warns(TorchreproWarning, match="other devices"):
            set_rng_state(state, strict=False)
        assert _same(first, _draws())


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda s: s.update(version=99), RNGStateError, r"'version' must be 1, got 99"),
        (lambda s: s.update(torch=[1, 2]), RNGStateError, "'torch' must be a 1-D uint8 tensor"),
        (lambda s: s.update(python="x"), RNGStateError, "'python' must be"),
        (lambda s: s.update(extra=1), RNGStateError, "unknown keys"),
        (lambda s: s.update(numpy=[1]), RNGStateError, "'numpy' must be a dict"),
    ],
)
def test_malformed_states_rejected(mutate, error, match):
    state = get_rng_state()
    mutate(state)
    with pytest.raises(error, match=match):
        set_rng_state(state)


def test_not_a_dict_rejected():
    with pytest.raises(TypeError, match="state must be a dict"):
        set_rng_state([1, 2])  # type: ignore[arg-type]


def test_python_and_numpy_parts_are_json_serialisable():
    state = get_rng_state()
    json.dumps({"python": state["python"], "numpy": state["numpy"]})
