"""The ``torchrepro`` command line. Argument parsing and printing live here only."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._check import CheckReport, run_check, run_environment
from ._envdiff import diff_fingerprints
from ._fingerprint import fingerprint
from ._seed import SEED_MAX
from ._version import __version__

EXIT_OK, EXIT_DIFFERENT, EXIT_USAGE = 0, 1, 2


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


def _command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("missing the command to run; write it after --, e.g. `-- python train.py`")
    return command


def _flat_rows(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        rows: list[tuple[str, str]] = []
        for key, item in value.items():
            rows += _flat_rows(item, f"{prefix}.{key}" if prefix else str(key))
        return rows
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [row for i, item in enumerate(value) for row in _flat_rows(item, f"{prefix}[{i}]")]
    return [(prefix, "-" if value is None or value == [] else str(value))]


def _load_json(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        parser.error(f"cannot read fingerprint {path!r}: {exc}")
    if not isinstance(data, dict):
        parser.error(
            f"{path!r} is not a fingerprint (expected a JSON object from `torchrepro env --json`)"
        )
    return data


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
                print(f"  {d}")
        else:
            print("No difference that can change results.")
        if harmless:
            print(f"Harmless differences ({len(harmless)}):")
            for d in harmless:
                print(f"  {d}")
        return EXIT_DIFFERENT if important else EXIT_OK
    fp = fingerprint()
    if args.json:
        print(json.dumps(fp, indent=2, sort_keys=False))
        return EXIT_OK
    rows = _flat_rows(fp)
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    return EXIT_OK


def _exit_code(returncode: int) -> int:
    # A child killed by signal N reports -N; shells report 128 + N.
    return 128 - returncode if returncode < 0 else returncode


def _cmd_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    command = _command(parser, args)
    try:
        proc = subprocess.Popen(command, env=run_environment(args.seed))
    except OSError as exc:
        print(f"torchrepro run: cannot start {command[0]!r}: {exc}", file=sys.stderr)
        return 127
    while True:
        try:
            return _exit_code(proc.wait())
        except KeyboardInterrupt:  # the child got SIGINT too; wait for it to finish
            proc.send_signal(signal.SIGINT)


def _positive(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _print_report(report: CheckReport, kept: bool) -> None:
    print(report.verdict())
    if report.error is not None:
        failed = report.runs[-1] if report.runs else None
        if failed is not None and failed.stderr_tail:
            where = f" ({failed.directory / 'stderr.log'})" if kept else ""
            print(f"--- last lines of its stderr{where}:")
            print(failed.stderr_tail)
        return
    for line in report.explanation():
        print(line)
    verdict = report.verdict()
    same = report.same_settings_differ
    shown = [same] if same is not None else report.unexpected
    for comparison in shown:
        lines = comparison.format().splitlines()
        print("\n".join(lines[1:] if lines[0] in verdict else lines))
        verdict = ""  # later divergences keep their own verdict line
    for note in report.notes:
        print(f"note: {note}")
    names = ", ".join(f'"{r.spec.name}"' for r in report.runs)
    print(f"runs: {names}")


def _cmd_check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    command = _command(parser, args)
    interactive = sys.stderr.isatty()

    def progress(line: str) -> None:
        if interactive:
            print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)
        elif not line.endswith(" steps") or "done" in line:
            print(line, file=sys.stderr, flush=True)

    try:
        report = run_check(
            command,
            runs=args.runs,
            vary=args.vary,
            resume_at=args.resume_at,
            keep=args.keep,
            seed=args.seed,
            progress=progress,
        )
    except ValueError as exc:
        parser.error(str(exc))
    if interactive:
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report, kept=args.keep is not None)
    if report.error is not None:
        return EXIT_USAGE
    return EXIT_OK if report.reproducible else EXIT_DIFFERENT


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
        help="run a command with PYTHONHASHSEED and CUBLAS_WORKSPACE_CONFIG fixed",
        description="Run CMD with PYTHONHASHSEED (0, or the seed) and CUBLAS_WORKSPACE_CONFIG=:4096:8 set "
        "before Python starts; with --seed also TORCHREPRO_SEED. Exits with CMD's status.",
    )
    run.add_argument("--seed", type=_seed_arg, help="seed for TORCHREPRO_SEED and PYTHONHASHSEED")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    run.set_defaults(func=_cmd_run, parser=run)

    check = sub.add_parser(
        "check",
        help="run a training command several ways and name the first step and tensor where runs diverge",
        description="Run CMD --runs times, once more per further value of each --vary, and with "
        "--resume-at K once stopped at step K and resumed in a fresh process; compare the traces "
        "(torchrepro.Trace) bitwise. Exit 0: identical; 1: diverged; 2: usage error or a failed run.",
    )
    check.add_argument(
        "--runs", type=_positive, default=2, help="runs with the base settings (default 2)"
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
    check.add_argument("--keep", metavar="DIR", help="keep traces, checkpoints and logs in DIR")
    check.add_argument(
        "--seed", type=_seed_arg, help="TORCHREPRO_SEED for every run (default: yours, or 0)"
    )
    check.add_argument("--json", action="store_true", help="print the comparison as JSON")
    check.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    check.set_defaults(func=_cmd_check, parser=check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchrepro`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args.parser, args))
