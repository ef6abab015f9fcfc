"""reverse-histories: every training history is also trained on read backwards (dp = false only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.data.sequences import SequenceData
from common.errors import ConfigError
from common.models import SASRec
from common.training import DPSettings, train_local
from common.training_pairs import read_backwards, training_pairs


def _data() -> SequenceData:
    # user a: train 1 2 3 4, validation 5, test 6; user b: train 7 8, validation 9, test 1
    return SequenceData(
        catalogue=np.array([str(i) for i in range(1, 10)]),
        user_ids=np.array(["a", "b"]),
        sequences=[np.array([1, 2, 3, 4, 5, 6]), np.array([7, 8, 9, 1])],
        timestamps=[np.array([10, 20, 40, 80, 90, 95]), np.array([5, 6, 7, 8])],
    )


def test_backwards_pairs_are_the_training_items_reversed() -> None:
    inputs, targets = training_pairs(_data(), 4, backwards=True).tensors
    # forward pairs first (what training_pairs gives without the option), then one per history read backwards
    assert inputs.tolist() == [[0, 1, 2, 3], [0, 0, 0, 7], [0, 4, 3, 2], [0, 0, 0, 8]]
    assert targets.tolist() == [[0, 2, 3, 4], [0, 0, 0, 8], [0, 3, 2, 1], [0, 0, 0, 7]]
    # the validation (5, 9) and test (6) items are never trained on, in either direction
    assert not {5, 6, 9} & (set(inputs.flatten().tolist()) | set(targets.flatten().tolist()))


def test_backwards_windows_cover_the_reversed_history() -> None:
    data = SequenceData(catalogue=np.array([str(i) for i in range(1, 13)]), user_ids=np.array(["a"]),
                        sequences=[np.arange(1, 13)], timestamps=[np.arange(12) * 10])
    inputs, targets = training_pairs(data, 4, windows=True, backwards=True).tensors
    reversed_targets = sorted(int(t) for t in targets[len(targets) // 2:].flatten() if t)
    assert len(targets) == 6  # 10 training items: 3 windows each way
    assert reversed_targets == list(range(1, 10))  # every reversed item but the first (10) is a target once


def test_time_gaps_read_backwards_are_the_real_gaps_mirrored() -> None:
    inputs, _ = training_pairs(_data(), 4, time_features=True, backwards=True).tensors

    def bucket(gap: float) -> int:  # common/models/context.py: 2 + floor(log2(1 + gap)), first item 1
        return 2 + int(np.floor(np.log2(1 + gap)))

    # user a forward: items 1 2 3 (gaps -, 10, 20); backwards: items 4 3 2 (gaps -, 40, 20)
    assert inputs[0, :, 1].tolist() == [0, 1, bucket(10), bucket(20)]
    assert inputs[2, :, 1].tolist() == [0, 1, bucket(40), bucket(20)]
    backwards = read_backwards(_data())
    assert all(np.all(np.diff(t[: len(t) - 2]) >= 0) for t in backwards.timestamps)  # still rising


def _train(data, **options) -> tuple[torch.Tensor, int]:  # noqa: ANN001, ANN003
    torch.manual_seed(0)
    model = SASRec(data.num_items, dim=16, max_len=20, num_blocks=1, dropout=0.0, tied_output=True)
    result = train_local(model, data, epochs=2, batch_size=32, learning_rate=0.01, max_len=20, seed=1, **options)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), result.num_examples


def test_training_uses_both_directions(small_data) -> None:  # noqa: ANN001
    plain, n_plain = _train(small_data)
    both, n_both = _train(small_data, reverse_histories=True)
    assert n_both == 2 * n_plain
    assert not torch.allclose(plain, both)


def test_each_epochs_tie_redraw_is_also_read_backwards(small_data, monkeypatch) -> None:  # noqa: ANN001
    import dataclasses

    import common.training as training

    tied = dataclasses.replace(small_data, timestamps=[np.arange(len(t)) // 3 for t in small_data.timestamps])  # ties
    sizes = []
    real = training.training_pairs

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        out = real(*args, **kwargs)
        sizes.append((kwargs.get("backwards"), len(out)))
        return out

    monkeypatch.setattr(training, "training_pairs", spy)
    _, n_both = _train(tied, reverse_histories=True, shuffle_ties=True, history_windows=True)
    redraws = [size for backwards, size in sizes if backwards]
    assert len(redraws) == 3  # the first pairs, then one redraw per epoch (2 epochs), each with the backwards copy
    assert all(size == n_both for size in redraws)


def test_local_dp_refuses_it_at_server_start() -> None:
    from common.config import resolve_config
    from server.strategy_factory import build_strategy

    for knob in ("reverse-histories", "history-windows"):
        with pytest.raises(ConfigError, match=f"{knob} = true needs dp = false"):
            build_strategy(resolve_config(None, {knob: True}))
        build_strategy(resolve_config(None, {knob: True, "dp": False}))  # without DP it is fine


def test_refused_under_dp(small_data) -> None:  # noqa: ANN001
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="reverse-histories = true needs dp = false"):
        _train(small_data, reverse_histories=True, dp=dp)
    with pytest.raises(ConfigError, match="history-windows = true needs dp = false"):
        _train(small_data, history_windows=True, dp=dp)


def test_simulation_refuses_it_with_local_dp_before_starting() -> None:
    from simulations.run import run_federation

    with pytest.raises(ConfigError, match="reverse-histories"):
        run_federation({"reverse-histories": True, "dp": True}, 2)


def test_partner_app_follows_the_knob(tmp_path) -> None:  # noqa: ANN001
    from flwr.app import ArrayRecord, Context, RecordDict

    from client.app import make_client_app
    from common.config import resolve_config
    from common.task import new_model, partner_data
    from tests.test_client_training import NODE, TINY, send

    examples = {}
    for reverse in (False, True):
        overrides = {**TINY, "run-dir": str(tmp_path), "dp": False, "reverse-histories": reverse}
        cfg = resolve_config(None, overrides)
        context = Context(run_id=1, node_id=1, node_config=dict(NODE), state=RecordDict(), run_config={})
        arrays = ArrayRecord(new_model(cfg, partner_data(cfg, NODE).num_items).state_dict())
        reply = send(make_client_app(overrides), "train", arrays, context, 1)
        examples[reverse] = reply.content["metrics"]["num-examples"]
    assert examples[True] == 2 * examples[False] > 0
