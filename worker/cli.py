"""The `ksr` command: one entry point for data, training, evaluation, the broker and the worker.

Each subcommand imports what it needs lazily, so `ksr train` never loads Faust and `ksr broker`
never loads PyTorch. `--json` prints exactly one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _cmd_data(args: argparse.Namespace) -> int:
    from model import data

    if args.data_command == "fetch":
        path = data.fetch(args.name)
        print(path)
        return 0
    raise SystemExit(f"unknown data command {args.data_command!r}")


def _cmd_broker(args: argparse.Namespace) -> int:
    from worker import broker

    return broker.main(args.action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ksr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="fetch and prepare data sets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    f = data_sub.add_parser("fetch", help="download, verify and cache a named data set")
    f.add_argument("name", choices=["ml-100k"])
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("broker", help="local single-node Apache Kafka (KRaft) on 127.0.0.1")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.set_defaults(func=_cmd_broker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
