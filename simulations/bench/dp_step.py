"""One SASRec training step, DP-SGD against non-private: time and peak memory, side by side.

    nice -n 5 python -m simulations.bench.dp_step                   # batch 256, length 200, 3,706 and 37,060 items
    nice -n 5 python -m simulations.bench.dp_step --preset small    # batch 64, length 50 (2-core machines)

Modes: ``nonprivate`` (positions-only loss, as ``train_local`` without DP), ``fused`` (our
per-user clipping, common/per_user_clipping.py; Opacus' torch noise, as simulations draw it),
``fused-secure`` (the same with the CSPRNG noise real partners draw, common/secure_noise.py), Opacus ``ghost`` (fast gradient clipping;
untied output only, it refuses tied weights) and Opacus ``hooks`` (dense per-sample gradients).
Every DP mode includes Opacus' noise, averaging, accountant step and Adam.

Method. Time: all modes in one process, each on its own copy of the model and optimiser, one
warm-up step each, then ``--steps`` rounds that run one step of every mode in turn (round-robin,
so load from other processes on a shared machine hits all modes alike); reported are the best
and median step (ratios use the best, the least disturbed). One fixed synthetic batch (real
lengths uniform in [length/10, length], items uniform). Memory: each mode in a fresh subprocess
(so one mode's high-water mark cannot hide another's), the peak over its first two steps; on CPU
the peak resident set (VmHWM, reset before the first step, so first-step allocations such as
Adam's state count) minus the resident set before it, i.e. what the steps allocate (activations, gradients, per-user state; tracemalloc cannot see
PyTorch's allocator); on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated before,
and time is on CUDA too (synchronised). Writes simulations/bench/results/dp_step[-PRESET].json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import os
import resource
import subprocess
import sys
import time

import torch
from common.cli_args import non_negative_int, output_file, positive_float, positive_int, positive_ints
from common.cli_errors import user_errors_exit
from simulations.bench import RESULTS, write_results

PRESETS = {"full": {"batch": 256, "length": 200, "items": [3706, 37060]},
           "small": {"batch": 64, "length": 50, "items": [3706, 37060]}}
MODES = ["nonprivate", "fused", "fused-secure", "ghost", "hooks"]


def synthetic_batch(batch: int, length: int, items: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (inputs, targets) of ``batch`` users, real lengths uniform in [length/10, length]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, length // 10), length + 1, (batch,), generator=g)
    pad = torch.arange(length)[None, :] < (length - lengths)[:, None]
    inputs = torch.randint(1, items + 1, (batch, length), generator=g).masked_fill(pad, 0)
    targets = torch.randint(1, items + 1, (batch, length), generator=g).masked_fill(pad, 0)
    return inputs, targets


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Start a new high-water mark (Linux >= 4.0: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then VmHWM still counts from process start, which _setup keeps small


def _peak_rss_bytes() -> int:
    """VmHWM of this address space. NOTE: not ``ru_maxrss``, which Linux carries over from the
    forking parent across exec, so a worker started by a big parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _step_function(mode: str, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor):  # noqa: ANN202
    """A zero-argument callable doing one full optimiser step in ``mode``."""
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from common.per_user_clipping import fused_clipped_backward, make_fused_private
    from common.secure_noise import draw_noise_securely
    from common.objectives import SequenceLoss, positions_only_loss

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if mode == "nonprivate":
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            positions_only_loss(model, inputs, targets).backward()
            optimizer.step()
        return step
    loader = DataLoader(TensorDataset(inputs.cpu(), targets.cpu()), batch_size=len(inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        if mode in ("fused", "fused-secure"):
            dp_opt, _ = make_fused_private(engine, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
            if mode == "fused-secure":  # the noise a real partner draws (common/secure_noise.py)
                draw_noise_securely(dp_opt)

            def step() -> None:
                dp_opt.zero_grad(set_to_none=True)
                fused_clipped_backward(model, inputs, targets, max_grad_norm=1.0)
                dp_opt.step()
            return step
        prepared = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, criterion=SequenceLoss(),
                                       noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
                                       grad_sample_mode=mode, wrap_model=False)
    dp_opt, criterion = prepared[1], (prepared[2] if mode == "ghost" else SequenceLoss())

    def step() -> None:
        dp_opt.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            criterion(model(inputs), targets).backward()
        dp_opt.step()
    return step


def _setup(mode: str, *, items: int, batch: int, length: int, tied: bool, dev: torch.device):  # noqa: ANN202
    from common.config import DEFAULTS
    from common.models import SASRec

    torch.manual_seed(0)
    model = SASRec(items, max_len=length, dim=int(DEFAULTS["embedding-dim"]), num_blocks=int(DEFAULTS["num-blocks"]),
                   num_heads=int(DEFAULTS["num-heads"]), dropout=float(DEFAULTS["dropout"]), tied_output=tied).to(dev).train()
    inputs, targets = (t.to(dev) for t in synthetic_batch(batch, length, items))
    return _step_function(mode, model, inputs, targets)


def time_modes(modes: list[str], *, items: int, batch: int, length: int, steps: int, tied: bool, device: str) -> dict:
    """Step seconds per mode, measured round-robin in this process (see the module docstring)."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    runners = {m: _setup(m, items=items, batch=batch, length=length, tied=tied, dev=dev) for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(steps + 1):  # the first round is a warm-up
        for mode, step in runners.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            if i:
                times[mode].append(time.perf_counter() - start)
    return {m: sorted(t) for m, t in times.items()}


def peak_memory(mode: str, *, items: int, batch: int, length: int, tied: bool, device: str) -> float:
    """MiB the step allocates at its peak beyond what was resident before it (run in a fresh process)."""
    dev = torch.device(device)
    step = _setup(mode, items=items, batch=batch, length=length, tied=tied, dev=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
        _reset_peak_rss()
    for _ in range(2):
        step()
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else _peak_rss_bytes()) - before
    return max(peak, 0) / 2**20


def _memory_worker(mode: str, args: argparse.Namespace, items: int) -> float | str:
    cmd = [sys.executable, "-m", "simulations.bench.dp_step", "--worker", mode, "--items", str(items), "--batch",
           str(args.batch), "--length", str(args.length), "--device", args.device]
    cmd += ["--tied"] if args.tied else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode or not lines:
        return "failed: " + (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
    return float(json.loads(lines[-1])["peak_extra_mb"])


def table(rows: list[dict]) -> str:
    """Markdown table with ratios to the non-private row of the same catalogue and tying."""
    base = {(r["items"], r["tied"]): r for r in rows if r["mode"] == "nonprivate"}
    out = ["| items | output | mode | step best (s) | median (s) | time vs non-private | peak extra MB | memory vs non-private |",
           "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        tie = "tied" if r["tied"] else "untied"
        b = base.get((r["items"], r["tied"]))
        tr = f"{r['best_s'] / b['best_s']:.2f}x" if b else "-"
        ok = b and isinstance(r["peak_extra_mb"], float) and isinstance(b["peak_extra_mb"], float) and b["peak_extra_mb"] > 0
        mr = f"{r['peak_extra_mb'] / b['peak_extra_mb']:.2f}x" if ok else "-"
        mem = f"{r['peak_extra_mb']:.0f}" if isinstance(r["peak_extra_mb"], float) else r["peak_extra_mb"]
        out.append(f"| {r['items']} | {tie} | {r['mode']} | {r['best_s']:.3f} | {r['median_s']:.3f} | {tr} | {mem} | {mr} |")
    return "\n".join(out)


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--items", type=positive_ints, default=None, help="catalogue sizes, comma-separated (default: the preset's)")
    parser.add_argument("--batch", type=positive_int, default=None)
    parser.add_argument("--length", type=positive_int, default=None)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--tied", action="store_true", help="tied output layer (Opacus ghost is skipped: it refuses tying)")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed rounds of every mode (after one warm-up round)")
    parser.add_argument("--threads", type=non_negative_int, default=0, help="torch threads per worker (0 = torch's default)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--timeout", type=positive_float, default=1800.0, help="seconds per memory subprocess before it is reported failed")
    parser.add_argument("--out", type=output_file, default=None,
                        help="results JSON (default simulations/bench/results/dp_step-PRESET[-tied].json)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    args.batch = args.batch or preset["batch"]
    args.length = args.length or preset["length"]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps({"peak_extra_mb": peak_memory(args.worker, items=args.items[0], batch=args.batch,
                                                        length=args.length, tied=args.tied, device=args.device)}))
        return 0
    sizes = args.items or preset["items"]
    unknown = [m for m in args.modes.split(",") if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {', '.join(unknown)} (choose from {', '.join(MODES)})")
    modes = [m for m in args.modes.split(",") if not (args.tied and m == "ghost")]
    rows = []
    for items in sizes:
        times = time_modes(modes, items=items, batch=args.batch, length=args.length, steps=args.steps,
                           tied=args.tied, device=args.device)
        for mode in modes:
            t = times[mode]
            rows.append({"mode": mode, "items": items, "tied": args.tied, "best_s": t[0], "median_s": statistics.median(t),
                         "steps_s": t, "peak_extra_mb": _memory_worker(mode, args, items),
                         "threads": torch.get_num_threads(), "device": args.device})
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    out = args.out or RESULTS / f"dp_step-{args.preset}{'-tied' if args.tied else ''}.json"
    meta = {"batch": args.batch, "length": args.length, "steps": args.steps, "device": args.device,
            "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(), "command": " ".join(sys.argv)}
    print()
    write_results(out, {"settings": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
