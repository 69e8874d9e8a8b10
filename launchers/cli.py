"""``podscale``: one CLI for every backend, launcher and report.

Each subcommand lives in its own module exposing ``register(subparsers)`` (which sets
``func``); this file only wires them up and turns the two error classes into exit codes
(2 = bad input, 3 = the run died), each as one line, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from launchers.flags import EXIT_EPILOG, OneLineParser
from scaling import __version__
from scaling.errors import Diverged, RunFailed, UsageError, UserCodeFailed

#: modules that add subcommands; other issues append theirs
COMMAND_MODULES = [
    "launchers.cmd_run",
    "launchers.cmd_hardware",
    "launchers.cmd_scale",
    "launchers.cmd_launch",
    "launchers.cmd_models",
    "launchers.cmd_job",
]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="podscale", description="Data-parallel training that tells you, in numbers, how well it scaled.",
                           epilog=EXIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"podscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # that subcommand has not landed yet
            raise
        mod.register(sub)
    return parser


def _refuse_unknown_flags(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A flag the subcommand does not know is reported first, by that subcommand, with the nearest
    flag it does know (argparse would report a missing required flag instead, or blame the top level)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return
    i = next((i for i, a in enumerate(argv) if a == "--" or a in subs[0].choices), None)
    if i is None or argv[i] == "--":
        return
    p = subs[0].choices[argv[i]]
    rest = argv[i + 1 :]
    rest = rest[: rest.index("--")] if "--" in rest else rest  # after --: another command's flags
    if any(isinstance(a, argparse._SubParsersAction) for a in p._actions):
        return _refuse_unknown_flags(p, rest)  # e.g. cluster validate: the inner command's flags
    unknown = []
    for a in rest:
        if a.startswith("--"):
            found = p._parse_optional(a)  # argparse's own reading: abbreviations and --k=v included
            if found is not None and found[0] is None:
                unknown.append(a)
    if unknown:
        p.unknown_flags(unknown)


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """``podscale ARGV`` parsed as the CLI reads it (argparse exits 2 with one line on bad input)."""
    parser = build_parser()
    argv = list(argv)
    script_args: list[str] = []
    if argv[:1] == ["run"] and "--" in argv:  # podscale run train.py [flags] -- [the script's own args]
        cut = argv.index("--")
        argv, script_args = argv[:cut], argv[cut + 1 :]
    _refuse_unknown_flags(parser, argv)
    args = parser.parse_args(argv)
    if script_args:
        args.script_args = script_args
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"podscale {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except RunFailed as e:
        print(f"podscale {args.command}: run failed: {e}", file=sys.stderr)
        return e.exit_code
    except UserCodeFailed as e:
        print(getattr(e, "traceback", "") + f"podscale {args.command}: your code failed: {e}", file=sys.stderr)
        return e.exit_code
    except Diverged as e:
        print(f"podscale {args.command}: diverged: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("podscale: interrupted", file=sys.stderr)
        return 130
    except BaseException as e:
        if type(e).__name__ == "Terminated":  # scaling.world: SIGTERM, ranks already killed
            print(f"podscale {args.command}: {e}; all ranks were killed", file=sys.stderr)
            return 143
        raise


if __name__ == "__main__":
    sys.exit(main())
