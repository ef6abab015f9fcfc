"""FastDropout (common/models/fast_dropout.py) against nn.Dropout, side by side in one process.

    python -m simulations.bench.dropout --dataset ../shared/data/ml-100k --threads 2

Two measurements, each alternating the two implementations (``--repeats`` times each, median):
the dropout call alone on a (64, 50, dim) activation, and one non-private training epoch of the
SASRec the time-to-quality goal uses (``embedding-dim`` 128, tied output, history windows, batch 64,
``max-seq-len`` 50), where the model's FastDropout modules are swapped for ``nn.Dropout`` of the same
rate for the reference. Prints a table of times and ratios and writes
simulations/bench/results/dropout.json (with the 1-minute load average before and after).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

from simulations.bench import RESULTS, write_results
from common.cli_args import output_file, positive_int
from common.cli_errors import user_errors_exit


def swap_dropout(model: nn.Module, make: type[nn.Module]) -> None:
    """Replace every dropout module of ``model`` (FastDropout is an nn.Dropout) by ``make(p)``, in place."""
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(parent, name, make(child.p))


def _median_seconds(fn, repeats: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="../shared/data/ml-100k")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--dim", type=positive_int, default=128)
    parser.add_argument("--repeats", type=positive_int, default=3, help="epochs per implementation (alternating)")
    parser.add_argument("--out", type=output_file, default=str(RESULTS / "dropout.json"))
    args = parser.parse_args(argv)
    from common.config import resolve_config
    from common.models.fast_dropout import FastDropout
    from common.task import federation_data, new_model
    from common.training import train_local

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    kinds = {"FastDropout": FastDropout, "nn.Dropout": nn.Dropout}

    # The call alone
    x = torch.randn(64, 50, args.dim)
    call_ms = {}
    for name, make in kinds.items():
        layer = make(0.2).train()
        layer(x)
        call_ms[name] = 1e3 * _median_seconds(lambda layer=layer: [layer(x) for _ in range(100)], 5) / 100

    # One training epoch, the implementations alternating
    cfg = resolve_config(None, {"dataset": args.dataset, "embedding-dim": args.dim, "tied-output": True,
                                "max-seq-len": 50, "dropout": 0.2})
    data = federation_data(cfg)
    model = new_model(cfg, data.num_items)
    train = dict(epochs=1, batch_size=64, learning_rate=0.002, max_len=50, history_windows=True)
    train_local(model, data, **train)  # warm-up
    epochs: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(args.repeats):
        for name, make in kinds.items():
            swap_dropout(model, make)
            epochs[name].append(train_local(model, data, **train).seconds)
    epoch_s = {name: statistics.median(v) for name, v in epochs.items()}

    result = {
        "settings": {"dataset": args.dataset, "threads": args.threads, "dim": args.dim, "repeats": args.repeats,
                     "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
                     "command": " ".join(sys.argv)},
        "call_ms": call_ms, "call_ratio": call_ms["FastDropout"] / call_ms["nn.Dropout"],
        "epoch_s": epochs, "epoch_median_s": epoch_s, "epoch_ratio": epoch_s["FastDropout"] / epoch_s["nn.Dropout"],
    }
    print("| measurement | FastDropout | nn.Dropout | ratio |\n|---|---:|---:|---:|")
    print(f"| dropout call, (64, 50, {args.dim}) | {call_ms['FastDropout']:.2f} ms | {call_ms['nn.Dropout']:.2f} ms "
          f"| {result['call_ratio']:.2f}x |")
    print(f"| training epoch (median of {args.repeats}) | {epoch_s['FastDropout']:.2f} s | {epoch_s['nn.Dropout']:.2f} s "
          f"| {result['epoch_ratio']:.2f}x |")
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
