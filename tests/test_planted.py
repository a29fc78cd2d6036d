"""Done-when of issue 14 on the bundled example with planted nondeterminism (tests/scripts).

(a) a module adding noise from an unseeded generator: `check` names it;
(b) an augmentation drawing from a dataset-owned RNG: `check` says the batch differs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from torchrepro.check._runner import run_check

SCRIPT = Path(__file__).resolve().parent / "scripts" / "planted_digits.py"


@pytest.mark.parametrize(
    ("plant", "step", "rerun"),
    [
        ("module", 1, 'from the start of "run 1" to step 1 (1 step each)'),
        # The traces hold the state at step 1 only, so they bound the step to 2-4; the
        # re-runs with the state every step (from the start: no checkpoint before step 2)
        # part at step 4 and capture it per module on the way.
        ("module-late", 4, 'from the start of "run 1" to step 4 (4 steps each)'),
    ],
)
def test_planted_module_is_named(tmp_path, monkeypatch, plant, step, rerun):
    monkeypatch.setenv("PLANT", plant)
    report = run_check([sys.executable, str(SCRIPT)], runs=2, keep=tmp_path, seed=0)
    assert report.error is None, report.error
    assert not report.reproducible and report.comparisons[0].first_step == step
    found = report.localization
    assert found is not None, report.localization_note
    assert (found.module, found.module_class, found.phase) == (
        "features.3",
        "UnseededNoise",
        "forward output",
    )
    assert rerun in report.localization_note
    if step > 1:
        assert "the re-runs parted at step 4" in report.pinpoint_note
        assert not list(tmp_path.glob("localize*"))  # the pinpoint re-runs' captures served
    data = report.to_dict()  # what `check --json` prints
    assert data["localization"]["module"] == "features.3"
    assert data["explanations"][0]["comparison"]["first_step"] == step
    # The reference kept its checkpoints; the comparison run did not.
    assert sorted(p.name for p in (tmp_path / "run1").glob("checkpoint.pt.step*")) == [
        "checkpoint.pt.step2",
        "checkpoint.pt.step4",
        "checkpoint.pt.step6",
    ]
    assert not list((tmp_path / "run2").glob("checkpoint.pt.step*"))


def test_agreeing_runs_are_not_rerun(tmp_path, monkeypatch):
    monkeypatch.delenv("PLANT", raising=False)
    report = run_check([sys.executable, str(SCRIPT)], runs=2, keep=tmp_path, seed=0, localize=True)
    assert report.reproducible, report.verdict()
    assert report.localization is None and report.localization_note == ""
    assert not list(tmp_path.glob("localize*"))


def test_planted_dataset_rng_is_a_batch_difference(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANT", "data")
    report = run_check([sys.executable, str(SCRIPT)], runs=2, keep=tmp_path, seed=0)
    assert report.error is None, report.error
    assert report.comparisons[0].first_step == 1
    assert report.comparisons[0].batch_differs is True
    assert report.explanations[0].batch_differs is True
    # `check --json` carries what `compare --json` does, per comparison.
    assert report.to_dict()["explanations"][0]["batch_differs"] is True
    # The model is not to blame: no re-run, and the reason is said.
    assert report.localization is None
    assert "the batch at step 1 already differed" in report.localization_note
    assert not list(tmp_path.glob("localize*"))
