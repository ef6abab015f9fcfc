"""Fault injection: partners that send poisoned updates or hang, for testing the server's defences.

    python -m simulations.fault_injection --num-partners 4 --faults "0:nan@1 0:shape@2 0:scale@3 3:sleep@2" \\
        --sleep-seconds 60 --run-config "num-server-rounds=3 round-timeout=20 dp=false"

A fault is ``PARTITION:KIND@ROUND``. Kinds (each applied to the partner's honest reply):

``nan``       one weight set to NaN
``shape``     one array loses its last row (wrong shape)
``scale``     the update multiplied by 1000: ``global + 1000 * (honest - global)``
``examples``  claims 10^9 training examples (to dominate FedAvg's weighting)
``sleep``     sleeps ``--sleep-seconds`` before replying (a hung partner)
``crash``     the real ClientApp hits an unexpected error whose text quotes "user data"
"""

from __future__ import annotations

import argparse
import sys
import time

from simulations.flower_env import set_simulation_env

set_simulation_env()

import numpy as np  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from common.cli_args import parse_run_config, positive_float, positive_int  # noqa: E402

from common.errors import ConfigError  # noqa: E402
from common.config import resolve_config  # noqa: E402
from simulations.cli import user_errors_exit  # noqa: E402

KINDS = ("nan", "shape", "scale", "examples", "sleep", "crash")
SCALE = 1000.0
CLAIMED_EXAMPLES = 10**9
CRASH_TEXT = "user u-4711 watched item i-99 at 1600000000"  # must never reach the server
Plan = dict[int, dict[int, str]]  # partition id -> round -> fault kind


def parse_faults(text: str, *, num_partners: int | None = None, num_rounds: int | None = None) -> Plan:
    """``"0:nan@1 0:shape@2"`` (spaces or commas) -> ``{0: {1: "nan", 2: "shape"}}``. With ``num_partners`` /
    ``num_rounds``, a fault for a partition or round the run does not have, or a second fault for one partner
    and round, is refused: it was dropped in silence and the run read as "the defence held" (a review)."""
    plan: Plan = {}
    for item in text.replace(",", " ").split():
        try:
            partner, rest = item.split(":")
            kind, rnd = rest.split("@")
            pid, server_round = int(partner), int(rnd)
        except ValueError:
            raise ConfigError(f"fault {item!r} is not PARTITION:KIND@ROUND, e.g. 0:nan@1") from None
        if kind not in KINDS:
            raise ConfigError(f"fault kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")
        if num_partners is not None and not 0 <= pid < num_partners:
            raise ConfigError(f"fault {item!r}: partition {pid} is outside 0..{num_partners - 1} (--num-partners)")
        if num_rounds is not None and not 1 <= server_round <= num_rounds:
            raise ConfigError(f"fault {item!r}: round {server_round} is outside 1..{num_rounds} (num-server-rounds)")
        if server_round in plan.get(pid, {}):
            raise ConfigError(f"fault {item!r}: partition {pid} already has a fault in round {server_round}")
        plan.setdefault(pid, {})[server_round] = kind
    return plan


def corrupt(content: RecordDict, global_arrays: ArrayRecord, kind: str) -> RecordDict:
    """A copy of an honest reply's content with fault ``kind`` applied (see the module docstring)."""
    arrays = {k: v.numpy().copy() for k, v in content["arrays"].items()}
    metrics = dict(content["metrics"])
    first = next(k for k, v in arrays.items() if v.dtype.kind == "f" and v.ndim >= 1 and v.size > 1)
    if kind == "nan":
        arrays[first].flat[0] = np.nan
    elif kind == "shape":
        arrays[first] = arrays[first][:-1]
    elif kind == "scale":
        for k, v in arrays.items():
            g = global_arrays[k].numpy()
            arrays[k] = (g + SCALE * (v - g)).astype(v.dtype)
    elif kind == "examples":
        metrics["num-examples"] = CLAIMED_EXAMPLES
    else:
        raise ValueError(f"{kind!r} does not corrupt a reply")
    out = RecordDict({key: record for key, record in content.items() if key not in ("arrays", "metrics")})
    out["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    out["metrics"] = MetricRecord(metrics)
    return out


def _crashing(msg: Message) -> Message:
    """``msg`` with a server-round the ClientApp cannot parse: its ``int()`` raises a ValueError
    that quotes the value, standing in for any library error that quotes a user's data."""
    # NOTE: a ClientApp cannot build a new instruction Message (no task identity), so this one
    # gets new content; the old RecordDict may be shared with other partners' messages (in process).
    content = RecordDict({k: v for k, v in msg.content.items() if k != "config"})
    content["config"] = ConfigRecord({**dict(msg.content["config"]), "server-round": CRASH_TEXT})
    msg.content = content
    return msg


def make_faulty_client_app(overrides: dict | None, plan: Plan, *, sleep_seconds: float = 60.0) -> ClientApp:
    """The honest ClientApp, except that partners in ``plan`` misbehave in the planned rounds."""
    from client.app import make_client_app

    honest = make_client_app(overrides)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = msg.content.config_records.get("config")
        if config is None:  # a SecAgg+ protocol stage (key set-up, unmasking): no round, no fault
            return honest(msg, context)
        pid = int(context.node_config.get("partition-id", -1))
        kind = plan.get(pid, {}).get(int(config.get("server-round", 0)))
        if kind == "crash":  # the real ClientApp fails on a value that looks like a user's data
            return honest(_crashing(msg), context)
        if kind == "sleep":
            time.sleep(sleep_seconds)
        reply = honest(msg, context)
        if kind in (None, "sleep") or reply.has_error() or "arrays" not in msg.content.array_records:
            return reply  # (under SecAgg+ a reply is a masked vector: nothing to corrupt in plain weights)
        return Message(corrupt(reply.content, msg.content["arrays"], kind), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    return app


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-partners", type=positive_int, default=4)
    parser.add_argument("--faults", default="", help='e.g. "0:nan@1 0:shape@2 3:sleep@2"')
    parser.add_argument("--sleep-seconds", type=positive_float, default=60.0, help="how long a sleep fault hangs (s)")
    parser.add_argument("--local", action="store_true", help="in-process LocalGrid instead of Ray (no timeouts)")
    parser.add_argument("--run-config", action="append", default=[])
    args = parser.parse_args(argv)
    overrides = parse_run_config(args.run_config)
    rounds = int(resolve_config(None, overrides)["num-server-rounds"])
    plan = parse_faults(args.faults, num_partners=args.num_partners, num_rounds=rounds)
    app = make_faulty_client_app(overrides, plan, sleep_seconds=args.sleep_seconds)
    if args.local:
        from simulations.local_grid import run_local

        run_dir = run_local(overrides, args.num_partners, client_apps=[app] * args.num_partners)
    else:
        from simulations.run import run_federation

        run_dir = run_federation(overrides, args.num_partners, client_app=app)
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
