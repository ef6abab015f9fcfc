"""Each simulated partner's planned privacy spend: noise calibrated for the run, epsilon after chosen rounds.

    python -m simulations.epsilon_plan --num-partners 5 --rounds 5,20 --run-config 'num-server-rounds=20 accountant="prv"'

No training: the same calibration the ClientApp makes (client/privacy_budget.py) on each
partner's users, then epsilon after each listed round of ``local-epochs`` Poisson-sampled
epochs, with both accountants (RDP and PRV) for the same noise. With
``evaluation-noise-multiplier`` > 0 the planned noised evaluations are spent too, as a partner's
ledger spends them (common/private_evaluation.py).
"""

from __future__ import annotations

import argparse
import sys

from simulations.flower_env import set_simulation_env

set_simulation_env()

import click  # noqa: E402

from common.cli_args import parse_run_config, positive_int, positive_ints  # noqa: E402
from common.config import resolve_config  # noqa: E402
from common.errors import FedRecError  # noqa: E402
from common.privacy import ACCOUNTANTS, calibrate_noise_after, default_delta, epsilon_of, steps_per_epoch  # noqa: E402
from common.item_prior import planned_prior, refuse_unaffordable_prior  # noqa: E402
from common.private_evaluation import evaluation_mechanism, planned_evaluations, refuse_unaffordable_evaluations  # noqa: E402
from common.task import partner_data  # noqa: E402
from common.training import user_count_for_training  # noqa: E402
from common.cli_errors import user_errors_exit  # noqa: E402


def plan(cfg: dict, num_partners: int, rounds: list[int]) -> list[dict]:
    """One row per partner: users, delta, sample rate, steps per round, noise, epsilon per accountant and round."""
    from common.errors import ConfigError
    from common.privacy import dp_mode, uses_local_dp

    if not uses_local_dp(dp_mode(cfg)):  # it printed a local noise plan for a run that has no local DP
        raise ConfigError(f"dp-mode = {dp_mode(cfg)!r}: this plans the partners' local DP-SGD noise, which such a "
                          "run does not add (central DP's epsilon is in the run's privacy.json)")
    rows = []
    for pid in range(num_partners):
        data = partner_data(cfg, {"partition-id": pid, "num-partitions": num_partners})
        users = user_count_for_training(data)
        # as a partner does: noised evaluation sums cover every user of its log (client/privacy_budget.py)
        delta = float(cfg["target-delta"]) or default_delta(max(users, data.num_users) if planned_evaluations(cfg) else users)
        rate, steps = steps_per_epoch(users, int(cfg["batch-size"]))
        per_round = int(cfg["local-epochs"]) * steps
        evaluation = evaluation_mechanism(float(cfg["evaluation-noise-multiplier"]))
        refuse_unaffordable_evaluations(cfg, delta)
        refuse_unaffordable_prior(cfg, delta)
        noise = calibrate_noise_after(planned_prior(cfg) + [evaluation] * planned_evaluations(cfg),
                                      target_epsilon=float(cfg["target-epsilon"]),
                                      target_delta=delta, sample_rate=rate,
                                      total_steps=int(cfg["num-server-rounds"]) * per_round,
                                      accountant=str(cfg["accountant"]))
        row = {"partner": pid, "users": users, "delta": delta, "sample-rate": rate, "steps-per-round": per_round,
               "noise-multiplier": noise}
        if planned_evaluations(cfg):
            row["evaluations"] = planned_evaluations(cfg)
        for acc in ACCOUNTANTS:
            for r in rounds:
                spent = planned_prior(cfg) + [(noise, rate, r * per_round)] + [evaluation] * planned_evaluations(cfg, through=r)
                row[f"eps-{acc}@{r}"] = epsilon_of(spent, delta, acc)
        rows.append(row)
    return rows


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-partners", type=positive_int, default=5)
    parser.add_argument("--rounds", type=positive_ints, default=[5, 20], help="comma-separated rounds to report epsilon after")
    parser.add_argument("--run-config", action="append", default=[])
    args = parser.parse_args(argv)
    try:
        cfg = resolve_config(None, parse_run_config(args.run_config))
        rows = plan(cfg, args.num_partners, args.rounds)
    except (FedRecError, ValueError, click.ClickException) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    print(f"noise calibrated with the {cfg['accountant']} accountant for target epsilon {cfg['target-epsilon']:g} "
          f"over {cfg['num-server-rounds']} rounds x {cfg['local-epochs']} local epochs, batch {cfg['batch-size']}")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
