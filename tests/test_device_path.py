"""The GPU partner's path on CPU-only CI: the ClientApp trains and evaluates with its model on another device.

No GPU runs here, so ``tests/fake_device.py`` emulates one: tensors on it report device ``meta``, keep
their data on CPU, and raise as CUDA would when they meet a CPU tensor (or on ``.numpy()``). A review
found the training and evaluation paths clean this way; this keeps a stray ``torch.arange(n)`` from
reaching a partner's GPU unseen. DP noise must still come from the CSPRNG, not the device's generator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_DRIVE = r"""
import json, sys, tempfile
import torch
torch.set_num_threads(1)
from tests.fake_device import Dev, FakeDevice
import common.training as training
training.pick_device = lambda requested="auto": torch.device("meta")
import common.secure_noise as secure_noise
draws = {"csprng": 0, "on-device": 0}
csprng = secure_noise.SecureGaussian.noise_like
def counted(self, reference, std):
    out = csprng(self, reference, std)
    draws["csprng"] += 1
    draws["on-device"] += isinstance(out, Dev)
    return out
secure_noise.SecureGaussian.noise_like = counted
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from client.app import _evaluate, _train
from client.partner_policy import apply_partner_policy
from common.config import resolve_config
from common.task import new_model, partner_data
from tests.conftest import flower_message

out = {}
for name, extra in json.loads(sys.argv[1]).items():
    cfg = resolve_config(None, {"synthetic-users": 120, "synthetic-items": 30, "max-seq-len": 12, "embedding-dim": 8,
                                "num-blocks": 1, "local-epochs": 1, "batch-size": 16, "num-server-rounds": 2,
                                "run-dir": tempfile.mkdtemp(), **extra})
    node = {"partition-id": 0, "num-partitions": 2}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    arrays = ArrayRecord(new_model(cfg, partner_data(cfg, node).num_items).state_dict())
    draws.update(csprng=0, **{"on-device": 0})
    steps = []
    for server_round, kind in ((1, "train"), (2, "train"), (2, "evaluate")):
        msg = flower_message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}), kind)
        with FakeDevice():
            if kind == "train":
                reply = _train(msg, context, apply_partner_policy(cfg, context.node_config))
                arrays = reply.content["arrays"]
            else:
                reply = _evaluate(msg, context, cfg)
        if reply.has_error():
            raise SystemExit(f"{name} {kind}: {reply.error.reason}")
        steps.append(kind)
    out[name] = {"steps": steps, **draws, "weights-on-cpu": all(type(arrays[k].numpy()).__name__ == "ndarray" for k in arrays)}
print(json.dumps(out))
"""


def _drive(scenarios: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FEDREC_REPRODUCIBLE_DP_NOISE", None)
    proc = subprocess.run([sys.executable, "-c", _DRIVE, json.dumps(scenarios)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_partner_trains_and_evaluates_with_its_model_on_another_device():
    out = _drive({"sasrec-fused": {}, "sasrec-hooks-tied": {"grad-sample-mode": "hooks", "tied-output": True},
                  "mf": {"model": "mf"}, "no-dp": {"dp": False}})
    for name, result in out.items():
        assert result["steps"] == ["train", "train", "evaluate"] and result["weights-on-cpu"], (name, result)
    for name in ("sasrec-fused", "sasrec-hooks-tied", "mf"):  # DP noise: every draw from the CSPRNG, none on device
        assert out[name]["csprng"] > 0 and out[name]["on-device"] == out[name]["csprng"], (name, out[name])
    assert out["no-dp"]["csprng"] == 0


def test_the_emulated_device_refuses_what_cuda_refuses():
    # The harness must catch the mistakes it is there for: a CPU tensor meeting a device tensor, and .numpy()
    code = r"""
import torch
from tests.fake_device import FakeDevice
with FakeDevice():
    x = torch.ones(3, device="meta")
    assert torch.equal((x + torch.tensor(1.0)).cpu(), torch.full((3,), 2.0))  # a 0-dim CPU scalar is fine
    for mistake in (lambda: x + torch.ones(3), lambda: x.numpy()):
        try:
            mistake()
        except (RuntimeError, TypeError) as exc:
            assert "FAKE-CUDA" in str(exc), exc
        else:
            raise SystemExit("not refused")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
