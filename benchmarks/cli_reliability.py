"""How the `torchrepro` command behaves under signals, hostile input and huge output.

Runs the CLI of the torchrepro found on PYTHONPATH as a user would, in fresh processes,
and prints one table row per case: what was tried, and what held. Every case runs under a
time limit and is killed when its resident memory passes 3 GiB, so an old version that
hangs or allocates without bound is reported, not waited for. Linux only (reads /proc).

    PYTHONPATH=$PWD python benchmarks/cli_reliability.py            # this checkout
    PYTHONPATH=/path/to/old python benchmarks/cli_reliability.py    # another version
    python benchmarks/cli_reliability.py --trials 3 --stderr-mib 64 # quicker

Cases: Ctrl-C (SIGINT to the process group) under `run` while the command saves a file in
`except KeyboardInterrupt`; SIGTERM to `run`; SIGINT/SIGTERM/SIGHUP to `check` while the
command has a grandchild (`bash -c 'sleep 1000 & wait'`) and one in its own session; a
background job left by a finished run; `--keep` over an existing run directory; the peak
memory of `check` when a run writes a large stderr; `--runs 10**12`; a missing and a
non-executable command; eight hostile files for `env --diff`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _common

CLI = [sys.executable, "-m", "torchrepro"]
RSS_LIMIT_KIB = 3 << 20

SAVER = """
import os, sys, time
out, ready = sys.argv[1], sys.argv[2]
try:
    open(ready, "w").close()  # inside the try: a signal right after it is handled too
    time.sleep(120)
except KeyboardInterrupt:
    with open(out + ".tmp", "w") as f:
        for i in range(10):
            f.write(f"line {i}\\n"); f.flush(); time.sleep(0.1)
    os.replace(out + ".tmp", out)
    sys.exit(3)
"""


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _pids(*files: Path) -> list[int]:
    if not _wait_for(lambda: all(f.exists() and f.read_text().strip() for f in files), 120):
        return []
    return [int(f.read_text()) for f in files]


def _start(args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
    """Start the CLI; its output goes to a file (a pipe would stay open in a leftover child)."""
    output = tempfile.TemporaryFile()  # noqa: SIM115 (closed by _finish)
    proc = subprocess.Popen(
        [*CLI, *args],
        stdout=output,
        stderr=subprocess.STDOUT,
        **kwargs,  # type: ignore[call-overload]
    )
    proc.output = output  # type: ignore[attr-defined]
    return proc  # type: ignore[no-any-return]


def _finish(proc: subprocess.Popen[bytes], timeout: float = 60) -> tuple[int | str, str]:
    """The exit status (or "killed: ..." past the time or memory limit) and the output."""
    peak, start = 0, time.monotonic()
    status: int | str | None = None
    while (status := proc.poll()) is None:
        peak = max(peak, _rss_kib(proc.pid))
        if peak > RSS_LIMIT_KIB or time.monotonic() - start > timeout:
            proc.kill()
            proc.wait()
            why = f"past {RSS_LIMIT_KIB >> 20} GiB RSS" if peak > RSS_LIMIT_KIB else "timed out"
            status = f"killed ({why} after {time.monotonic() - start:.0f} s)"
            break
        time.sleep(0.05)
    output = proc.output  # type: ignore[attr-defined]
    output.seek(0)
    text = output.read().decode("utf-8", errors="replace")
    output.close()
    return status, text


def _statuses(statuses: set[int | str]) -> str:
    return " / ".join(str(s) for s in sorted(statuses, key=str))


def ctrl_c_under_run(tmp: Path, trials: int) -> str:
    complete, statuses = 0, set()
    for trial in range(trials):
        out, ready = tmp / f"saved{trial}", tmp / f"ready{trial}"
        script = tmp / "saver.py"
        script.write_text(SAVER)
        proc = _start(
            ["run", "--", sys.executable, str(script), str(out), str(ready)],
            start_new_session=True,
        )
        _wait_for(ready.exists, 120)
        os.killpg(proc.pid, signal.SIGINT)
        code, _ = _finish(proc)
        statuses.add(code)
        lines = out.read_text().splitlines() if out.exists() else []
        complete += len(lines) == 10
    return (
        f"{complete}/{trials} saves complete; `run` exited {_statuses(statuses)} (the command: 3)"
    )


def sigterm_to_run(tmp: Path, trials: int) -> str:
    stopped, statuses = 0, set()
    for trial in range(trials):
        pid_file = tmp / f"run{trial}.pid"
        code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
        proc = _start(["run", "--", sys.executable, "-c", code])
        [child] = _pids(pid_file) or [0]
        proc.send_signal(signal.SIGTERM)
        status, _ = _finish(proc)
        statuses.add(status)
        stopped += bool(child) and _wait_for(lambda c=child: not _alive(c), 10)
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)
    return f"{stopped}/{trials} commands stopped; `run` exited {_statuses(statuses)}"


def signal_to_check(tmp: Path, signum: int) -> str:
    work = tmp / f"sig{signum}"
    work.mkdir()
    temp = work / "tmp"
    temp.mkdir()
    command = (
        f"sleep 1000 & echo $! > {work}/a.pid; setsid sleep 1000 & echo $! > {work}/b.pid; wait"
    )
    proc = _start(["check", "--", "bash", "-c", command], env={**os.environ, "TMPDIR": str(temp)})
    pids = _pids(work / "a.pid", work / "b.pid")
    time.sleep(0.5)
    proc.send_signal(signum)
    status, _ = _finish(proc)
    _wait_for(lambda: not any(_alive(p) for p in pids), 10)
    left = [p for p in pids if _alive(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    dirs = len(list(temp.iterdir()))
    return f"exit {status}; {len(left)}/{len(pids)} processes left; {dirs} temp dirs left"


def background_job(tmp: Path) -> str:
    proc = _start(["check", "--", "bash", "-c", f"sleep 1000 & echo $! > {tmp}/bg"])
    _finish(proc)
    pids = _pids(tmp / "bg")
    _wait_for(lambda: not any(_alive(p) for p in pids), 5)
    left = [p for p in pids if _alive(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return f"{len(left)}/{len(pids)} left running"


def keep_existing(tmp: Path) -> str:
    keep = tmp / "keep"
    (keep / "run1").mkdir(parents=True)
    (keep / "run1" / "notes.txt").write_text("mine")
    status, _ = _finish(_start(["check", "--keep", str(keep), "--", "true"]))
    kept = (keep / "run1" / "notes.txt").exists()
    return f"exit {status}; the user's file {'kept' if kept else 'DELETED'}"


def big_stderr(tmp: Path, mib: int) -> str:
    command = f"echo failed >&2; yes 'a line of stderr output' | head -c {mib << 20} >&2; exit 1"
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*CLI, "check", "--", "bash", "-c", command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _rss_kib(proc.pid))
        time.sleep(0.02)
    took = time.perf_counter() - start
    return f"peak RSS of check {peak >> 10} MiB, exit {proc.returncode}, {took:.0f} s"


def huge_runs(tmp: Path) -> str:
    start = time.perf_counter()
    status, output = _finish(_start(["check", "--runs", str(10**12), "--", "true"]), 120)
    took = time.perf_counter() - start
    if isinstance(status, str):
        return status
    clean = "Traceback" not in output and "MemoryError" not in output
    return f"exit {status} in {took:.0f} s, {'a clear error' if clean else 'a crash'}"


def _clean(status: int | None, output: str) -> bool:
    return status == 2 and "Traceback" not in output and "error" in output


def cannot_start(tmp: Path) -> str:
    script = tmp / "not_executable.sh"
    script.write_text("true\n")
    script.chmod(0o644)
    results = []
    for sub in ("run", "check"):
        for command in ("/nonexistent", str(script)):
            status, output = _finish(_start([sub, "--", command]))
            results.append(status in (2, 126, 127) and "Traceback" not in output)
    return f"{sum(results)}/{len(results)} clear errors (run and check; missing, not executable)"


def hostile_fingerprints(tmp: Path) -> str:
    good = tmp / "good.json"
    good.write_text(json.dumps({"hostname": "a"}))
    files = {
        "100k-deep": "[" * 100_000 + "]" * 100_000,
        "5000-digit int": '{"a": ' + "9" * 5000 + "}",
        "deep object": '{"a": ' * 500 + "1" + "}" * 500,
        "huge": '{"a": "' + "x" * (64 << 20) + '"}',
        "control chars": json.dumps({"hostname": "\x1b[2J\x1b]0;owned\x07"}),
    }
    paths = {}
    for name, text in files.items():
        paths[name] = tmp / name.replace(" ", "_")
        paths[name].write_text(text)
    paths["not UTF-8"] = tmp / "latin1"
    paths["not UTF-8"].write_bytes(b'{"a": "\xff"}')
    paths["FIFO"] = tmp / "fifo"
    os.mkfifo(paths["FIFO"])
    paths["/dev/zero"] = Path("/dev/zero")
    held = []
    for name, path in paths.items():
        status, output = _finish(_start(["env", "--diff", str(good), str(path)]), 30)
        escaped = name != "control chars" or "\x1b" not in output
        ok = escaped and "Traceback" not in output and status in (0, 1, 2)
        held.append(name) if ok else None
    failed = [n for n in paths if n not in held]
    return f"{len(held)}/{len(paths)} clear" + (f" (not: {', '.join(failed)})" if failed else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--stderr-mib", type=int, default=1024)
    parser.add_argument("--only", default="", help="run the cases whose label contains this")
    args = parser.parse_args()
    import torchrepro

    print(
        f"cli_reliability: torchrepro {torchrepro.__version__} from {Path(torchrepro.__file__).parent}"
    )
    print(f"cli_reliability: {_common.machine_line({})}")
    rows = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        cases: list[tuple[str, Callable[[], str]]] = [
            ("run: Ctrl-C while the command saves", lambda: ctrl_c_under_run(tmp, args.trials)),
            ("run: SIGTERM to run (a scheduler)", lambda: sigterm_to_run(tmp, args.trials)),
            *(
                (
                    f"check: {signal.Signals(s).name}, grandchild + own-session child",
                    lambda s=s: signal_to_check(tmp, s),
                )
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
            ),
            ("check: a run leaves `sleep &` behind", lambda: background_job(tmp)),
            ("check --keep over an existing run1", lambda: keep_existing(tmp)),
            ("check: a failed run's stderr, 1 line", lambda: big_stderr(tmp, 0)),
            (
                f"check: a failed run's stderr, {args.stderr_mib} MiB",
                lambda: big_stderr(tmp, args.stderr_mib),
            ),
            ("check --runs 10**12", lambda: huge_runs(tmp)),
            ("missing / non-executable command", lambda: cannot_start(tmp)),
            ("env --diff, 8 hostile files", lambda: hostile_fingerprints(tmp)),
        ]
        for label, case in cases:
            if args.only not in label:
                continue
            print(f"  {label} ...", file=sys.stderr, flush=True)
            try:
                rows.append([label, case()])
            except Exception as exc:  # the harness must report, not stop
                rows.append([label, f"harness error: {type(exc).__name__}: {exc}"])
    print()
    print(_common.markdown_table(["case", "what held"], rows))


if __name__ == "__main__":
    main()
