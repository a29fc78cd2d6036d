"""The CLI on bad input: a clear error naming the thing, never a traceback, nothing deleted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchrepro._cli import main

CLI = [sys.executable, "-m", "torchrepro"]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120, cwd=cwd, errors="replace"
    )


def test_no_arguments_prints_the_help():
    proc = _cli()
    assert proc.returncode == 2
    for command in ("env", "run", "check"):
        assert f"    {command} " in proc.stderr  # the list of commands, with what each does
    assert "show this help message" in proc.stderr


@pytest.mark.parametrize("sub", ["run", "check"])
def test_command_without_double_dash_is_refused(sub, capsys):
    with pytest.raises(SystemExit) as exc:
        main([sub, "python", "train.py", "--vary", "num_workers=0,2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"put -- before the command: `torchrepro {sub} [options] -- CMD ...`" in err
    assert "'python train.py --vary num_workers=0,2'" in err


def test_options_after_double_dash_belong_to_the_command(tmp_path):
    code = "import sys; print(sys.argv[1:])"
    proc = _cli("run", "--", sys.executable, "-c", code, "--vary", "x", "--", "y")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['--vary', 'x', '--', 'y']"


@pytest.mark.parametrize(
    "args",
    [
        ["check", "--", "/nonexistent/train"],
        ["check", "--", "{not_executable}"],
    ],
    ids=["missing", "not-executable"],
)
def test_check_of_a_command_that_cannot_start(tmp_path, args):
    script = tmp_path / "train.sh"
    script.write_text("echo hi\n")
    script.chmod(0o644)
    args = [a.replace("{not_executable}", str(script)) for a in args]
    proc = _cli(*args)
    assert proc.returncode == 2
    assert 'ERROR: run "run 1" could not start' in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_run_of_a_command_that_cannot_start(tmp_path):
    script = tmp_path / "train.sh"
    script.write_text("echo hi\n")
    script.chmod(0o644)
    for command, status in (("/nonexistent/train", 127), (str(script), 126)):
        proc = _cli("run", "--", command)
        assert proc.returncode == status
        assert proc.stderr.startswith(f"torchrepro run: error: cannot start {command!r}")
        assert "Traceback" not in proc.stderr


def test_runs_is_bounded_before_anything_is_allocated(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["check", "--runs", str(10**12), "--", "true"])
    assert exc.value.code == 2
    assert "--runs: must be an integer in [2, 100], got '1000000000000'" in capsys.readouterr().err


def test_keep_never_deletes_existing_runs(tmp_path):
    keep = tmp_path / "keep"
    (keep / "run1").mkdir(parents=True)
    precious = keep / "run1" / "precious.txt"
    precious.write_text("my results")
    proc = _cli("check", "--keep", str(keep), "--", "true")
    assert proc.returncode == 2
    assert "already holds 'run1'" in proc.stderr and "never deletes" in proc.stderr
    assert "usage:" not in proc.stderr and "Traceback" not in proc.stderr
    assert precious.read_text() == "my results"


@pytest.mark.parametrize("kind", ["file", "uncreatable"])
def test_keep_that_cannot_be_a_directory(tmp_path, kind):
    if kind == "file":
        keep = tmp_path / "keep"
        keep.write_text("a file")
        expected = "exists and is not a directory"
    else:
        keep = tmp_path / "file" / "sub"
        (tmp_path / "file").write_text("a file")  # a parent that is a file
        expected = "cannot create this directory"
    proc = _cli("check", "--keep", str(keep), "--", "true")
    assert proc.returncode == 2
    assert f"torchrepro check: error: --keep {str(keep)!r}" in proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_library_error_is_not_reported_as_a_usage_error(tmp_path):
    # The command writes a trace with a 5000-digit number: Python's JSON parser raises a
    # ValueError. An error, but not in check's arguments: no usage message.
    script = tmp_path / "bigint.py"
    script.write_text(
        "import os\n"
        "with open(os.environ['TORCHREPRO_TRACE'], 'w') as f:\n"
        '    f.write(\'{"format": "torchrepro-trace", "version": 1}\\n\')\n'
        '    f.write(\'{"step": 1, "entries": [], "x": \' + "9" * 5000 + "}\\n")\n'
    )
    proc = _cli("check", "--", sys.executable, str(script))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "usage:" not in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_check_escapes_control_characters_from_the_commands_stderr():
    code = "import sys; sys.stderr.write('\\x1b]0;owned\\x07\\x1b[2Jcleared\\n'); sys.exit(1)"
    proc = _cli("check", "--", sys.executable, "-c", code)
    assert proc.returncode == 2
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout
    assert "\\x1b]0;owned\\x07\\x1b[2Jcleared" in proc.stdout


def _fingerprint(capsys) -> dict:
    assert main(["env", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_env_diff_escapes_control_characters(tmp_path, capsys):
    a = _fingerprint(capsys)
    b = json.loads(json.dumps(a))
    b["hostname"] = "evil\x1b[2J\x1b]0;title\x07\nnext"
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    main(["env", "--diff", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "evil\\x1b[2J\\x1b]0;title\\x07\\x0anext" in out


def _hostile(tmp_path: Path, kind: str) -> str:
    path = tmp_path / kind
    if kind == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "deep-object":  # deep enough for a recursive walk, not for json
        path.write_text('{"a": ' * 500 + "1" + "}" * 500)
    elif kind == "long-int":
        path.write_text('{"a": ' + "9" * 5000 + "}")
    elif kind == "not-utf8":
        path.write_bytes(b'{"a": "\xff\xfe"}')
    elif kind == "huge":
        path.write_text('{"a": "' + "x" * (2 << 20) + '"}')
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        return "/dev/zero"
    elif kind == "directory":
        path.mkdir()
    return str(path)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("deep", "nested deeper than a fingerprint"),
        ("deep-object", "nested deeper than a fingerprint"),
        ("long-int", "not valid JSON"),
        ("not-utf8", "not UTF-8 text"),
        ("huge", "larger than 1 MiB"),
        ("fifo", "not a regular file"),
        ("dev-zero", "not a regular file"),
        ("directory", "not a regular file"),
    ],
)
def test_env_diff_refuses_hostile_files(tmp_path, capsys, kind, reason):
    path = _hostile(tmp_path, kind)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"hostname": "a"}))
    with pytest.raises(SystemExit) as exc:
        main(["env", "--diff", str(good), path])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "cannot read fingerprint" in err and reason in err, err


def test_env_names_the_determinism_settings(capsys):
    assert main(["env"]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if " " in line)
    on_off = {True: "on", False: "off"}
    enabled = on_off[torch.are_deterministic_algorithms_enabled()]
    warn = on_off[torch.is_deterministic_algorithms_warn_only_enabled()]
    assert rows["determinism.deterministic_algorithms"] == f"{enabled} (warn_only: {warn})"
    assert rows["determinism.cudnn.benchmark"] == on_off[torch.backends.cudnn.benchmark]
