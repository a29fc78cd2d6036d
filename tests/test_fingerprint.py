from __future__ import annotations

import json

import torch

import torchrepro.env._fingerprint
from torchrepro import diff_fingerprints, fingerprint


def test_fingerprint_is_json_and_has_the_sections():
    fp = json.loads(json.dumps(fingerprint()))
    for key in (
        "python",
        "os",
        "cpu",
        "torch",
        "gpus",
        "threads",
        "determinism",
        "env",
        "packages",
        "git",
    ):
        assert key in fp
    assert fp["torch"]["version"] == torch.__version__
    assert fp["threads"]["torch_intra_op"] == torch.get_num_threads()
    assert "PYTHONHASHSEED" in fp["env"]
    assert "torch" in fp["packages"]


def test_fingerprint_reflects_determinism_settings():
    from torchrepro import deterministic

    with deterministic("warn"):
        on = fingerprint()["determinism"]
    off = fingerprint()["determinism"]
    assert on["deterministic_algorithms"] == [True, True]
    assert off["deterministic_algorithms"] == [False, False]


def test_git_commit_of_a_repository(tmp_path, monkeypatch):
    import subprocess

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "f").write_text("x")
    subprocess.run(["git", "add", "f"], cwd=tmp_path, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "m"],
        cwd=tmp_path,
        check=True,
    )
    monkeypatch.chdir(tmp_path)
    clean = fingerprint()["git"]
    (tmp_path / "f").write_text("y")
    torchrepro.env._fingerprint._git.cache_clear()  # read once per process otherwise
    dirty = fingerprint()["git"]
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    assert dirty["dirty"] is True


def test_no_git_outside_a_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fingerprint()["git"] is None


def test_diff_orders_result_changing_first_with_reasons():
    a = fingerprint()
    a["git"] = {"commit": "1" * 40, "dirty": False}
    b = json.loads(json.dumps(a))
    b["hostname"] = "elsewhere"
    b["torch"]["cudnn"] = "0.0.1"
    b["threads"]["torch_intra_op"] += 7
    b["git"] = {"commit": "0" * 40, "dirty": True}
    diffs = diff_fingerprints(a, b)
    keys = [d.key for d in diffs]
    assert keys[-1] == "hostname" and not diffs[-1].changes_results
    important = [d for d in diffs if d.changes_results]
    assert [d.key for d in important][:2] == ["git.commit", "git.dirty"]
    cudnn = next(d for d in diffs if d.key == "torch.cudnn")
    assert "convolution algorithms can differ" in cudnn.reason
    assert "0.0.1" in str(cudnn)
    assert diff_fingerprints(a, a) == []
