"""The GPU path in one prepared command: does every training and evaluation path run on CUDA and
give what it gives on the CPU?

    python -m simulations.bench.gpu_check                     # on a machine with CUDA; exit 0 all passed, 1 not
    python -m simulations.bench.gpu_check --device cpu        # the same checks on the CPU (the script's own test)

Checks, each on small synthetic data (seconds on a GPU):

* ``per-user-norms``: our fused per-user clipping's norms on the device equal each user's gradient
  norm from its own backward pass on the CPU (tied and untied SASRec);
* ``dp-train-<mode>``: ``train_local`` with DP-SGD (fused, hooks, ghost) on the device: finite loss,
  the planned steps on the accountant, weights moved, every parameter still on the device;
* ``plain-matches-cpu``: non-private training from the same seed gives the same weights on the
  device as on the CPU (within float tolerance; GPU kernels sum in another order);
* ``mf-dp-train``: the matrix-factorisation baseline trains with DP-SGD on the device;
* ``evaluation-matches-cpu``: full-ranking HR@10 / NDCG@10 of one model equal on both devices.

Writes the results as JSON (``--out``); a device this machine lacks is one error line (exit 2).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import sys
from collections.abc import Callable

import torch

from common.cli_args import output_file
from common.cli_errors import user_errors_exit

CHECKS: list[tuple[str, Callable[[torch.device], str]]] = []


def check(name: str) -> Callable:
    def register(fn: Callable[[torch.device], str]) -> Callable[[torch.device], str]:
        CHECKS.append((name, fn))
        return fn
    return register


@functools.cache  # one data set for every check (its loader warns once)
def _data(users: int = 40, items: int = 40):  # noqa: ANN202 -- SequenceData (imported lazily)
    from common.data import build_sequences, generate_synthetic

    return build_sequences(generate_synthetic(num_users=users, num_items=items, seed=0), name="gpu-check")


def _sasrec(items: int, tied: bool = True, dropout: float = 0.0):  # noqa: ANN202
    from common.models import SASRec

    torch.manual_seed(0)
    return SASRec(items, max_len=12, dim=16, num_blocks=2, num_heads=2, dropout=dropout, tied_output=tied)


@check("per-user-norms")
def per_user_norms(device: torch.device) -> str:
    from common.objectives import SequenceLoss
    from common.per_user_clipping import fused_clipped_backward

    g = torch.Generator().manual_seed(1)
    seq = torch.randint(1, 31, (6, 12), generator=g)
    tgt = torch.randint(1, 31, (6, 12), generator=g)
    worst = 0.0
    for tied in (True, False):
        model = _sasrec(30, tied)
        params = list(model.parameters())
        reference = torch.stack([torch.sqrt(sum((gr ** 2).sum() for gr in torch.autograd.grad(
            SequenceLoss(reduction="sum")(model(seq[i:i + 1]), tgt[i:i + 1]), params, allow_unused=True)
            if gr is not None)) for i in range(len(seq))])
        on_device = copy.deepcopy(model).to(device)
        norms = fused_clipped_backward(on_device, seq.to(device), tgt.to(device), max_grad_norm=1.0).norms.cpu()
        worst = max(worst, float(((norms - reference).abs() / reference).max()))
    assert worst < 1e-3, f"per-user norms differ from per-user backprop by {worst:.2e} (relative)"
    return f"max relative difference {worst:.1e}"


def _dp_train(device: torch.device, mode: str) -> str:
    from common.dp_sgd import DPSettings
    from common.training import train_local, user_count_for_training

    data = _data()
    model = _sasrec(data.num_items, tied=mode != "ghost", dropout=0.1)  # ghost refuses tied weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, noise_seed=0)
    result = train_local(model, data, epochs=2, batch_size=8, learning_rate=0.01, max_len=12, dp=dp, device=device)
    assert math.isfinite(result.loss), f"loss {result.loss}"
    planned = 2 * math.ceil(user_count_for_training(data) / 8)  # 2 epochs at rate 1/ceil(users / batch)
    recorded = sum(steps for _, _, steps in result.mechanisms)
    assert recorded == result.steps == planned, \
        f"accountant recorded {recorded} steps, took {result.steps}, planned {planned}"
    assert all(p.device.type == device.type for p in model.parameters()), "a parameter left the device"
    moved = sum(not torch.equal(before[k], v.cpu()) for k, v in model.state_dict().items())
    assert moved >= len(before) // 2, f"only {moved} of {len(before)} tensors changed"
    return f"loss {result.loss:.3f}, {recorded} steps, {moved}/{len(before)} tensors moved"


for _mode in ("fused", "hooks", "ghost"):
    check(f"dp-train-{_mode}")(lambda device, _m=_mode: _dp_train(device, _m))


@check("plain-matches-cpu")
def plain_matches_cpu(device: torch.device) -> str:
    from common.training import train_local

    data = _data()
    trained = {}
    for where in (torch.device("cpu"), device):
        model = _sasrec(data.num_items)
        train_local(model, data, epochs=1, batch_size=8, learning_rate=0.01, max_len=12, device=where, seed=3)
        trained[where.type] = {k: v.cpu() for k, v in model.state_dict().items()}
    worst = max(float((trained["cpu"][k] - v).abs().max()) for k, v in trained[device.type].items())
    assert worst < 1e-3, f"weights differ from the CPU's by up to {worst:.2e}"
    return f"max weight difference {worst:.1e}"


@check("mf-dp-train")
def mf_dp_train(device: torch.device) -> str:
    from common.dp_sgd import DPSettings
    from common.models.mf import MatrixFactorization, train_mf_local

    data = _data()
    torch.manual_seed(0)
    model = MatrixFactorization(data.num_items, dim=8)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=0)
    result, factors = train_mf_local(model, data, None, epochs=2, batch_size=8, learning_rate=0.05, max_len=12,
                                     dp=dp, device=device)
    assert math.isfinite(result.loss) and torch.isfinite(factors).all(), "MF loss or user factors not finite"
    assert all(p.device.type == device.type for p in model.parameters()), "a parameter left the device"
    return f"loss {result.loss:.3f}, {result.steps} steps"


@check("evaluation-matches-cpu")
def evaluation_matches_cpu(device: torch.device) -> str:
    from common.evaluation import evaluate_model

    data = _data()
    model = _sasrec(data.num_items)
    on_cpu = evaluate_model(model, data, max_len=12, device="cpu")
    on_device = evaluate_model(copy.deepcopy(model).to(device), data, max_len=12, device=device)
    sums = [k for k, v in on_cpu.items() if isinstance(v, float)]
    for key in sums:
        assert abs(on_cpu[key] - on_device[key]) < 1e-6, f"{key}: CPU {on_cpu[key]}, {device.type} {on_device[key]}"
    users = len(data.eval_cases("test")[1])
    return (f"HR@10 {on_device['hit@10-sum'] / users:.4f}, NDCG@10 {on_device['ndcg@10-sum'] / users:.4f} "
            f"({len(sums)} sums equal)")


def run_checks(device: torch.device) -> list[dict]:
    """Every check on ``device``: one row each, passed or with the reason it failed."""
    rows = []
    for name, fn in CHECKS:
        try:
            rows.append({"check": name, "passed": True, "detail": fn(device)})
        except Exception as err:  # noqa: BLE001 -- a failed check is a row of the report, the others still run
            rows.append({"check": name, "passed": False, "detail": f"{type(err).__name__}: {err}"})
    return rows


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--out", type=output_file, help="write the results as JSON here")
    args = parser.parse_args(argv)
    from common.training import pick_device

    device = pick_device(args.device)  # a device this machine lacks: one ConfigError line
    rows = run_checks(device)
    for row in rows:
        print(f"{'PASS' if row['passed'] else 'FAIL'}  {row['check']:<24} {row['detail']}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.out:
        args.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "checks": rows}, indent=1))
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
