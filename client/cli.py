"""``fedrec-client``: what a partner organisation runs on its own machine.

    fedrec-client keys --out keys --name partner-1         # SuperNode authentication key pair
    fedrec-client data check --data-path log.csv --catalogue catalogue.txt
    fedrec-client data check --catalogue catalogue.txt --node-config 'data-path="log.csv" ledger-path="l.sqlite"'
    fedrec-client recommend --model runs/RUN --data-path log.csv --user 42   # top-K with reasons
    fedrec-client serve --model runs --store events.sqlite                    # HTTP API on 127.0.0.1

Every user mistake is one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from common.cli_errors import user_errors_exit


def _keys(args: argparse.Namespace) -> int:
    from client.keys import create_node_keys

    keys = create_node_keys(args.out, name=args.name, force=args.force)
    print(f"private key (keep it; flower-supernode --auth-supernode-private-key): {keys.private_key}")
    print(f"public key (send it to the coordinator for `flwr supernode register`): {keys.public_key}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from client.data_check import check_node_config_text, check_partner_log
    from common.data.sequences import MIN_INTERACTIONS
    from common.errors import ConfigError

    node = check_node_config_text(args.node_config) if args.node_config is not None else {}
    data_path = args.data_path or node.get("data-path")
    if not data_path:
        raise ConfigError("give --data-path, or a --node-config with data-path")
    if args.data_path and node.get("data-path") and str(args.data_path) != str(node["data-path"]):
        raise ConfigError(f"--data-path {args.data_path} is not the node config's data-path {node['data-path']}; "
                          "give one of the two (the SuperNode reads its node config's)")
    report = check_partner_log(data_path, args.catalogue, node)
    print("\n".join(report.lines()))
    if report.train_users == 0:
        print(f"error: no user has a training example (two training items, so {MIN_INTERACTIONS + 1} interactions with "
              "catalogue items or more); this log cannot train the model", file=sys.stderr)
        return 2
    for line in report.warnings():
        print(line, file=sys.stderr)
    print("ok: this log can join a run" + (" (see the warning above)" if report.warnings() else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands register their handler as ``func``)."""
    parser = argparse.ArgumentParser(prog="fedrec-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    keys = sub.add_parser("keys", help="create this partner's SuperNode authentication key pair (ECDSA P-384, OpenSSH)")
    keys.add_argument("--out", required=True, help="folder for NAME (private, 0600) and NAME.pub")
    keys.add_argument("--name", required=True, help="partner name, e.g. partner-1 (becomes the file name)")
    keys.add_argument("--force", action="store_true", help="overwrite existing key files")
    keys.set_defaults(func=_keys)

    data = sub.add_parser("data", help="inspect this partner's interaction log")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="validate a log: columns, catalogue coverage, users per split")
    check.add_argument("--data-path", default=None,
                       help="the log (CSV/Parquet/MovieLens), as in --node-config data-path")
    check.add_argument("--catalogue", default=None, help="the coordinator's published catalogue (one item id per line)")
    check.add_argument("--node-config", default=None,
                       help="the SuperNode's --node-config string, checked as the ClientApp will at the first message "
                            "(keys, values, catalogue-fingerprint against --catalogue, ledger-path); nothing is written")
    check.set_defaults(func=_data_check)

    from client.serving_cli import add_serving_commands  # recommend, serve, finetune

    add_serving_commands(sub)
    return parser


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
