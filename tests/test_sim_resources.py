"""Simulation resources: both cores busy, GPU requests checked before Ray starts, data cached per process."""

from __future__ import annotations

import pytest
import torch

from common.errors import ConfigError
from simulations.resources import backend_config, concurrent_clients


def test_one_cpu_per_client_trains_one_client_per_core():
    backend = backend_config(num_cpus=2)
    assert backend["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert concurrent_clients(backend) == 2
    assert concurrent_clients(backend_config(cpus_per_client=4, num_cpus=16)) == 4


def test_gpu_request_without_gpu_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        backend_config(gpus_per_client=0.5, num_cpus=2)
    with pytest.raises(ConfigError, match="cpus-per-client"):
        backend_config(cpus_per_client=3, num_cpus=2)


def test_fractional_gpus_share_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    backend = backend_config(gpus_per_client=0.25, num_cpus=16)
    assert backend["init_args"]["num_gpus"] == 2
    assert concurrent_clients(backend) == 8  # GPU-bound: 2 / 0.25, not 16 CPUs
    with pytest.raises(ConfigError, match="2 GPU"):
        backend_config(gpus_per_client=3, num_cpus=16)


def test_device_selection_picks_cuda_only_where_it_exists(monkeypatch):
    from common.training import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="has 0 CUDA device"):
        pick_device("cuda")
    for bad in ("gpu", "mps"):
        with pytest.raises(ConfigError, match="device = "):
            pick_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="has 2 CUDA device"):
        pick_device("cuda:2")


def test_partner_data_is_partitioned_once_per_process():
    from common.config import resolve_config
    from common.partners import _partitions
    from common.task import _federation_data, partner_data

    cfg = resolve_config(None, {"synthetic-users": 120, "synthetic-items": 40, "seed": 9})
    _partitions.cache_clear()
    _federation_data.cache_clear()
    for _ in range(3):  # three rounds
        for pid in range(4):
            partner_data(cfg, {"partition-id": pid, "num-partitions": 4})
    assert _partitions.cache_info().misses == 1
    assert _federation_data.cache_info().misses == 1
