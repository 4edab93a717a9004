"""Command line: `python -m llama_jax <command> ...`. Each command only parses arguments and calls the library.

Every command is an `_add_<name>` function registering a subparser whose `run` default is the function to call.
Library errors (bad config, bad input files) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameter count, layer shapes and per-device shards of a model on a mesh")
    p.add_argument("--preset", default="tiny", help="model preset name (llama2-7b, llama2-13b, llama2-70b, tiny, ...)")
    p.add_argument("--config", help="YAML config whose model/mesh sections are used instead of --preset")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices when no accelerator is present")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. mesh.tensor=2")
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> None:
    from llama_jax.info import print_info
    print_info(args.preset, args.config, args.overrides, args.devices)


COMMANDS = [_add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama_jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
