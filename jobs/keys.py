"""`rdm keys`: named client keys for the serving app's `api_keys_file` (digests only; see cluster.serve.auth)."""

from __future__ import annotations

import argparse

from cluster.serve.auth import add_key, read_keys, revoke_key
from jobs.common import EXIT_OK, exit_codes, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdm keys", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="create a key for a client and print it (shown only once)")
    add.add_argument("client", help="a name of a-z, 0-9, '.', '_', '-' (recorded with its requests)")
    revoke = commands.add_parser("revoke", help="delete a client's key (a running app stops taking it)")
    revoke.add_argument("client")
    commands.add_parser("list", help="the clients that have a key")
    for command in commands.choices.values():
        command.add_argument("--file", required=True, help="the keys file (the app's api_keys_file)")
    return parser


@exit_codes
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.command == "add":
        print(add_key(args.file, args.client))
    elif args.command == "revoke":
        revoke_key(args.file, args.client)
    else:
        for client in sorted(read_keys(args.file)):
            print(client)
    return EXIT_OK
