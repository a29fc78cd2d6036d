"""`torchrepro run` and `check` as process supervisors: signals, process groups, timeouts.

Every test runs the real CLI in a fresh process and checks, through /proc, that nothing it
started is left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

import torchrepro.check._process
from torchrepro._cli import main
from torchrepro.check._process import Finished, run_in_group, tail

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; signals and groups are POSIX"
)

CLI = [sys.executable, "-m", "torchrepro"]


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie (a killed orphan awaiting its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _pids(*files: Path) -> list[int]:
    assert _wait_for(lambda: all(f.exists() and f.read_text().strip() for f in files)), files
    return [int(f.read_text()) for f in files]


@pytest.fixture(autouse=True)
def _no_leftovers(tmp_path: Path):
    """After a test, even a failed one, kill what its commands recorded and left running."""
    yield
    for pid_file in tmp_path.rglob("*.pid"):
        try:
            pid = int(pid_file.read_text())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                ours = b"sleep" in f.read()  # the commands these tests start
        except (OSError, ValueError):
            continue
        if ours and _alive(pid):
            os.kill(pid, signal.SIGKILL)


SAVER = """
import os, sys, time
out, ready = sys.argv[1], sys.argv[2]
try:
    open(ready, "w").close()  # inside the try: a signal right after it is handled too
    time.sleep(120)
except KeyboardInterrupt:  # save slowly, as a big checkpoint would
    with open(out + ".tmp", "w") as f:
        for i in range(10):
            f.write(f"line {i}\\n"); f.flush(); time.sleep(0.1)
    os.replace(out + ".tmp", out)
    sys.exit(3)
"""


def test_run_lets_the_command_finish_its_save_after_ctrl_c(tmp_path):
    script, out, ready = tmp_path / "saver.py", tmp_path / "saved.txt", tmp_path / "ready"
    script.write_text(SAVER)
    # A terminal's Ctrl-C signals the whole foreground process group: `run` and its child.
    proc = subprocess.Popen(
        [*CLI, "run", "--", sys.executable, str(script), str(out), str(ready)],
        start_new_session=True,
    )
    assert _wait_for(ready.exists)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 3
    assert out.read_text().splitlines() == [f"line {i}" for i in range(10)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_run_forwards_a_schedulers_signal_and_exits_with_the_childs_status(tmp_path, signum):
    pid_file = tmp_path / "child.pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    proc = subprocess.Popen([*CLI, "run", "--", sys.executable, "-c", code])
    [child] = _pids(pid_file)
    proc.send_signal(signum)  # to `run` only, as a scheduler preempting the job does
    assert proc.wait(timeout=60) == 128 + signum  # the child died of it: shell convention
    assert _wait_for(lambda: not _alive(child), 10)


def test_run_passes_a_handled_signal_on_and_the_childs_own_status(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(5))\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([*CLI, "run", "--", sys.executable, "-c", code])
    _pids(pid_file)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 5


def _leaves(tmp_path: Path) -> str:
    """A shell command that records its pid and a background grandchild's, then waits."""
    return (
        f"echo $$ > {tmp_path}/bash.pid; sleep 1000 & echo $! > {tmp_path}/sleep.pid; "
        "sleep 1000 & wait"
    )


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["INT", "TERM", "HUP"]
)
def test_check_interrupted_stops_every_process_and_removes_its_temp_dir(tmp_path, signum):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [*CLI, "check", "--", "bash", "-c", _leaves(tmp_path)],
        env={**os.environ, "TMPDIR": str(tmp)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pids = _pids(tmp_path / "bash.pid", tmp_path / "sleep.pid")
    proc.send_signal(signum)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert f"interrupted by {signal.Signals(signum).name}" in err
    assert "Traceback" not in err
    # bash's background jobs ignore SIGINT: they are SIGKILLed after the grace period.
    assert _wait_for(lambda: not any(_alive(p) for p in pids), 10), pids
    assert list(tmp.iterdir()) == []


def test_check_kills_what_a_run_leaves_in_the_background(tmp_path):
    command = f"sleep 1000 & echo $! > {tmp_path}/sleep.pid"
    proc = subprocess.run(
        [*CLI, "check", "--", "bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2  # it recorded no trace
    [sleeper] = _pids(tmp_path / "sleep.pid")
    assert _wait_for(lambda: not _alive(sleeper), 10)


def test_check_timeout_stops_the_run_and_names_it(tmp_path):
    start = time.monotonic()
    proc = subprocess.run(
        [*CLI, "check", "--timeout", "1.5", "--", "bash", "-c", _leaves(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert 'run "run 1" did not finish within --timeout 1.5 s' in proc.stdout
    assert time.monotonic() - start < 60
    pids = _pids(tmp_path / "bash.pid", tmp_path / "sleep.pid")
    assert _wait_for(lambda: not any(_alive(p) for p in pids), 10)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_check_timeout_must_be_positive_seconds(value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["check", "--timeout", value, "--", "true"])
    assert exc.value.code == 2
    assert f"must be a number of seconds > 0, got {value!r}" in capsys.readouterr().err


def test_run_in_group_escalates_to_sigkill_after_the_grace_period(tmp_path):
    script = f"trap '' TERM INT; echo $$ > {tmp_path}/bash.pid; sleep 1000 & wait; sleep 1000"
    start = time.monotonic()
    finished = run_in_group(
        ["bash", "-c", script],
        dict(os.environ),
        stdout=tmp_path / "out",
        stderr=tmp_path / "err",
        timeout=1.0,
        grace=0.5,
    )
    assert finished.timed_out
    assert finished.returncode == -signal.SIGKILL
    assert time.monotonic() - start < 30
    [bash] = _pids(tmp_path / "bash.pid")
    assert not _alive(bash)


def test_tail_reads_only_the_end_of_a_huge_log(tmp_path):
    log = tmp_path / "stderr.log"
    with open(log, "wb") as f:
        f.truncate(512 * 2**20)  # 512 MiB (sparse: no disk used)
        f.seek(0, os.SEEK_END)
        f.write(b"".join(b"line %d\n" % i for i in range(100)))
    tracemalloc.start()
    try:
        text = tail(log, lines=20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert text.splitlines() == [f"line {i}" for i in range(80, 100)]
    assert peak < 4 * 2**20


def test_check_interrupted_also_stops_descendants_in_other_sessions(tmp_path):
    # torchrun starts each worker in a session of its own, out of reach of a group signal.
    command = f"setsid sleep 1000 & echo $! > {tmp_path}/sleep.pid; wait"
    proc = subprocess.Popen(
        [*CLI, "check", "--", "bash", "-c", command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    [sleeper] = _pids(tmp_path / "sleep.pid")
    assert _wait_for(lambda: _alive(sleeper) and os.getsid(sleeper) == sleeper, 10)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert _wait_for(lambda: not _alive(sleeper), 10)


def test_run_in_group_kills_what_the_command_left_in_another_session(tmp_path, monkeypatch):
    monkeypatch.setattr(torchrepro.check._process, "LOOK_EVERY_S", 0.2)
    command = f"setsid sleep 1000 & echo $! > {tmp_path}/sleep.pid; sleep 2"
    finished = run_in_group(
        ["bash", "-c", command], dict(os.environ), stdout=tmp_path / "o", stderr=tmp_path / "e"
    )
    assert finished == Finished(0)
    [sleeper] = _pids(tmp_path / "sleep.pid")
    assert _wait_for(lambda: not _alive(sleeper), 10)


def test_check_under_nohup_ignores_a_hangup(tmp_path):
    proc = subprocess.Popen(
        [
            "nohup",
            *CLI,
            "check",
            "--",
            "bash",
            "-c",
            f"touch {tmp_path}/go; sleep 2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    assert _wait_for((tmp_path / "go").exists)
    proc.send_signal(signal.SIGHUP)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err  # the run finished (and recorded no trace)
    assert "recorded no trace" in out
