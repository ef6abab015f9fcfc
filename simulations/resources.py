"""Ray backend settings for Flower's simulation engine: how many clients train at once, on what.

Flower starts ``floor(CPUs / cpus-per-client)`` actors (capped by ``GPUs / gpus-per-client`` when
clients ask for GPUs), each a long-lived process, so the per-process caches of common/task.py
and common/partners.py load and partition the data once per actor, not once per round. Ray sets
``OMP_NUM_THREADS`` of an actor to its CPU share, so one CPU per client keeps every core busy
with one single-threaded training each (what a 2-core machine wants); on a larger machine give
each client several CPUs when its batches are large enough to use them.
"""

from __future__ import annotations

import os

from common.errors import ConfigError


def backend_config(*, cpus_per_client: float = 1.0, gpus_per_client: float = 0.0, num_cpus: int | None = None) -> dict:
    """``backend_config`` for ``flwr.simulation.run_simulation``.

    ``cpus_per_client``/``gpus_per_client``: Ray resources reserved per simulated client
    (fractions allowed, e.g. 0.25 GPU = four clients share one GPU); ``num_cpus``: CPUs Ray may
    use (default: all of this machine's).
    """
    import torch

    cpus = num_cpus or os.cpu_count() or 1
    if not 0 < cpus_per_client <= cpus:
        raise ConfigError(f"cpus-per-client = {cpus_per_client:g} must be in (0, {cpus}] on this machine")
    init_args: dict = {"num_cpus": cpus, "include_dashboard": False, "logging_level": "error", "log_to_driver": True}
    if gpus_per_client < 0:
        raise ConfigError(f"num-gpus = {gpus_per_client:g} per client must be >= 0")
    if gpus_per_client > 0:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus == 0:
            raise ConfigError(f"num-gpus = {gpus_per_client:g} per client, but this machine has no CUDA GPU visible to PyTorch")
        if gpus_per_client > gpus:
            raise ConfigError(f"num-gpus = {gpus_per_client:g} per client, but this machine has {gpus} GPU(s)")
        init_args["num_gpus"] = gpus
    # Clients given no GPU get CUDA_VISIBLE_DEVICES="" from Ray, so device = auto trains them on CPU.
    return {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client}, "init_args": init_args}


def concurrent_clients(backend: dict) -> int:
    """How many clients Flower's actor pool trains at once with ``backend`` (its own rule, one node)."""
    res, init = backend["client_resources"], backend["init_args"]
    actors = int(init["num_cpus"] / res["num_cpus"])
    if res.get("num_gpus", 0) > 0:
        actors = min(actors, int(init.get("num_gpus", 0) / res["num_gpus"]))
    return actors
