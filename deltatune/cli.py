"""The `deltatune` command: a thin layer that parses arguments, calls the library and prints."""

from __future__ import annotations

import argparse
import sys

from deltatune.errors import DeltaTuneError


def cmd_params(args: argparse.Namespace) -> int:
    from deltatune.params import format_table, parameter_table

    rows, config = parameter_table(args.arch)
    print(format_table(rows, args.arch, config))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltatune",
        description="Parameter-efficient fine-tuning (LoRA, adapters, prompt tuning, BitFit) as per-task deltas.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    params = commands.add_parser(
        "params", help="trainable parameters of every method for an architecture (built without weights)"
    )
    params.add_argument(
        "--arch",
        default="roberta-large",
        help="roberta-large | roberta-base | bert-large | bert-base | gpt2-medium | gpt2 | minilm | PATH",
    )
    params.set_defaults(handler=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except DeltaTuneError as error:
        print(f"deltatune: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
