"""A whole federation in one process, without Ray or a SuperLink: for debugging and fast tests.

    python -m simulations.local_grid --num-partners 3 --run-config "num-server-rounds=2 dp=false"

``LocalGrid`` is a ``flwr.serverapp.Grid`` whose nodes are ClientApps called in this
process, one after the other; the real ServerApp (``server.app``) runs on it unchanged.
Each node keeps its own ``Context`` (node config ``partition-id``/``num-partitions``, its
``state`` across rounds), as Flower's simulation engine gives it. What it does not
reproduce: parallelism, timeouts (a hung ClientApp hangs the process) and Ray's per-actor
resource limits; use ``simulations.run`` for those.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import uuid4

from simulations.flower_env import set_simulation_env

set_simulation_env()

from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from common.cli_args import parse_run_config, positive_int, with_app_config  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from common.config import resolve_config  # noqa: E402
from common.run_files import metrics_lines  # noqa: E402
from simulations.cli import user_errors_exit  # noqa: E402

if TYPE_CHECKING:
    from flwr.supercore.run import Run

FIRST_NODE_ID = 1001  # node ids are arbitrary; fixed ones make logs comparable between runs


class LocalGrid(Grid):
    """Deliver each message to an in-process ClientApp and collect the replies.

    Parameters
    ----------
    client_apps : list[ClientApp]
        One ClientApp per node (the same object may repeat); node ``i`` gets
        ``partition-id = i`` of ``len(client_apps)``.
    """

    def __init__(self, client_apps: list[ClientApp]) -> None:
        n = len(client_apps)
        # Messages take their sender from the process' task identity (set by Flower's runtimes).
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        self._apps = {FIRST_NODE_ID + i: app for i, app in enumerate(client_apps)}
        self._contexts = {
            node: Context(run_id=1, node_id=node, node_config={"partition-id": i, "num-partitions": n},
                          state=RecordDict(), run_config={})
            for i, node in enumerate(self._apps)
        }
        self._run = None
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run | None:  # None until the ServerApp sets it
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._apps)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do on push
            node = msg.metadata.dst_node_id
            self._replies[msg.metadata.message_id] = self._apps[node](msg, self._contexts[node])
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_local(overrides: dict, num_partners: int, *, client_apps: list[ClientApp] | None = None,
              server_app: ServerApp | None = None) -> Path:
    """Run the ServerApp on a :class:`LocalGrid` of ``num_partners`` ClientApps; returns the run directory."""
    from client.app import make_client_app
    from server.app import make_server_app
    from server.run_report import created_run_dir, run_dirs_named

    cfg = resolve_config(None, overrides)
    if cfg["resume"]:
        from server.resume import resumable_run_dir
        from simulations.population import refuse_another_partner_count

        refuse_another_partner_count(resumable_run_dir(cfg), num_partners)
    cfg["run-name"] = cfg["run-name"] or time.strftime("%Y%m%d-%H%M%S-local")
    overrides = {**overrides, "run-name": cfg["run-name"]}
    apps = client_apps or [make_client_app(overrides)] * num_partners
    grid = LocalGrid(apps)
    base = Path(cfg["run-dir"])
    before = run_dirs_named(base, cfg["run-name"])
    (server_app or make_server_app(overrides))(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                            run_config={}))
    created = created_run_dir(base, cfg["run-name"], before)
    # A taken run-name gets a suffix (server/run_report.py: new_run_dir); a resumed run keeps its own
    run_dir = created if created is not None and not cfg["resume"] else base / cfg["run-name"]
    if run_dir.is_dir():  # holdout.json (the audit's non-members) and partitions.json, as simulations.run writes them
        from simulations.population import write_population

        write_population(run_dir, cfg, num_partners)
    return run_dir


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-partners", type=positive_int, default=3, help="in-process partners (default 3)")
    parser.add_argument("--run-config", action="append", default=[],
                        help='overrides, e.g. "dp=false num-server-rounds=3"')
    args = parser.parse_args(argv)
    overrides = with_app_config(parse_run_config(args.run_config))  # pyproject.toml's table, then the overrides
    # simulations.run's checks before any work (a simulation-features journey: min-nodes above the partner
    # count waited out node-wait-timeout, and a cross-device split of 3 partners ended with exit 0)
    from simulations.preflight import preflight
    from simulations.run_claims import refuse_untrained

    preflight(resolve_config(None, overrides), args.num_partners)
    run_dir = run_local(overrides, args.num_partners)
    print(f"run directory: {run_dir}")
    return refuse_untrained(run_dir, metrics_lines(run_dir / "metrics.jsonl"))  # [] when no round was logged


if __name__ == "__main__":
    sys.exit(main())
