"""The ``torchrepro`` command line. Argument parsing and printing live here only."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import stat
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ._errors import TorchreproError
from ._version import __version__
from .check._plan import MAX_RUNS, MIN_RUNS, plan_runs, run_environment
from .check._process import SignalInterrupt, raise_on_signals, run_foreground
from .check._results import CheckReport
from .check._runner import run_check
from .core._seed import SEED_MAX
from .env._diff import _flatten, diff_fingerprints
from .env._fingerprint import fingerprint

EXIT_OK, EXIT_DIFFERENT, EXIT_USAGE = 0, 1, 2
# A fingerprint from `torchrepro env --json` is a few KB and a few levels deep.
FINGERPRINT_MAX_BYTES = 1 << 20
FINGERPRINT_MAX_DEPTH = 32
# Terminal control characters (C0, DEL, C1), kept out of what is printed; newline and tab
# are kept where text spans lines.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _visible(text: str, *, lines: bool = True) -> str:
    """``text`` with terminal control characters escaped (``\\x1b``), so it prints as is."""
    pattern = _CONTROL_BUT_LINES if lines else _CONTROL
    return pattern.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _error(command: str, message: str) -> int:
    """Report a failure that is not a usage error; exit status 2."""
    print(f"torchrepro {command}: error: {_visible(message)}", file=sys.stderr)
    return EXIT_USAGE


def _seed_arg(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an integer in [0, 2**64 - 1], got {text!r}"
        ) from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64 - 1], got {text!r}")
    return value


def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``run``/``check`` options, and the command after the first ``--`` (None: no ``--``)."""
    sub = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)
    if sub is None or argv[sub] not in ("run", "check") or "--" not in argv[sub + 1 :]:
        return argv, None
    split = argv.index("--", sub + 1)
    return argv[:split], argv[split + 1 :]


def _command(
    parser: argparse.ArgumentParser, args: argparse.Namespace, after: list[str] | None
) -> list[str]:
    """The command to run: what follows ``--``; words before ``--`` are refused."""
    name = parser.prog
    if args.command:  # words that are not options, and no -- before them
        parser.error(
            f"put -- before the command: `{name} [options] -- CMD ...` (got "
            f"{' '.join(args.command)!r} without --; options after the command are the "
            f"command's own, so `{name}` would not see them)"
        )
    if not after:
        parser.error(
            f"missing the command to run; write it after --, e.g. `{name} -- python train.py`"
        )
    return after


def _on_off(value: Any) -> str:
    return {True: "on", False: "off", None: "- (not in this torch)"}.get(value, str(value))


def _display(key: str, value: Any) -> str:
    """A fingerprint value as the ``env`` table shows it."""
    if key == "determinism.deterministic_algorithms" and isinstance(value, list):
        enabled, warn_only = [*value, None, None][:2]
        return f"{_on_off(enabled)} (warn_only: {_on_off(warn_only)})"
    if key.startswith("determinism.env."):
        return "- (unset)" if value is None else str(value)
    if key.startswith("determinism.") and (isinstance(value, bool) or value is None):
        return _on_off(value)
    if key == "gpus" and value == []:
        return "- (no CUDA device)"
    return "-" if value is None or value == [] else str(value)


def _depth(value: Any) -> int:
    """How deeply ``value`` nests lists and dicts (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if deepest > FINGERPRINT_MAX_DEPTH:
                break
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def _load_json(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    shown = _visible(repr(path))

    def refuse(why: str) -> NoReturn:
        parser.error(f"cannot read fingerprint {shown}: {why}")

    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        refuse(exc.strerror or str(exc))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            refuse("not a regular file (save one with `torchrepro env --json > A.json`)")
        data = b""
        while len(data) <= FINGERPRINT_MAX_BYTES:
            chunk = os.read(fd, FINGERPRINT_MAX_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        refuse(exc.strerror or str(exc))
    finally:
        os.close(fd)
    if len(data) > FINGERPRINT_MAX_BYTES:
        refuse(f"larger than {FINGERPRINT_MAX_BYTES >> 20} MiB; a fingerprint is a few KB")
    try:
        loaded = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        refuse("not UTF-8 text")
    except RecursionError:
        refuse(f"JSON nested deeper than a fingerprint ({FINGERPRINT_MAX_DEPTH} levels)")
    except ValueError as exc:  # bad JSON, or an integer too long to convert
        refuse(f"not valid JSON ({exc})")
    if not isinstance(loaded, dict):
        refuse("not a fingerprint (expected a JSON object from `torchrepro env --json`)")
    if _depth(loaded) > FINGERPRINT_MAX_DEPTH:
        refuse(f"JSON nested deeper than a fingerprint ({FINGERPRINT_MAX_DEPTH} levels)")
    return loaded


def _cmd_env(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.diff:
        a, b = (_load_json(parser, p) for p in args.diff)
        diffs = diff_fingerprints(a, b)
        if args.json:
            print(json.dumps([d.__dict__ for d in diffs], indent=2, default=str))
            return EXIT_DIFFERENT if any(d.changes_results for d in diffs) else EXIT_OK
        important = [d for d in diffs if d.changes_results]
        harmless = [d for d in diffs if not d.changes_results]
        if not diffs:
            print("The fingerprints are identical.")
        if important:
            print(f"Differences that can change results ({len(important)}), most important first:")
            for d in important:
                print(f"  {_visible(str(d), lines=False)}")
        else:
            print("No difference that can change results.")
        if harmless:
            print(f"Harmless differences ({len(harmless)}):")
            for d in harmless:
                print(f"  {_visible(str(d), lines=False)}")
        return EXIT_DIFFERENT if important else EXIT_OK
    fp = fingerprint()
    if args.json:
        print(json.dumps(fp, indent=2, sort_keys=False))
        return EXIT_OK
    rows = [(key, _display(key, value)) for key, value in _flatten(fp).items()]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(_visible(f"{key.ljust(width)}  {value}", lines=False))
    return EXIT_OK


def _cmd_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        return run_foreground(args.command, run_environment(args.seed))
    except OSError as exc:
        _error("run", f"cannot start {args.command[0]!r}: {exc.strerror or exc}")
        return 127 if isinstance(exc, FileNotFoundError) else 126


def _positive(text: str, most: int | None = None, least: int = 1) -> int:
    expected = f"an integer >= {least}" if most is None else f"an integer in [{least}, {most}]"
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
    if value < least or (most is not None and value > most):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def _runs(text: str) -> int:
    try:
        return _positive(text, MAX_RUNS, MIN_RUNS)
    except argparse.ArgumentTypeError as exc:
        if text.strip() not in ("0", "1"):
            raise
        raise argparse.ArgumentTypeError(  # the usual mistake gets the reason, not only the range
            f"{exc}: only two runs of one identical configuration can show that it reproduces "
            "(--vary and --resume-at runs change something); use --runs 2 (the default)"
        ) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _last_screen_line(line: str) -> str:
    """What a terminal shows of a line with carriage returns (progress bars): its last part."""
    return line.rstrip("\r").rpartition("\r")[2]


def _print_report(report: CheckReport, kept: bool) -> None:
    print(_visible(report.verdict()))
    if report.error is not None:
        failed = report.runs[-1] if report.runs else None
        if failed is not None and failed.stderr_tail:
            where = f" ({failed.directory / 'stderr.log'})" if kept else ""
            print(f"--- last lines of its stderr{_visible(where)}:")
            tail = "\n".join(_last_screen_line(line) for line in failed.stderr_tail.split("\n"))
            print(_visible(tail))
        return
    for line in report.explanation():
        print(line)
    verdict = report.verdict()
    same = report.same_settings_differ
    shown = [same] if same is not None else report.unexpected
    for comparison in shown:
        lines = comparison.format().splitlines()
        print(_visible("\n".join(lines[1:] if lines[0] in verdict else lines)))
        verdict = ""  # later divergences keep their own verdict line
    if report.pinpoint_note:
        print(_visible(f"  {report.pinpoint_note}"))
    for note in report.notes:
        print(_visible(f"note: {note}"))
    _print_explanation(report)
    names = ", ".join(f'"{r.spec.name}"' for r in report.runs)
    print(_visible(f"runs: {names}"))


def _print_explanation(report: CheckReport) -> None:
    """Why the runs part, after the comparison's batch line: the module, the environment."""
    diverged = [e for e in report.explanations if e.comparison in report.unexpected]
    if not diverged:
        return
    first = min(diverged, key=lambda e: e.comparison.first_step or 0)
    if report.localization is not None:
        print(_visible(f"  module: {report.localization.describe()}"))
    if report.localization_note:
        print(_visible(f"  {report.localization_note}"))
    # The comparison printed its own batch line when the traces held batch checksums.
    lines = first.lines()[1 if first.comparison.batch_differs is not None else 0 :]
    print(_visible("\n".join("  " + line for line in lines)))


def _cmd_check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:  # argument errors are usage errors; what fails later is not
        plan_runs(args.runs, args.vary, args.resume_at)
    except ValueError as exc:
        parser.error(str(exc))
    interactive = sys.stderr.isatty()

    def progress(line: str) -> None:
        line = _visible(line, lines=False)
        if interactive:
            print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)
        elif not line.endswith(" steps") or "done" in line:
            print(line, file=sys.stderr, flush=True)

    try:
        with raise_on_signals():
            report = run_check(
                args.command,
                runs=args.runs,
                vary=args.vary,
                resume_at=args.resume_at,
                keep=args.keep,
                seed=args.seed,
                progress=progress,
                timeout=args.timeout,
                localize=args.localize,
            )
    except (KeyboardInterrupt, SignalInterrupt) as exc:
        signum = exc.signum if isinstance(exc, SignalInterrupt) else signal.SIGINT
        kept = f"kept {args.keep!r}" if args.keep else "removed the temporary directory"
        if interactive:
            print("\r\033[K", end="", file=sys.stderr)
        print(
            f"torchrepro check: interrupted by {signal.Signals(signum).name}: stopped the "
            f"running command and every process it started; {_visible(kept)}",
            file=sys.stderr,
        )
        return 128 + signum
    except ValueError as exc:
        return _error("check", str(exc))
    if interactive:
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report, kept=args.keep is not None)
    if args.report:
        from .check._report import check_page, write_report

        options = [f"--vary {v}" for v in args.vary]
        options += [f"--resume-at {args.resume_at}"] if args.resume_at else []
        title = " ".join(["torchrepro check", *options, "--", *args.command])
        write_report(args.report, check_page(report, title))
        print(f"report: {args.report}", file=sys.stderr)
    if report.error is not None:
        return EXIT_USAGE
    return EXIT_OK if report.reproducible else EXIT_DIFFERENT


def _cmd_compare(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from ._errors import TraceError
    from .check._explain import explain
    from .trace._compare import compare_traces, read_trace

    try:
        a, b = (read_trace(path) for path in args.traces)
    except TraceError as exc:
        return _error("compare", str(exc))
    explanation = explain(a, b, compare_traces(a, b, names=(args.traces[0], args.traces[1])))
    if args.json:
        print(json.dumps(explanation.to_dict(), indent=2, default=str))
    else:
        print(_visible(explanation.comparison.format()))
        for line in explanation.lines():
            print(_visible(f"  {line}"))
    if args.report:
        from .check._report import compare_page, write_report

        write_report(args.report, compare_page(explanation, a, b))
        print(f"report: {args.report}", file=sys.stderr)
    return EXIT_OK if explanation.comparison.identical else EXIT_DIFFERENT


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``torchrepro`` command."""
    parser = argparse.ArgumentParser(
        prog="torchrepro",
        description="Bitwise-reproducible PyTorch training, and the tools that prove it.",
    )
    parser.add_argument("--version", action="version", version=f"torchrepro {__version__}")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    sub.required = True

    env = sub.add_parser("env", help="print this machine's environment fingerprint, or diff two")
    env.add_argument("--json", action="store_true", help="print JSON (save it to diff later)")
    env.add_argument(
        "--diff", nargs=2, metavar=("A.json", "B.json"), help="compare two saved fingerprints"
    )
    env.set_defaults(func=_cmd_env, parser=env)

    run = sub.add_parser(
        "run",
        usage="%(prog)s [--seed N] -- CMD ...",
        help="run a command with PYTHONHASHSEED and CUBLAS_WORKSPACE_CONFIG fixed",
        description="Run CMD with PYTHONHASHSEED (0, or the seed) and CUBLAS_WORKSPACE_CONFIG=:4096:8 set "
        "before Python starts; with --seed also TORCHREPRO_SEED. Ctrl-C reaches CMD from the terminal "
        "(run only waits); SIGTERM and SIGHUP are passed on to it. Exits with CMD's status "
        "(128 + N when signal N killed it).",
    )
    run.add_argument("--seed", type=_seed_arg, help="seed for TORCHREPRO_SEED and PYTHONHASHSEED")
    run.add_argument(
        "command", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the command, after --"
    )
    run.set_defaults(func=_cmd_run, parser=run)

    check = sub.add_parser(
        "check",
        usage="%(prog)s [options] -- CMD ...",
        help="run a training command several ways and name the first step and tensor where runs diverge",
        description="Run CMD --runs times, once more per further value of each --vary, and with "
        "--resume-at K once stopped at step K and resumed in a fresh process; compare the traces "
        "(torchrepro.Trace) bitwise. Each run starts in a session of its own; nothing it started "
        "outlives it. Exit 0: identical; 1: diverged; 2: usage error or a failed run; "
        "128 + N: stopped by signal N.",
    )
    check.add_argument(
        "--runs",
        type=_runs,
        metavar="N",
        default=2,
        help=f"runs with the base settings (default 2, at most {MAX_RUNS})",
    )
    check.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="num_workers (TORCHREPRO_NUM_WORKERS), seed (TORCHREPRO_SEED) or any env var; repeatable",
    )
    check.add_argument(
        "--resume-at", type=_positive, metavar="K", help="also stop at step K and resume"
    )
    check.add_argument(
        "--keep",
        metavar="DIR",
        help="keep traces, checkpoints and logs in DIR/run1, DIR/run2, ... (refused if they "
        "exist and are not empty: nothing is deleted)",
    )
    check.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="stop a run's process after this long (SIGTERM, then SIGKILL) and fail, naming it",
    )
    check.add_argument(
        "--seed", type=_seed_arg, help="TORCHREPRO_SEED for every run (default: yours, or 0)"
    )
    check.add_argument("--json", action="store_true", help="print the comparison as JSON")
    check.add_argument(
        "--localize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="on divergence, re-run the two diverging runs for the first divergent step and name the "
        "first module whose output or gradient differs (default: when the batch was identical and "
        "a checkpoint before that step exists)",
    )
    check.add_argument("--report", metavar="PATH.html", help="also write an HTML report")
    check.add_argument(
        "command", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the command, after --"
    )
    check.set_defaults(func=_cmd_check, parser=check)

    compare = sub.add_parser(
        "compare",
        help="compare two traces (two machines, two dates) and rank the environment differences",
        description="Compare two traces bitwise: the first divergent step and tensor, whether the "
        "batch already differed, and the result-changing differences of the fingerprints in the "
        "traces' headers, most likely explanation first. Exit 0: identical; 1: diverged; 2: error.",
    )
    compare.add_argument("traces", nargs=2, metavar=("A.jsonl", "B.jsonl"))
    compare.add_argument("--json", action="store_true", help="print the explanation as JSON")
    compare.add_argument("--report", metavar="PATH.html", help="also write an HTML report")
    compare.set_defaults(func=_cmd_compare, parser=compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchrepro`` command; returns the exit status.

    No arguments print the help to stderr and return 2 (a usage error). Failures that are
    not usage errors print ``torchrepro CMD: error: ...`` and return 2; no traceback is
    printed unless ``TORCHREPRO_DEBUG=1``.
    """
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    if not words:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    options, after = _split_command(words)
    args = parser.parse_args(options)
    if args.subcommand in ("run", "check"):
        args.command = _command(args.parser, args, after)
    try:
        return int(args.func(args.parser, args))
    except KeyboardInterrupt:
        print(f"torchrepro {args.subcommand}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except (TorchreproError, OSError, ValueError, TypeError, RecursionError, MemoryError) as exc:
        if os.environ.get("TORCHREPRO_DEBUG") == "1":
            raise
        return _error(args.subcommand, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a bug: one line, and how to see more
        if os.environ.get("TORCHREPRO_DEBUG") == "1":
            raise
        return _error(
            args.subcommand,
            f"internal error {type(exc).__name__}: {exc} (a bug in torchrepro; "
            "TORCHREPRO_DEBUG=1 shows the traceback)",
        )
