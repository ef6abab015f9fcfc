"""``fedrec-client recommend | serve | finetune``: a partner's own users, served from the global model.

    fedrec-client recommend --model runs/RUN --data-path ml-100k --user 42 --format table
    fedrec-client serve --model runs --store events.sqlite --import-log ml-100k --port 8000
    fedrec-client finetune --model runs/RUN --data-path events.sqlite --ledger-path ledger.sqlite --since 1700000000

Registered on ``client/cli.py``'s parser by :func:`add_serving_commands`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from common.cli_args import delta, port, positive_float, positive_int
from common.cli_args import seed as seed_arg


METADATA_KEY = "metadata-path"  # event store meta: the titles file its events were imported with


def _metadata_for(data_path: str | None, metadata: str | None) -> str | None:
    """``--metadata`` if given, else MovieLens metadata beside the log (``u.item``/``movies.dat``), else
    the titles an event store was filled with (``serve`` remembers them), else None."""
    if metadata:
        return metadata
    if not data_path:
        return None
    from common.data.attributes import metadata_path
    from common.data.event_store import EventStore, is_event_store

    if is_event_store(data_path):
        with EventStore(data_path) as store:
            return _remembered_metadata(store)
    found = metadata_path(data_path)
    return str(found) if found else None


def _remembered_metadata(store) -> str | None:  # noqa: ANN001 -- an EventStore
    import os

    remembered = store.get_meta(METADATA_KEY)
    if remembered and not os.path.isfile(remembered):
        print(f"warning: the item titles this store was filled with ({remembered}) are gone; serving ids only "
              "(give --metadata)", file=sys.stderr)
        return None
    return remembered


def _recommend(args: argparse.Namespace) -> int:
    from client.recommend import (LogHistory, Recommender, catalogue_mismatch, format_table, load_global_model,
                                  load_titles, titles_mismatch)
    from common.data.event_store import EventStore, is_event_store
    from common.data.loaders import load_interactions

    model = load_global_model(args.model)
    if is_event_store(args.data_path):
        source = EventStore(args.data_path)
    elif args.data_path == "synthetic" and not os.path.exists(args.data_path):
        # the built-in log a simulation ran on (make run's quick start), rebuilt from the model's own config
        from common.data.synthetic import generate_synthetic
        from common.errors import ConfigError

        cfg = model.config
        if (dataset := str(cfg.get("dataset", "synthetic"))) != "synthetic":
            # another model's catalogue over a made-up log: every history and list would be nonsense
            raise ConfigError(f"model {model.path} was trained on {dataset}, not synthetic data; "
                              "give this partner's own log with --data-path")
        if published := str(cfg.get("catalogue") or ""):
            # a deployed run: partners' own logs over a published catalogue; its config keeps the default
            # dataset = "synthetic", which only simulated partners read (a partner review)
            raise ConfigError(f"model {model.path} was trained over the published catalogue {published} (partners' "
                              "own logs), not the built-in synthetic data; give this partner's own log with --data-path")
        source = LogHistory(generate_synthetic(num_users=int(cfg.get("synthetic-users", 1000)),
                                               num_items=int(cfg.get("synthetic-items", 300)), seed=int(cfg.get("seed", 42))))
    else:
        source = LogHistory(load_interactions(args.data_path))
    if warning := catalogue_mismatch(model, source.item_counts()):
        print(warning, file=sys.stderr)
    metadata = _metadata_for(args.data_path, args.metadata)
    recommender = Recommender(model, titles := load_titles(metadata), use_chain=not args.no_chain)
    if warning := titles_mismatch(model, titles, metadata):
        print(warning, file=sys.stderr)
    if isinstance(source, LogHistory) and (hint := source.unknown_user_hint(args.user)):
        print(hint, file=sys.stderr)  # a fixed log: a missing user is most likely a typo, not a new user
    result = recommender.recommend(args.user, source, args.k, explain=not args.no_explain)
    if args.format == "json":
        print(json.dumps({**result.to_dict(), "model": str(model.path)}, indent=2))
    else:
        print(format_table(result))
    return 0


NO_CHAIN_HELP = ("rank by the model alone, without this partner's item chain, even where the model's run config "
                 "blends it in (chain-weight): the chain ranks from the partner's other users' item pairs without DP")
TOKEN_ENV = "FEDREC_API_TOKEN"
MIN_TOKEN_CHARS = 16


def _api_token(args: argparse.Namespace) -> str | None:
    """The bearer token from ``--api-token-file`` or ``$FEDREC_API_TOKEN`` (a file keeps it off the
    process list); a host other than loopback needs one unless ``--no-auth`` says otherwise."""
    import ipaddress
    import os

    from common.errors import ConfigError

    token = None
    if args.api_token_file:
        try:
            token = open(args.api_token_file, encoding="utf-8").read().strip()
            if os.stat(args.api_token_file).st_mode & 0o077:
                print(f"warning: --api-token-file {args.api_token_file} is readable by other accounts; "
                      f"chmod 600 it", file=sys.stderr)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--api-token-file {args.api_token_file}: cannot be read ({exc})") from None
    elif os.environ.get(TOKEN_ENV):
        token = os.environ[TOKEN_ENV].strip()
    # ASCII: HTTP clients send header bytes that servers read as latin-1, so other characters never match
    if token is not None and (len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable()
                              or " " in token):
        raise ConfigError(f"the API token must be at least {MIN_TOKEN_CHARS} printable ASCII characters without spaces "
                          "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not token and not loopback and not args.no_auth:
        raise ConfigError(f"--host {args.host} lets the network read users' recommendations and write to the event "
                          f"store: give --api-token-file (or {TOKEN_ENV}), or --no-auth behind your own gateway")
    if bool(args.tls_certfile) != bool(args.tls_keyfile):
        raise ConfigError("--tls-certfile and --tls-keyfile go together (PEM certificate and its private key)")
    for flag, path in (("--tls-certfile", args.tls_certfile), ("--tls-keyfile", args.tls_keyfile)):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{flag} {path}: no such file")
    if args.tls_certfile:
        _check_tls_pair(args.tls_certfile, args.tls_keyfile)
    return token


def _check_tls_pair(certfile: str, keyfile: str) -> None:
    """One line, before anything starts, when the PEM files are not a certificate and its key
    (uvicorn raised ssl.SSLError after "serving ..." was printed: a 37-line traceback)."""
    import ssl

    from common.errors import ConfigError

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:
        why = ("the key is not the certificate's" if "KEY_VALUES_MISMATCH" in str(exc)
               else f"not a PEM certificate and private key ({exc.reason or exc})")
        raise ConfigError(f"--tls-certfile {certfile} / --tls-keyfile {keyfile}: {why}") from None
    except OSError as exc:
        raise ConfigError(f"--tls-certfile {certfile} / --tls-keyfile {keyfile}: cannot be read ({exc.strerror})") from None


def _check_port_free(host: str, port: int) -> None:
    """One line, before the store is created, if ``host:port`` cannot be listened on (uvicorn
    reported it after "serving ..." was printed, with exit status 1)."""
    import socket

    from common.errors import ConfigError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        if family == socket.AF_INET6:  # as asyncio binds: "::" does not also claim the IPv4 port
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); is another server using it? "
                              "pick another --port") from None


def _serve(args: argparse.Namespace) -> int:
    from client.recommend import catalogue_mismatch, load_titles, titles_mismatch
    from client.serve import ModelWatcher, create_app, serve
    from common.data.event_store import EventStore
    from common.data.loaders import load_interactions

    import torch

    token = _api_token(args)  # before anything is created
    _check_port_free(args.host, args.port)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # NOTE: one request is a few small matrix products; with more threads than free cores
    # torch's thread pool spins and a 5 ms request takes 100+ ms on a loaded machine.
    torch.set_num_threads(args.torch_threads)
    # A wrong --model fails before the store is created or filled: loaded, not only found (a text file given as
    # --model would leave an empty store behind); the API serves this same load
    loaded = ModelWatcher.load(args.model)
    # Every input is read before the store is made or filled: a bad --metadata after the import left a store
    # that the next start skipped importing into, and a bad --import-log made an empty store (a review)
    metadata = _metadata_for(args.import_log, args.metadata)
    titles = load_titles(metadata) if metadata else None
    new_store = not os.path.exists(args.store) or os.path.getsize(args.store) == 0
    log = load_interactions(args.import_log) if args.import_log and new_store else None
    store = EventStore(args.store, create=True)
    if args.import_log:
        if store.count():
            print(f"{args.store}: already holds {store.count()} events; --import-log skipped", file=sys.stderr)
        else:
            log = log if log is not None else load_interactions(args.import_log)
            ratings = log.rating if log.rating is not None else [None] * len(log)
            n = store.add_many(zip(log.user.tolist(), log.item.tolist(), log.timestamp.tolist(), list(ratings)))
            print(f"imported {n} events from {log.source} into {args.store}")
    source = metadata
    if titles is None:
        titles = load_titles(source := _remembered_metadata(store))
    if metadata:  # a restart without --import-log keeps the titles
        store.set_meta(METADATA_KEY, os.path.abspath(metadata))
    app = create_app(model=args.model, store=store, titles=titles, reload_interval=args.reload_interval,
                     api_token=token, loaded=loaded, use_chain=not args.no_chain)
    if warning := catalogue_mismatch(app.state.watcher.current, store.item_counts()):
        print(warning, file=sys.stderr)
    if warning := titles_mismatch(app.state.watcher.current, titles, source):
        print(warning, file=sys.stderr)
    if not token and not args.no_auth:  # loopback (anything else needs a token or --no-auth): still every account
        print(f"warning: no API token: every account on this machine can read users' recommendations and post "
              f"events through {args.host}:{args.port}; on a shared machine give --api-token-file", file=sys.stderr)
    scheme = "https" if args.tls_certfile else "http"
    print(f"serving {app.state.watcher.current.path} on {scheme}://{args.host}:{args.port} "
          f"(events: {args.store}, {store.count()} so far; {'bearer token required' if token else 'no authentication'})",
          flush=True)
    serve(app, host=args.host, port=args.port, tls_certfile=args.tls_certfile, tls_keyfile=args.tls_keyfile)
    store.close()
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from client.finetune import finetune_partner
    from common.errors import ConfigError

    dp_only = {"--noise-multiplier": args.noise_multiplier, "--target-epsilon": args.target_epsilon,
               "--target-delta": args.target_delta, "--max-grad-norm": args.max_grad_norm}
    if args.no_dp and (given := [flag for flag, value in dp_only.items() if value is not None]):
        raise ConfigError(f"--no-dp trains without DP-SGD, so {' and '.join(given)} would have no effect; "
                          "drop --no-dp or drop them")
    report = finetune_partner(
        model=args.model, data_path=args.data_path, ledger_path=args.ledger_path, out=args.out, since=args.since,
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        noise_multiplier=args.noise_multiplier or 1.0, target_epsilon=args.target_epsilon,
        target_delta=args.target_delta or 0.0, max_grad_norm=args.max_grad_norm or 1.0,
        dp=not args.no_dp, seed=args.seed, force=args.force, data_identity=args.data_identity)
    print(json.dumps(report, indent=2))
    return 0


def add_serving_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``recommend``, ``serve`` and ``finetune`` to ``fedrec-client``'s subcommands."""
    rec = sub.add_parser("recommend", help="top-K recommendations with reasons for one of this partner's users")
    rec.add_argument("--model", required=True, help="model.pt, a run directory, or a folder of runs (newest model)")
    rec.add_argument("--data-path", required=True,
                     help="this partner's log (CSV/Parquet/MovieLens) or event store (.sqlite)")
    rec.add_argument("--user", required=True, help="the user id as it appears in the log")
    rec.add_argument("--k", type=positive_int, default=10, help="how many items (default 10)")
    rec.add_argument("--no-explain", action="store_true", help="skip the leave-one-out reasons")
    rec.add_argument("--no-chain", action="store_true", help=NO_CHAIN_HELP)
    rec.add_argument("--format", choices=("table", "json"), default="table")
    rec.add_argument("--metadata", default=None, help="item titles (u.item/movies.dat); default: beside the log")
    rec.set_defaults(func=_recommend)

    srv = sub.add_parser("serve", help="HTTP API: recommendations, feedback events, health (127.0.0.1)")
    srv.add_argument("--model", required=True,
                     help="model.pt, a run directory, or a folder of runs (reloads when newer)")
    srv.add_argument("--store", required=True, help="SQLite event store (created if missing); use it as data-path")
    srv.add_argument("--import-log", default=None, help="fill an empty store from this log first")
    srv.add_argument("--metadata", default=None, help="item titles (u.item/movies.dat); default: beside --import-log, "
                     "else the ones the store was served with before")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default loopback; any other needs an API token or --no-auth)")
    srv.add_argument("--api-token-file", default=None,
                     help=f"file holding the bearer token every request must send (or set ${TOKEN_ENV})")
    srv.add_argument("--no-auth", action="store_true",
                     help="serve a non-loopback --host without a token (only behind a gateway that authenticates)")
    srv.add_argument("--tls-certfile", default=None, help="PEM certificate: serve HTTPS (with --tls-keyfile)")
    srv.add_argument("--tls-keyfile", default=None, help="PEM private key of --tls-certfile")
    srv.add_argument("--port", type=port, default=8000)
    srv.add_argument("--no-chain", action="store_true", help=NO_CHAIN_HELP)
    srv.add_argument("--reload-interval", type=positive_float, default=2.0, help="seconds between checks for a newer model")
    srv.add_argument("--torch-threads", type=positive_int, default=1,
                     help="torch threads per process (default 1: lowest latency)")
    srv.set_defaults(func=_serve)

    ft = sub.add_parser("finetune", help="DP fine-tune the global model on this partner's newest events (kept local)")
    ft.add_argument("--model", required=True, help="the global model.pt or run directory")
    ft.add_argument("--data-path", required=True, help="this partner's log or event store")
    ft.add_argument("--ledger-path", required=True, help="this partner's privacy ledger (the one its supernode uses)")
    ft.add_argument("--data-identity", default="", help="the name its supernode gives the log (node config "
                    "data-identity), so the ledger knows the grown log")
    ft.add_argument("--out", default=None,
                    help="where to write the fine-tuned model (default: partner-finetuned.pt beside the ledger)")
    ft.add_argument("--force", action="store_true", help="overwrite an existing --out file (never an input)")
    ft.add_argument("--since", type=int, default=None, help="unix seconds: train users with events at or after this "
                    "(default: the global model file's time)")
    ft.add_argument("--epochs", type=positive_int, default=1)
    ft.add_argument("--batch-size", type=positive_int, default=16, help="expected users per DP-SGD step")
    ft.add_argument("--learning-rate", type=positive_float, default=0.001)
    ft.add_argument("--noise-multiplier", type=positive_float, default=None,
                    help="DP-SGD noise std / clipping norm (default 1.0)")
    ft.add_argument("--target-epsilon", type=positive_float, default=None,
                    help="the partner's whole-ledger budget (refused beyond it, and refused above the max-epsilon "
                         "its SuperNode recorded in the ledger); default: the strictest of the runs' targets and that "
                         "max-epsilon (8 for a new ledger)")
    ft.add_argument("--target-delta", type=delta, default=None, help="default (or 0): min(1e-5, 0.1 / users)")
    ft.add_argument("--max-grad-norm", type=positive_float, default=None, help="per-user clipping norm (default 1.0)")
    ft.add_argument("--no-dp", action="store_true", help="no DP (the fine-tuned model then has no guarantee)")
    ft.add_argument("--seed", type=seed_arg, default=0)
    ft.set_defaults(func=_finetune)
