"""``python -m trainer inspect PATH [--config CONFIG]``: describe a transformer checkpoint.

Reads safetensors headers only. Exit status: 0 for a complete Wan 2.2 S2V transformer,
1 for anything else (another model, a LoRA, an incomplete file, a config that does not fit),
2 when the input cannot be read (missing path, not safetensors, corrupt header, bad config).
"""

from __future__ import annotations

import argparse
import json
import sys

from .model.transformer_io import (
    CheckpointError,
    UnreadableCheckpointError,
    format_report,
    inspect_checkpoint,
)

EXIT_COMPLETE = 0
EXIT_NOT_COMPLETE = 1
EXIT_UNREADABLE = 2


def add_inspect_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``inspect`` sub-command on `subparsers` and return its parser."""
    parser = subparsers.add_parser(
        "inspect",
        help="describe a transformer checkpoint (headers only) and check it is a complete S2V model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "path", help="single .safetensors file, Diffusers transformer folder or pipeline root"
    )
    parser.add_argument(
        "--config", default=None, help="config.json (ComfyUI or Diffusers names) for non-default sizes"
    )
    parser.add_argument(
        "--max-keys", type=int, default=20, help="how many missing/unexpected keys to list (default 20)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    parser.set_defaults(func=run_inspect)
    return parser


def run_inspect(args: argparse.Namespace) -> int:
    """Print the report of ``args.path``; return the exit status (see module docstring)."""
    try:
        report = inspect_checkpoint(args.path, config=args.config)
    except UnreadableCheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    except (CheckpointError, ValueError) as exc:  # e.g. an unsupported value in the config
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    if getattr(args, "json", False):
        data = dict(vars(report), kind_label=report.kind_label)
        print(json.dumps(data, indent=2, default=list))
    else:
        print(format_report(report, max_keys=getattr(args, "max_keys", 20)))
    return EXIT_COMPLETE if report.complete else EXIT_NOT_COMPLETE


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m trainer.cli_inspect PATH``)."""
    parser = argparse.ArgumentParser(prog="trainer")
    add_inspect_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["inspect", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
