"""``fedrec-server``: what the coordinator runs besides Flower's own commands.

    fedrec-server certs --out certs --host localhost --host 127.0.0.1 --host superlink.example.org
    fedrec-server catalogue --out catalogue.txt --run-config 'dataset="ml-100k"'
    fedrec-server item-text --out item_text.npz --run-config 'dataset="ml-100k"'
    fedrec-server add-items --model runs/RUN --catalogue catalogue_v2.txt --item-text-features item_text_v2.npz --out model_v2.pt
    fedrec-server check --run-config 'dataset="/data/ml-100k" num-server-rounds=20'
    fedrec-server report runs/RUN          # exit 0: complete; 3: incomplete or rounds without an update

Every user mistake is one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli_errors import user_errors_exit


def _certs(args: argparse.Namespace) -> int:
    from server.credentials import create_server_credentials

    paths = create_server_credentials(args.out, hosts=args.host, days=args.days, force=args.force)
    print(f"CA certificate (give to every partner: flower-supernode --root-certificates): {paths.ca_cert}")
    print(f"CA private key (keep offline): {paths.ca_key}")
    print(f"SuperLink certificate (--ssl-certfile, valid for {', '.join(args.host)}): {paths.server_cert}")
    print(f"SuperLink private key (--ssl-keyfile): {paths.server_key}")
    return 0


def _catalogue(args: argparse.Namespace) -> int:
    from common.cli_args import parse_run_config

    from common.config import resolve_config
    from common.data.catalogue import catalogue_fingerprint, save_catalogue
    from common.data.loaders import log_files
    from common.files import refuse_overwriting_inputs
    from common.task import catalogue

    overrides = parse_run_config(args.run_config)
    cfg = resolve_config(None, {**overrides, "catalogue": ""})  # derive from the data set, never from a file
    refuse_overwriting_inputs(args.out, log_files(str(cfg["dataset"])))
    items = catalogue(cfg)
    path = save_catalogue(items, args.out, force=args.force)
    print(f"catalogue: {len(items)} items from dataset {cfg['dataset']!r} -> {path} (fingerprint {catalogue_fingerprint(items)})")
    # absolute: flwr run ships only code and config files, so each machine resolves the path itself
    print(f'publish it to partners and run with --run-config \'catalogue="{path.resolve()}"\' '
          "(the same path on every machine)")
    return 0


def _item_text(args: argparse.Namespace) -> int:
    from common.cli_args import parse_run_config

    from common.config import resolve_config
    from common.errors import ConfigError
    from common.item_text import catalogue_text_features, encoder_id, save_features
    from common.task import catalogue

    from common.data.loaders import log_files
    from common.files import refuse_existing, refuse_overwriting_inputs

    # Checked before the (slow) encoding: partners may be running with the published file
    refuse_existing([Path(args.out)], force=args.force,
                    hint="partners must run with the features the model was trained on")
    overrides = parse_run_config(args.run_config)
    cfg = resolve_config(None, {**overrides, "item-text-features": ""})  # encode, never re-read a published file
    refuse_overwriting_inputs(args.out, [*log_files(str(cfg["dataset"])),
                                         *([Path(str(cfg["catalogue"]))] if cfg["catalogue"] else [])])
    from common.data.attributes import metadata_path

    if metadata_path(str(cfg["dataset"])) is None:  # the generic message would send the user back to this command
        raise ConfigError(f"item-text: dataset {cfg['dataset']!r} has no item titles beside it (u.item, movies.dat or "
                          "movies.csv); give --run-config 'dataset=\"<folder with the log and its titles>\"'")
    items = catalogue(cfg)
    embeddings, texts = catalogue_text_features(cfg)
    setting = encoder_id(cfg["item-text-model"], bool(cfg["item-text-quantize"]))
    # absolute: under flwr run a relative path resolves in each process's own folder (docs/deployment.md)
    path = save_features(args.out, items, embeddings, model=setting, texts=texts).resolve()
    print(f"item text features: {embeddings.shape[0]} items x {embeddings.shape[1]} dims ({setting}) -> {path}")
    print(f'publish it with the catalogue and run with --run-config \'item-features="text" item-text-features="{path}"\'')
    return 0


def _add_items(args: argparse.Namespace) -> int:
    from server.add_items import add_items

    done = add_items(args.model, args.catalogue, args.item_text_features, args.out, force=args.force)
    print(f"added {done['added']} items (first {done['first-added']!r}) to the {done['item-features']} model: "
          f"{done['items']} items (fingerprint {done['fingerprint']}) -> {done['model']}")
    print("serve it as any model.pt (`fedrec-client serve --model` reloads a replaced file); partners need "
          f"{done['catalogue']} and {done['item-text-features']} at those paths")
    return 0


def _check(args: argparse.Namespace) -> int:
    import os

    from common.cli_args import parse_run_config, with_app_config
    from common.config import ignored_knobs, resolve_config
    from common.data.catalogue import catalogue_fingerprint
    from common.errors import CheckpointError, ConfigError
    from common.files import file_in_the_way
    from common.privacy import dp_mode
    from common.run_files import CHECKPOINT_NAME
    from server.app import initial_model
    from server.resume import resumable_checkpoint, run_fingerprint

    # flwr run starts from the app's pyproject.toml: an edit there was checked against the defaults (a review)
    cfg = resolve_config(None, with_app_config(parse_run_config(args.run_config), args.app, always_say=True))
    if ignored := ignored_knobs(cfg):
        verb = "changes" if len(ignored) == 1 else "change"
        print(f"note: {', '.join(ignored)} {verb} nothing with model = {cfg['model']}, item-features = "
              f"{cfg['item-features']}, aggregation = {cfg['aggregation']}, partitioning = {cfg['partitioning']}")
    items, model, _ = initial_model(cfg)
    if cfg["item-init"] == "text" and not cfg["resume"]:  # the texts, read as the ServerApp will (one line if none)
        from common.text_init import describe_text_start, initialise_from_text, untied_output_note

        print(describe_text_start(initialise_from_text(model, cfg, items)))
        if note := untied_output_note(cfg):
            print(f"note: {note}")
    size = sum(p.numel() for p in model.state_dict().values())
    print(f"catalogue: {len(items)} items (fingerprint {catalogue_fingerprint(items)})")
    print(f"model: {cfg['model']}, {size:,} weights; aggregation {cfg['aggregation']}, {cfg['num-server-rounds']} rounds, "
          f"dp-mode {dp_mode(cfg)}, secure aggregation {'on' if cfg['secure-aggregation'] else 'off'}")
    if cfg["secure-aggregation"] and int(cfg["min-nodes"]) < 2:  # SecAgg+ hides an update among others (a review)
        print(f"note: secure-aggregation needs at least 2 partners in a round; with min-nodes = {cfg['min-nodes']} a "
              "round that samples one partner fails (its update is not aggregated): set min-nodes = 2 or more")
    if cfg["item-prior"] == "popularity":  # a target the histogram alone uses up: every partner would refuse
        from common.item_prior import refuse_unaffordable_prior
        from common.privacy import default_delta

        delta = float(cfg["target-delta"]) or default_delta(1)  # the largest delta a partner accounts at
        refuse_unaffordable_prior(cfg, delta)
        print(f"item-prior: each partner releases one item histogram, Gaussian noise of std "
              f"{float(cfg['item-prior-noise-multiplier']):g} users, inside its target-epsilon {float(cfg['target-epsilon']):g}")
    noise = float(cfg["evaluation-noise-multiplier"])
    if noise > 0:
        from common.private_evaluation import planned_evaluations

        print(f"evaluation: top-{cfg['top-k']} hit and NDCG sums noised (evaluation-noise-multiplier {noise:g}), "
              f"{planned_evaluations(cfg)} evaluations planned into each partner's budget")
    elif float(cfg["fraction-evaluate"]) > 0:
        print("evaluation: partners send their hit and NDCG sums and their exact number of evaluated users in "
              "clear, outside the DP guarantee (evaluation-noise-multiplier = 0)")
    relative = not Path(str(cfg["run-dir"])).expanduser().is_absolute()
    where = (f"run-dir = {str(cfg['run-dir'])!r} is relative: under flwr run the ServerApp resolves it in the "
             "SuperLink's working folder, not here; run check from that folder or give an absolute run-dir")
    if cfg["resume"]:
        try:
            run_dir, ckpt = resumable_checkpoint(cfg, run_fingerprint(cfg, items, model))
        except CheckpointError as exc:
            raise CheckpointError(f"{exc} ({where})" if relative and "no such run directory" in str(exc) else str(exc)) from None
        if not os.access(run_dir, os.W_OK | os.X_OK):  # said "ok", then the run died on its first write (a review)
            raise ConfigError(f"{run_dir}: this user cannot write in the run directory, where the resumed run "
                              "writes its checkpoint, metrics and model")
        print(f"resumes {run_dir} after round {ckpt.round} of {cfg['num-server-rounds']}")
    else:
        if relative:
            print(f"note: {where}")
        base = Path(str(cfg["run-dir"])).absolute()
        existing = next(p for p in (base, *base.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"run-dir = {str(cfg['run-dir'])!r}: cannot create a run directory under {existing}")
        named = base / str(cfg["run-name"]) if cfg["run-name"] else None
        if named is not None and (named / CHECKPOINT_NAME).is_file():  # forgot resume=true: budget spent again
            print(f"note: {named} holds a run with a checkpoint; without resume=true this run starts afresh in a "
                  "new directory beside it (partners train and spend budget again): add resume=true to continue it")
        print(f"a new run directory under {base}")
    if cfg.get("ledger-dir"):  # simulated partners keep their ledgers there (deployed ones where they run)
        if file := file_in_the_way(str(cfg["ledger-dir"])):
            raise ConfigError(f"ledger-dir = {str(cfg['ledger-dir'])!r}: {file} is a file, not a folder")
    print("ok: the ServerApp will start with this run config")
    return 0


def _report(args: argparse.Namespace) -> int:
    import json

    from server.run_status import INCOMPLETE, format_status, run_status

    status = run_status(args.run_dir)
    print(json.dumps(status, indent=2, allow_nan=False) if args.json else format_status(status))
    return 0 if status["status"] == "complete" else INCOMPLETE


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands register their handler as ``func``)."""
    parser = argparse.ArgumentParser(prog="fedrec-server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    certs = sub.add_parser("certs", help="create a CA and a SuperLink TLS certificate")
    certs.add_argument("--out", required=True, help="folder for ca.crt, ca.key, server.crt, server.key")
    certs.add_argument("--host", action="append", required=True,
                       help="DNS name or IP partners use to reach the SuperLink (repeat for several)")
    certs.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    certs.add_argument("--force", action="store_true", help="overwrite existing files")
    certs.set_defaults(func=_certs)

    cat = sub.add_parser("catalogue", help="export the federation's item catalogue (one item id per line)")
    cat.add_argument("--out", required=True, help="file to write, e.g. catalogue.txt")
    cat.add_argument("--run-config", action="append", default=[],
                     help='data set knobs, e.g. \'dataset="ml-100k"\' or "synthetic-items=300"')
    cat.add_argument("--force", action="store_true", help="overwrite an existing file")
    cat.set_defaults(func=_catalogue)

    text = sub.add_parser("item-text", help="encode the catalogue's titles/genres once with a frozen sentence encoder")
    text.add_argument("--out", required=True, help="features file to publish, e.g. item_text.npz")
    text.add_argument("--force", action="store_true", help="overwrite an existing file")
    text.add_argument("--run-config", action="append", default=[],
                      help='data set / catalogue / encoder knobs, e.g. \'dataset="ml-100k"\' \'catalogue="catalogue.txt"\'')
    text.set_defaults(func=_item_text)

    grow = sub.add_parser("add-items", help="add items to a trained text model's catalogue for serving (no training)")
    grow.add_argument("--model", required=True, help="the trained model.pt or its run directory")
    grow.add_argument("--catalogue", required=True,
                      help="the model's catalogue with the new item ids appended at the end (one id per line)")
    grow.add_argument("--item-text-features", required=True,
                      help="features of every item of that catalogue (`fedrec-server item-text` with catalogue=...)")
    grow.add_argument("--out", required=True, help="model file to write, e.g. runs/RUN/model.pt with --force")
    grow.add_argument("--force", action="store_true", help="overwrite an existing file (e.g. the served model.pt)")
    grow.set_defaults(func=_add_items)

    check = sub.add_parser("check", help="check a run config as the ServerApp will, before flwr run (one line per mistake)")
    check.add_argument("--run-config", action="append", default=[],
                       help="the same --run-config flwr run gets (relative paths resolve from this folder; "
                            "give absolute ones, as the SuperLink's folder differs)")
    check.add_argument("--app", default=".", help="the Flower app's folder, as given to flwr run (default .): "
                       "its pyproject.toml [tool.flwr.app.config] is what --run-config overrides")
    check.set_defaults(func=_check)

    report = sub.add_parser("report", help="where a run stands, from its run directory (exit 0 complete, 3 not)")
    report.add_argument("run_dir", help="the run directory, e.g. runs/RUN (under the SuperLink's run-dir)")
    report.add_argument("--json", action="store_true", help="print the report as one JSON object")
    report.set_defaults(func=_report)
    return parser


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
