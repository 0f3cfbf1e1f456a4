"""``specdecode``: the command line. It only translates options into settings and calls the library;
each subcommand is a module here with ``register`` (its options) and ``run`` (the call)."""

from __future__ import annotations

import argparse
import sys

from ..config import SpecDecodeError
from . import bench, check, explain, generate, loadtest, serve, train

COMMANDS = (generate, serve, bench, explain, check, train, loadtest)
POSITIONAL = {"prompt", "trace"}  # parameters given as positional arguments, named as they are


def _flag(param: str) -> str:
    return param if param in POSITIONAL else "--" + param.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdecode", description="Lossless speculative decoding of language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except SpecDecodeError as exc:
        print(f"specdecode: error: {_flag(exc.param)}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
