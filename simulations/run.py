"""Run one federated simulation on Flower's simulation engine and print per-round metrics.

    python -m simulations.run --num-partners 5 --run-config 'num-server-rounds=3 dp-mode="off"'

Knobs are those of ``[tool.flwr.app.config]``; ``--run-config`` overrides them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from simulations.flower_env import set_simulation_env

set_simulation_env()


from common.config import resolve_config  # noqa: E402
from common.cli_args import parse_run_config, positive_int, with_app_config  # noqa: E402
from common.errors import FedRecError  # noqa: E402
from common.privacy import dp_mode, refuse_many_examples_per_user, uses_local_dp  # noqa: E402
from common.run_files import read_json_object  # noqa: E402
from simulations.cli import user_errors_exit  # noqa: E402
from simulations.run_claims import metrics_lines, refuse_untrained  # noqa: E402
from simulations.run_stop import exit_interrupted, signals_deferred, sigterm_stops_ray_too, stop_ray  # noqa: E402

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp


def run_federation(overrides: dict, num_partners: int, *, cpus_per_client: float = 1.0, gpus_per_client: float = 0.0,
                   client_app: ClientApp | None = None) -> Path:  # simulations.fault_injection passes one
    """Run a simulation with ``num_partners`` virtual partners; returns the run directory."""
    import logging

    given, overrides = overrides, with_app_config(overrides)  # pyproject.toml's table, then the overrides
    cfg = resolve_config(None, overrides)  # fail fast on bad keys and data, before torch, Ray and the apps load
    refuse_many_examples_per_user(cfg)
    from common.task import federation_data

    federation_data(cfg)
    if cfg["resume"]:
        from server.resume import resumable_run_dir
        from simulations.population import refuse_another_partner_count

        refuse_another_partner_count(resumable_run_dir(cfg), num_partners)
    from simulations.preflight import preflight, resumable

    preflight(cfg, num_partners)  # the ServerApp's checks too
    if cfg["resume"]:
        resumable(cfg)  # its checkpoint fits this config, model and catalogue (the ServerApp checks it again)

    from flwr.simulation import run_simulation

    # NOTE: Ray configures the root logger; without this every Flower line prints twice.
    logging.getLogger("flwr").propagate = False

    from client.app import make_client_app
    from server.app import make_server_app
    from server.run_report import created_run_dir, run_dirs_named
    from simulations.population import describe_partners, write_population
    from simulations.resources import backend_config

    cfg["run-name"] = cfg["run-name"] or _auto_name(cfg, num_partners)
    overrides = {**overrides, "run-name": cfg["run-name"]}
    base = Path(cfg["run-dir"])
    before = run_dirs_named(base, cfg["run-name"])
    backend = backend_config(cpus_per_client=cpus_per_client, gpus_per_client=gpus_per_client)  # simulations/resources.py
    print(describe_partners(cfg, num_partners), flush=True)
    try:
        with sigterm_stops_ray_too():  # ``kill`` stops the run as Ctrl-C does
            run_simulation(
                server_app=make_server_app(overrides),
                client_app=client_app or make_client_app(overrides),
                num_supernodes=num_partners,
                backend_config=backend,
            )
    except KeyboardInterrupt as exc:
        # Flower has stopped Ray; its ServerApp thread waits out the round's replies (round-timeout)
        # and the interpreter would wait for it: end here, once the run's state is written
        run_dir = base / cfg["run-name"] if cfg["resume"] else created_run_dir(base, cfg["run-name"], before)
        with signals_deferred():  # a second Ctrl-C: the files a resume and the audit need come first
            stop_ray()
            if run_dir is not None:
                write_population(run_dir, cfg, num_partners)
            exit_interrupted(exc, _interrupted_message(run_dir, named="run-name" in given))
    # a resumed run continues in its own directory (server/resume.py)
    created = base / cfg["run-name"] if cfg["resume"] else created_run_dir(base, cfg["run-name"], before)
    if created is None:
        raise FedRecError("the simulation ended without writing a run directory; see the log above")
    write_population(created, cfg, num_partners)  # holdout.json (audit non-members), partitions.json
    return created  # the ServerApp drew rounds.png and partners.png (server/run_plots.py)


def _interrupted_message(run_dir: Path | None, *, named: bool) -> str:
    """The stop line; ``named``: the command line gave run-name (repeating it is refused)."""
    from server.checkpoint import CHECKPOINT_NAME

    if run_dir is None:
        return "stopped before the run wrote its directory"
    from server.run_status import run_status

    if not (run_dir / CHECKPOINT_NAME).is_file():
        return f"stopped: {run_dir} is incomplete, before its first round ended (nothing to resume)"
    try:
        status = run_status(run_dir)
    except FedRecError:  # no readable config.json: incomplete, and nothing known of its DP
        status = {"status": "incomplete"}
    if status["status"] != "incomplete":  # stopped while Ray shut down: every round and file is there (a journey review)
        return (f"stopped after the run ended: {run_dir} is {status['status']}, {status['rounds-logged']} of "
                f"{status['rounds-planned']} rounds logged (nothing to resume)")
    add = "resume=true" if named else f'resume=true run-name="{run_dir.name}"'
    dp_note = ""
    if "rounds-planned" in status and uses_local_dp(dp_mode(read_json_object(run_dir / "config.json"))):
        # the round in progress was spent on the ledgers, and a resume trains it again (docs/privacy.md)
        dp_note = ("; under local DP the round in progress is already on the partners' ledgers, so the resumed run "
                   "may end a round short of its plan")
    # started by `make run` (the Makefile sets it), which takes no --run-config (a researcher review); not
    # MAKELEVEL: any make sets that, `make test` too, whose simulations take --run-config
    if os.environ.get("FEDREC_MAKE_RUN"):
        given = os.environ.get("RUN_CONFIG", "").strip()
        how = f"make run RUN_CONFIG='{given + ' ' if given else ''}{add}'"
    else:
        how = f"the same command and --run-config '{add}' added"
    return (f"stopped: {run_dir} is incomplete (fedrec-server report says where it stands); continue it with "
            f"{how}{dp_note}")


def _auto_name(cfg: dict, num_partners: int) -> str:
    import time

    mode = dp_mode(cfg)
    dp = {"off": "nodp", "central": "central"}.get(mode, f"eps{cfg['target-epsilon']:g}") + ("-central" if mode == "both" else "")
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg['model']}-{num_partners}p-{dp}"


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-partners", type=positive_int, default=5, help="simulated partner organisations (default 5)")
    parser.add_argument("--run-config", action="append", default=[], help="""overrides, e.g. 'dp-mode="central" num-server-rounds=3' (text values in double quotes)""")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per simulated client (e.g. 0.2)")
    parser.add_argument("--cpus-per-client", type=float, default=1.0, help="CPUs (and torch threads) per simulated client (default 1)")
    args = parser.parse_args(argv)
    overrides = parse_run_config(args.run_config)
    run_dir = run_federation(overrides, args.num_partners, gpus_per_client=args.num_gpus,
                             cpus_per_client=args.cpus_per_client)
    lines = metrics_lines(run_dir / "metrics.jsonl")  # a line cut short by a crash is skipped with a warning
    if not lines:
        print(f"error: no round completed; see {run_dir}", file=sys.stderr)
        return 1
    print(f"\nrun directory: {run_dir}")
    print((run_dir / "summary.md").read_text())
    return refuse_untrained(run_dir, lines)


if __name__ == "__main__":
    sys.exit(main())
