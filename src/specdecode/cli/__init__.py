"""``specdecode``: the command line. It only translates options into settings and calls the library;
each subcommand is a module here with ``register`` (its options) and ``run`` (the call)."""

from __future__ import annotations

import argparse
import re
import sys

from ..config import SpecDecodeError
from . import bench, check, explain, generate, loadtest, serve, train

COMMANDS = (generate, serve, bench, explain, check, train, loadtest)
POSITIONAL = {"prompt", "trace"}  # parameters given as positional arguments, named as they are


def _flag(param: str) -> str:
    return param if param in POSITIONAL else "--" + param.replace("_", "-")


class _Version(argparse.Action):
    """``--version``: this package's version and the engine builds it would run, found without
    loading a model."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        from .. import __version__
        from ..runners.ik_api import describe

        try:
            llamacpp = f"llama.cpp: llama-cpp-python {version('llama-cpp-python')}"
        except PackageNotFoundError:
            llamacpp = "llama.cpp: not installed"
        print(f"specdecode {__version__}\n{describe()}\n{llamacpp}")
        parser.exit()


class _Formatter(argparse.HelpFormatter):
    """Every option's help says its default where it has one (argparse's own
    ArgumentDefaultsHelpFormatter also prints "default: None" and "default: False")."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class _Parser(argparse.ArgumentParser):
    """argparse's parser with its usage errors in our one-line form (``specdecode: error: --flag:
    what``), where argparse prints the whole usage first; the help is one command away. Its
    subcommands' parsers are of this class too, with ``_Formatter``."""

    def __init__(self, *args, formatter_class=_Formatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        message = re.sub(r"^argument ([^:]+): ", lambda m: m.group(1).split("/")[-1] + ": ", message)
        self.exit(2, f"specdecode: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="specdecode", description="Lossless speculative decoding of language models.")
    parser.add_argument("--version", action=_Version, help="the version and the engine builds in use, then exit")
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
