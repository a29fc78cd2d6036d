"""torch.compile: determinism kept on, fingerprinted, checkpoints and traces by module name.

Most tests wrap a model with ``torch.compile`` without calling it, which compiles nothing
(the wrapper, its names and state dict exist at once). The few that run compiled code share
one tiny compiled training run per module (a cold compile takes ~40 s on 2 cores), are
marked slow, and skip without a C++ compiler, which Inductor needs on CPU.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import torchrepro
from torchrepro import DeterminismError, Trace, diff_fingerprints, fingerprint
from torchrepro.check._plan import plan_runs
from torchrepro.checkpoint._io import read_checkpoint
from torchrepro.core._compiled import compile_info, unwrap

HAS_CXX = shutil.which("g++") is not None or shutil.which("c++") is not None
needs_cxx = pytest.mark.skipif(
    not HAS_CXX, reason="Inductor compiles CPU kernels with a C++ compiler; none on PATH"
)


def _model() -> torch.nn.Module:
    with torchrepro.isolated_rng():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


@pytest.fixture
def inductor_config() -> Iterator[Any]:
    """Inductor's config module, with ``deterministic`` put back after the test."""
    from torch._inductor import config

    before = config.deterministic
    yield config
    config.deterministic = before


# ------------------------------------------------------------------ determinism stays on


def test_compiled_step_with_determinism_on_passes(tmp_path):
    model = torch.compile(_model())
    with torchrepro.deterministic("warn"):
        Trace(tmp_path / "t.jsonl").step(loss=1.0, model=model)


def test_determinism_turned_off_after_deterministic_fails_at_first_compiled_step(tmp_path):
    model = torch.compile(_model())
    with torchrepro.deterministic("warn"):
        torch.use_deterministic_algorithms(False)
        with pytest.raises(DeterminismError, match=r"use_deterministic_algorithms\(False\)"):
            Trace(None).step(loss=1.0, model=model)
        Trace(None).step(loss=1.0, model=_model())  # eager: nothing to verify


def test_inductor_deterministic_turned_off_fails_naming_the_setting(inductor_config):
    model = torch.compile(_model())
    with torchrepro.deterministic("warn"):
        assert inductor_config.deterministic is True  # use_deterministic_algorithms set it
        inductor_config.deterministic = False
        with pytest.raises(DeterminismError, match=r"torch\._inductor\.config\.deterministic"):
            Trace(None).step(loss=1.0, model=model)


def test_inductor_mode_set_only_through_its_config_is_reset_by_the_first_compiled_call(
    inductor_config,
):
    """Why deterministic() goes through use_deterministic_algorithms (torch >= 2.10)."""
    if not hasattr(inductor_config, "deterministic"):
        pytest.skip("this torch has no Inductor deterministic mode (before 2.10)")
    inductor_config.deterministic = True  # as TORCHINDUCTOR_DETERMINISTIC=1 would
    torch.compile(lambda x: x + 1, backend="eager")(torch.ones(2))  # Dynamo only: no C++
    assert inductor_config.deterministic is False
    with torchrepro.deterministic("warn"):
        torch.compile(lambda x: x + 2, backend="eager")(torch.ones(2))
        assert inductor_config.deterministic is True
        Trace(None).step(loss=1.0, model=torch.compile(_model(), backend="eager"))


def test_compile_options_turning_deterministic_off_fail():
    model = torch.compile(_model(), options={"deterministic": False})
    with (
        torchrepro.deterministic("warn"),
        pytest.raises(DeterminismError, match=r"options=\{'deterministic': False\}"),
    ):
        Trace(None).step(loss=1.0, model=model)


def test_no_verification_without_deterministic_or_after_restore():
    model = torch.compile(_model())
    with torchrepro.deterministic("warn"):
        pass
    Trace(None).step(loss=1.0, model=model)  # restored: nothing was asked for


# ------------------------------------------------------------------ fingerprint and diff


def test_fingerprint_records_compile_settings_env_and_model(monkeypatch):
    import torch._inductor.config  # loaded, as after any compile

    monkeypatch.setenv("TORCHINDUCTOR_MAX_AUTOTUNE_POINTWISE", "0")
    compiled = torch.compile(_model(), mode="max-autotune-no-cudagraphs")
    fp = json.loads(json.dumps(fingerprint(compiled)))
    section = fp["compile"]
    assert section["env"]["TORCHINDUCTOR_MAX_AUTOTUNE_POINTWISE"] == "0"
    assert section["inductor"]["fallback_random"] is False
    assert "deterministic" in section["inductor"]
    assert section["model"]["compiled"] is True
    assert section["model"]["backend"] == "inductor"
    assert section["model"]["options"]["max_autotune"] is True
    if HAS_CXX:
        assert section["cpp_compiler"]["version"]
    assert fingerprint(_model())["compile"]["model"] == {"compiled": False}


def test_diff_names_compile_differences_in_plain_words(monkeypatch):
    import torch._inductor.config  # loaded, as after any compile

    eager = fingerprint(_model())
    monkeypatch.setenv("TORCHINDUCTOR_DISTORT_BENCHMARKING_RESULT", "inverse")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    compiled = fingerprint(torch.compile(_model(), options={"fallback_random": True}))
    compiled["compile"]["inductor"]["deterministic"] = not eager["compile"]["inductor"][
        "deterministic"
    ]
    compiled["compile"]["cpp_compiler"] = {"command": "clang++", "version": "clang 18"}
    diffs = {d.key: d for d in diff_fingerprints(eager, compiled)}
    assert diffs["compile.model.compiled"].changes_results
    assert "compiled" in diffs["compile.model.compiled"].reason
    assert "deterministic mode" in diffs["compile.inductor.deterministic"].reason
    assert diffs["compile.cpp_compiler.version"].changes_results
    assert "C++ compilers" in diffs["compile.cpp_compiler.version"].reason
    distort = diffs["compile.env.TORCHINDUCTOR_DISTORT_BENCHMARKING_RESULT"]
    assert distort.changes_results and "distorted" in distort.reason
    assert not diffs["compile.env.TORCHINDUCTOR_CACHE_DIR"].changes_results
    option = diffs["compile.model.options.fallback_random"]
    assert option.changes_results and "mode or options differ" in option.reason


def test_diff_with_inductor_not_loaded_on_one_side_is_harmless():
    a = {"compile": {"inductor": None, "cpp_compiler": None}}
    b = {"compile": {"inductor": {"deterministic": True}, "cpp_compiler": {"version": "g++"}}}
    assert not any(d.changes_results for d in diff_fingerprints(a, b))


# ------------------------------------------------------------------ checkpoints


def _perturbed(model: torch.nn.Module, by: float) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)
    return model


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = unwrap(a).state_dict(), unwrap(b).state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("saved_from", ["compiled", "eager"])
def test_checkpoint_interchanges_compiled_and_eager(tmp_path, saved_from):
    source = _perturbed(_model(), 0.5)
    target = _model()
    if saved_from == "compiled":
        source = torch.compile(source)
    else:
        target = torch.compile(target)
    torchrepro.save_checkpoint(tmp_path / "c.pt", model=source)
    saved, _digest = read_checkpoint(tmp_path / "c.pt")
    assert not any(k.startswith("_orig_mod") for k in saved["objects"]["model"])
    with torchrepro.isolated_rng():
        torchrepro.load_checkpoint(tmp_path / "c.pt", model=target)
    _assert_same_state(source, target)


class _RawState:
    """Saves a compiled wrapper's own state dict, keys with ``_orig_mod.``, as other code does."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)


@pytest.mark.parametrize("target_compiled", [False, True])
def test_checkpoint_with_orig_mod_keys_loads_into_either(tmp_path, target_compiled):
    source = torch.compile(_perturbed(_model(), 0.25))
    torchrepro.save_checkpoint(tmp_path / "c.pt", model=_RawState(source))
    saved, _digest = read_checkpoint(tmp_path / "c.pt")
    assert all(k.startswith("_orig_mod.") for k in saved["objects"]["model"])
    target = torch.compile(_model()) if target_compiled else _model()
    with torchrepro.isolated_rng():
        torchrepro.load_checkpoint(tmp_path / "c.pt", model=target)
    _assert_same_state(source, target)


@pytest.mark.parametrize("saved_from", ["compiled", "eager"])
def test_checkpointer_interchanges_compiled_and_eager(tmp_path, saved_from):
    source = _perturbed(_model(), -0.5)
    target = _model()
    if saved_from == "compiled":
        source = torch.compile(source)
    else:
        target = torch.compile(target)
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1)
    saver = torchrepro.Checkpointer(tmp_path / "c.pt", every=1, model=source, optimizer=optimizer)
    saver.step()
    loader = torchrepro.Checkpointer(
        tmp_path / "c.pt", every=1, model=target, optimizer=torch.optim.SGD(target.parameters())
    )
    with torchrepro.isolated_rng():
        loader.resume()
    assert loader.steps == 1
    _assert_same_state(source, target)


# ------------------------------------------------------------------ trace names


def test_trace_names_compiled_parameters_by_module_name(tmp_path):
    path = tmp_path / "t.jsonl"
    trace = Trace(path)
    trace.step(loss=1.0, model=torch.compile(_model()))
    trace.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    names = [e["name"] for e in records[1]["entries"] if e["kind"] == "param"]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    model_facts = records[0]["fingerprint"]["compile"]["model"]
    assert model_facts["compiled"] is True and model_facts["backend"] == "inductor"


def test_compile_info_of_eager_and_compiled():
    assert compile_info(_model()) == {"compiled": False}
    info = compile_info(torch.compile(_model(), backend="eager"))
    assert info["compiled"] is True and info["backend"] == "eager"


# ------------------------------------------------------------------ compiled runs (slow)


def _train(model: torch.nn.Module, trace: Trace | None, steps: int) -> list[torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    with torchrepro.isolated_rng():
        torch.manual_seed(1)
        for _ in range(steps):
            x = torch.randn(4, 6)
            loss = model(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if trace is not None:
                trace.step(loss=loss, model=model)
            losses.append(loss.detach().clone())
    return losses


@pytest.fixture(scope="module")
def compiled_counts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One compiled model trained with and without a Trace; Dynamo's counters for each part."""
    from torch._dynamo.utils import counters

    path = Path(tmp_path_factory.mktemp("compiled")) / "t.jsonl"
    settings = torchrepro.deterministic("strict")
    try:
        torch._dynamo.reset()
        counters.clear()
        model = torch.compile(_model())
        _train(model, None, 2)  # compiles forward and backward
        before = {k: dict(v) for k, v in counters.items()}
        _train(model, Trace(path, state_every=1, grads=True), 3)
        after = {k: dict(v) for k, v in counters.items()}
        yield {"before": before, "after": after, "path": path}
    finally:
        settings.restore()
        torch._dynamo.reset()


@pytest.mark.slow
@needs_cxx
def test_trace_step_adds_no_graph_break_or_recompile(compiled_counts):
    before, after = compiled_counts["before"], compiled_counts["after"]
    assert before["stats"]["unique_graphs"] >= 1
    assert after.get("graph_break", {}) == before.get("graph_break", {}) == {}
    assert after["stats"]["unique_graphs"] == before["stats"]["unique_graphs"]
    assert after.get("recompiles", {}) == before.get("recompiles", {})
    records = [json.loads(line) for line in compiled_counts["path"].read_text().splitlines()]
    names = {e["name"] for r in records[1:] for e in r.get("entries", []) if e["kind"] == "grad"}
    assert names == {"0.weight", "0.bias", "2.weight", "2.bias"}


# ------------------------------------------------------------------ check's plan


def test_check_gives_the_second_run_a_cold_inductor_cache_of_its_own():
    specs = plan_runs(2, ["num_workers=0,2"], resume_at=5)
    assert [s.cold_cache for s in specs] == [False, True, False, False]
    mine = plan_runs(2, ["TORCHINDUCTOR_CACHE_DIR=/a,/b"])
    assert not any(s.cold_cache for s in mine)  # the user varies the cache: left as asked
    assert not any(s.distort_autotune for s in specs)  # CPU: distortion acts on GPUs only
    on_gpu = plan_runs(2, ["num_workers=0,2"], gpu=True)
    assert [s.distort_autotune for s in on_gpu] == [False, True, False]
    assert on_gpu[1].env == on_gpu[0].env  # still a repeat of run 1


def test_execute_gives_a_cold_cache_run_its_cache_and_distorted_timings(tmp_path):
    import os
    import sys

    from torchrepro.check._execute import execute

    spec = plan_runs(2, gpu=True)[1]
    out = tmp_path / "env.txt"
    code = (
        "import os, sys; e = os.environ; open(sys.argv[1], 'w').write("
        "e.get('TORCHINDUCTOR_CACHE_DIR', '-') + ' ' + "
        "e.get('TORCHINDUCTOR_DISTORT_BENCHMARKING_RESULT', '-'))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR_")}
    execute([sys.executable, "-c", code, str(out)], spec, tmp_path / "run2", env, None)
    cache, distort = out.read_text().split()
    assert cache == str(tmp_path / "run2" / "inductor-cache") and distort == "inverse"
