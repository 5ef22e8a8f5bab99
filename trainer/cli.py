"""Command line of the trainer: `python -m trainer {demo,inspect} ...`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="build the tiny model set and run it end to end on CPU",
        description="Builds the built-in tiny S2V model set (transformer, VAE, UMT5, wav2vec2) "
        "in both on-disk formats, loads it back through the real loaders and runs a forward.",
    )
    parser.add_argument("--out", default="output/demo", help="output folder (default: output/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .cli_inspect import add_inspect_parser
    from .data.cli import add_dataset_parser
    from .sample.cli import add_sample_parser
    from .train.cli import add_train_parser

    parser = argparse.ArgumentParser(prog="python -m trainer", description="Wan 2.2 S2V LoRA trainer")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo_parser(subparsers)
    add_inspect_parser(subparsers)
    add_dataset_parser(subparsers)
    add_train_parser(subparsers)
    add_sample_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
