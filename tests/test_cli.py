from __future__ import annotations

import json
import subprocess
import sys

import pytest

from torchrepro._cli import main

CLI = [sys.executable, "-m", "torchrepro"]


def test_env_json_parses(capsys):
    assert main(["env", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["torch"]["version"]


def test_env_table_is_readable(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch.version" in out and "threads.torch_intra_op" in out


def test_env_diff_reports_planted_difference_with_reason(tmp_path, capsys):
    assert main(["env", "--json"]) == 0
    a = json.loads(capsys.readouterr().out)
    b = json.loads(json.dumps(a))
    b["torch"]["cudnn"] = "9.1.0"
    b["hostname"] = "other-host"
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert main(["env", "--diff", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    out = capsys.readouterr().out
    important, harmless = out.split("Harmless differences")
    assert "torch.cudnn" in important and "convolution algorithms can differ" in important
    assert "other-host" in harmless
    assert main(["env", "--diff", str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 0
    assert "identical" in capsys.readouterr().out


def test_env_diff_bad_file_is_usage_error(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("[1")
    with pytest.raises(SystemExit) as exc:
        main(["env", "--diff", str(tmp_path / "bad.json"), str(tmp_path / "bad.json")])
    assert exc.value.code == 2
    assert "cannot read fingerprint" in capsys.readouterr().err


def test_run_sets_variables_and_passes_exit_code(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "x")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    code = (
        "import os, sys; "
        "print(os.environ['PYTHONHASHSEED'], os.environ['CUBLAS_WORKSPACE_CONFIG'], os.environ.get('TORCHREPRO_SEED')); "
        "sys.exit(7)"
    )
    proc = subprocess.run(
        [*CLI, "run", "--", sys.executable, "-c", code], capture_output=True, text=True
    )
    assert proc.returncode == 7
    assert proc.stdout.split() == ["0", ":4096:8", "None"]
    proc = subprocess.run(
        [*CLI, "run", "--seed", "5", "--", sys.executable, "-c", code],
        capture_output=True,
        text=True,
    )
    assert proc.stdout.split() == ["5", ":4096:8", "5"]


def test_run_fixes_str_hash_order():
    code = "print(hash('torchrepro'))"
    runs = {
        subprocess.run(
            [*CLI, "run", "--", sys.executable, "-c", code], capture_output=True, text=True
        ).stdout
        for _ in range(2)
    }
    assert len(runs) == 1


def test_run_without_command_is_usage_error(capsys):
    for argv in (["run"], ["run", "--"], ["run", "--seed", "3", "--"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "missing the command to run" in capsys.readouterr().err


def test_run_bad_seed_is_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--seed", "-1", "--", "true"])
    assert exc.value.code == 2
    assert "must be an integer in [0, 2**64 - 1]" in capsys.readouterr().err


def test_run_missing_program():
    assert main(["run", "--", "no-such-program-xyz"]) == 127
