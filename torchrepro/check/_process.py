"""Running the user's command for ``torchrepro run`` and ``torchrepro check``.

Two ways, for two jobs:

- :func:`run_foreground` (``run``): the command stays in the terminal's process group, so
  Ctrl-C reaches it directly; this process only waits (it never sends a second SIGINT,
  which would interrupt a checkpoint being saved in ``except KeyboardInterrupt``) and
  forwards SIGTERM and SIGHUP, which a scheduler sends to the top process only.
- :func:`run_in_group` (``check``): each run gets a session and process group of its own,
  so a signal, a timeout or the end of the run reaches every process it started (torchrun
  workers, ``bash -c`` grandchildren, background jobs), not only the direct child.

Signals are POSIX: this module needs ``os.killpg`` and ``os.waitid``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

__all__ = [
    "GRACE_S",
    "Finished",
    "SignalInterrupt",
    "exit_status",
    "gloo_teardown_abort",
    "raise_on_signals",
    "run_foreground",
    "run_in_group",
    "tail",
]

# Seconds a run's processes get to exit after the forwarded signal, before SIGKILL.
GRACE_S = 5.0
# Seconds between looks for a run's descendants in other sessions (a /proc scan: ~0.05 ms
# per process on the machine).
LOOK_EVERY_S = 5.0
# The most of a log :func:`tail` reads, whatever the log's size.
TAIL_BYTES = 64 * 1024

# Set by a second signal under raise_on_signals(): stop waiting, kill now.
_hurry = threading.Event()
# While a command is being started (no handle on it yet), raise_on_signals() keeps the
# exception it would raise here, to be raised once the command can be stopped.
_held: list[BaseException] = []
_holding = False


class SignalInterrupt(BaseException):  # like KeyboardInterrupt: not an error
    """SIGTERM or SIGHUP arrived inside :func:`raise_on_signals`; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return signal.Signals(self.signum).name


def exit_status(returncode: int) -> int:
    """A shell's exit status for ``returncode``: a child killed by signal N (``-N``) is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


@contextlib.contextmanager
def raise_on_signals() -> Iterator[None]:
    """Turn the first SIGINT, SIGTERM or SIGHUP into an exception, so runs stop and clean up.

    SIGINT raises ``KeyboardInterrupt``, SIGTERM and SIGHUP raise :class:`SignalInterrupt`. A
    later signal raises nothing (so cleanup is not interrupted half-way) but ends the grace
    period of :func:`run_in_group`'s stop at once. While :func:`run_in_group` starts a
    command, the exception is held and raised once the command can be stopped. A signal
    already ignored (``nohup``, a shell's background job) stays ignored. Outside the main
    thread it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if raised:
            _hurry.set()
            return
        raised = True
        exc = KeyboardInterrupt() if signum == signal.SIGINT else SignalInterrupt(signum)
        if _holding:
            _held.append(exc)
            return
        raise exc

    _hurry.clear()
    _held.clear()
    previous = {
        s: signal.signal(s, handler)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        if signal.getsignal(s) != signal.SIG_IGN  # under nohup, or a shell's background job
    }
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def run_foreground(command: Sequence[str], env: dict[str, str]) -> int:
    """Run ``command`` and return its exit status (128 + N when signal N killed it).

    While it runs, SIGINT is ignored here (the terminal sends it to the whole process group,
    so the command already has it) and SIGTERM and SIGHUP are passed on to the command.
    The command starts with default signal handling.

    Raises:
        OSError: the command cannot be started (missing, not executable).
    """
    child: list[subprocess.Popen[bytes]] = []
    early: list[int] = []  # signals that came before the child existed

    def forward(signum: int, frame: FrameType | None) -> None:
        if child:
            with contextlib.suppress(ProcessLookupError):
                child[0].send_signal(signum)
        else:
            early.append(signum)

    def wait_only(signum: int, frame: FrameType | None) -> None:
        if not child:
            early.append(signum)

    previous: dict[int, signal._HANDLER] = {}
    if threading.current_thread() is threading.main_thread():
        # Python-level handlers, not SIG_IGN: exec resets caught signals to their default
        # in the child, while an ignored one would stay ignored there. A signal ignored
        # already (nohup, a shell's background job) stays ignored, for the child too.
        for sig, handler in (
            (signal.SIGINT, wait_only),
            (signal.SIGTERM, forward),
            (signal.SIGHUP, forward),
        ):
            if signal.getsignal(sig) != signal.SIG_IGN:
                previous[sig] = signal.signal(sig, handler)
    try:
        if early:  # interrupted before starting: do not start
            return 128 + early[0]
        proc = subprocess.Popen(list(command), env=env)
        child.append(proc)
        for signum in early:
            if signum != signal.SIGINT:
                proc.send_signal(signum)
        return exit_status(proc.wait())
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@dataclass(frozen=True)
class Finished:
    """How a run in its own process group ended."""

    returncode: int
    timed_out: bool = False


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether ``proc`` has exited, without reaping it (so its process group id stays taken)."""
    if not hasattr(os, "waitid"):  # then reaped at once: a group id reused within
        return proc.poll() is not None  # microseconds could be hit; Linux never gets here
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of ``pid`` from ``/proc``; None when gone or no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        return fields[0].decode(), int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _descendants(root: int) -> dict[int, int]:
    """``{pid: start time}`` of every process below ``root``, in any session (Linux only).

    torchrun starts each worker in a session of its own, out of reach of a group signal.
    """
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return {}
    children: dict[int, list[tuple[int, int]]] = {}
    for pid in entries:
        info = _stat(pid)
        if info is not None:
            children.setdefault(info[1], []).append((pid, info[2]))
    found: dict[int, int] = {}
    stack = [root]
    while stack:
        for pid, start in children.get(stack.pop(), []):
            if pid not in found:
                found[pid] = start
                stack.append(pid)
    return found


class _Group:
    """A running command: its process group, and every descendant seen (pid -> start time)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.seen: dict[int, int] = {}

    def look(self) -> None:
        if not _exited(self.proc):
            self.seen.update(_descendants(self.proc.pid))

    def _alive(self) -> list[int]:
        alive = []
        for pid, start in self.seen.items():
            info = _stat(pid)
            if info is not None and info[2] == start and info[0] not in ("Z", "X"):
                alive.append(pid)  # the same process (not a reused pid), not a zombie
        return alive

    def kill(self) -> None:
        """SIGKILL the group and every descendant seen that still runs; reap the leader."""
        _signal_group(self.proc.pid, signal.SIGKILL)  # the leader is unreaped: the id is ours
        for pid in self._alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, signum: int, grace: float) -> None:
        """``signum`` to the group; after ``grace`` seconds (or a second signal), :meth:`kill`."""
        self.look()
        _signal_group(self.proc.pid, signum)
        deadline = time.monotonic() + grace
        try:
            while time.monotonic() < deadline and not _hurry.is_set():
                if _exited(self.proc) and not self._alive():
                    break
                time.sleep(0.02)
        finally:  # also when a second Ctrl-C cuts the grace short
            self.kill()


def _signal_for(exc: BaseException) -> int:
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(exc, SignalInterrupt):
        return exc.signum
    return signal.SIGTERM


def run_in_group(
    command: Sequence[str],
    env: dict[str, str],
    *,
    stdout: Path,
    stderr: Path,
    timeout: float | None = None,
    tick: Callable[[], None] | None = None,
    grace: float = GRACE_S,
) -> Finished:
    """Run ``command`` in a new session and process group; leave nothing of it running.

    Output is appended to ``stdout`` and ``stderr``; stdin is ``/dev/null``. When the
    command exits, whatever it left running is killed: its process group, and on Linux
    every descendant seen meanwhile (looked for every :data:`LOOK_EVERY_S`), in whatever session
    (torchrun's workers have their own). After ``timeout`` seconds the group gets SIGTERM,
    then all of it SIGKILL ``grace`` seconds later. If this process is interrupted
    meanwhile (``KeyboardInterrupt``, :class:`SignalInterrupt`, any exception), the group
    gets the same signal (SIGINT, SIGTERM, SIGHUP; SIGTERM otherwise), then SIGKILL after
    ``grace``, and the exception propagates. ``tick`` is called about once a second.

    Raises:
        OSError: the command cannot be started (missing, not executable).
    """
    global _holding
    _holding = True  # an interrupt inside Popen would lose the child: hold it until `try`
    try:
        with open(stdout, "ab") as out, open(stderr, "ab") as err:
            proc = subprocess.Popen(
                list(command),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        group = _Group(proc)
    finally:
        _holding = False
    try:
        if _held:
            raise _held.pop()
        group.look()
        deadline = None if timeout is None else time.monotonic() + timeout
        next_tick, next_look = time.monotonic() + 1.0, time.monotonic() + LOOK_EVERY_S
        pause = 0.001
        while not _exited(proc):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                group.stop(signal.SIGTERM, grace)
                return Finished(proc.returncode, timed_out=True)
            if now >= next_look:
                next_look = now + LOOK_EVERY_S
                group.look()
            if tick is not None and now >= next_tick:
                next_tick = now + 1.0
                tick()
            time.sleep(pause)
            pause = min(pause * 2, 0.1)  # quick commands end quickly; long ones poll 10x/s
        group.kill()  # what it left behind (`cmd &`, orphaned workers)
        return Finished(proc.returncode)
    except BaseException as exc:
        group.stop(_signal_for(exc), grace)
        raise


def tail(path: Path, lines: int = 20, max_bytes: int = TAIL_BYTES) -> str:
    """The last ``lines`` lines of the file at ``path``, reading at most its last ``max_bytes``.

    Undecodable bytes become U+FFFD; a missing or unreadable file gives ``""``.
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(size - max_bytes, 0))
            data = f.read(max_bytes)
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size > max_bytes and "\n" in text:
        text = text.partition("\n")[2]  # the first line is cut
    return "\n".join(text.rstrip().splitlines()[-lines:])


# What a process prints when the C++ runtime aborts on a still-running std::thread: here,
# gloo's, when a process exits with its process group initialised (pytorch issue 190489).
_ABORT_TEXT = "terminate called without an active exception"
# torchrun's report of a worker that SIGABRT ended ("exitcode  : -6 (pid: 4242)  (SIGABRT)").
_TORCHRUN_SIGABRT = re.compile(r"exitcode\s*:\s*-6\b")


def gloo_teardown_abort(returncode: int, stderr: Path) -> str | None:
    """Why a run failed, when it is torch's gloo teardown abort; None for anything else.

    The abort: a process exits with its gloo process group still initialised and torch's
    teardown ends it with SIGABRT ("terminate called without an active exception"), about
    half the time with torch 2.14 (pytorch issue 190489). Recognised by that line in the
    last :data:`TAIL_BYTES` of ``stderr`` and a SIGABRT: ``returncode`` -6 (or 134, a
    shell's status for it), or torchrun's report of a worker's exit code -6.
    """
    if returncode == 0:
        return None
    text = tail(stderr, lines=10**9)
    if _ABORT_TEXT not in text:
        return None
    if returncode not in (-signal.SIGABRT, 128 + signal.SIGABRT) and not _TORCHRUN_SIGABRT.search(
        text
    ):
        return None
    return (
        f"was ended by torch's gloo teardown abort ({_ABORT_TEXT!r}, SIGABRT), not by a "
        "reproducibility problem: a process exited with its gloo process group still "
        "initialised, which aborts about half the time with torch 2.14 (pytorch issue 190489). "
        "Call torch.distributed.destroy_process_group() before the script ends, or import "
        "torchrepro in every process (it destroys a group left initialised at exit)"
    )
