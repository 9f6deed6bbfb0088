"""The ``moonforge`` command. Each subcommand lives next to the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from moonforge.utils import setup_logging

# (subcommand, module): each module defines ``register(subparsers)`` adding its parser with ``func`` set.
SUBCOMMANDS = [
    ("tokenizer", "moonforge.tokenizer_cli"),
    ("data", "moonforge.data.cli"),
    ("convert", "moonforge.checkpoint.cli"),
    ("verify", "moonforge.checkpoint.verify"),
    ("train", "moonforge.train.cli"),
    ("eval", "moonforge.eval.cli"),
    ("demo", "moonforge.demo"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moonforge",
        description="Continued pre-training, fine-tuning, conversion and evaluation of Moonlight-16B-A3B and other "
                    "DeepSeek-V3-architecture models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue  # not part of this installation
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
