"""train-on-validation: the final fit also learns each user's validation item, never the test item."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from common.config import resolve_config
from common.data import build_sequences, generate_synthetic
from common.data.catalogue import save_catalogue
from common.errors import DataError
from common.partners import simulated_partner
from common.task import federation_data, partner_data, training_view
from common.training_pairs import training_pairs

SMALL = {"synthetic-users": 120, "synthetic-items": 40, "max-seq-len": 20, "seed": 5}


def test_the_validation_item_is_training_data_and_the_test_item_never_is(small_data):
    final = training_view({"train-on-validation": True}, small_data)
    assert small_data.validation_held_out and not final.validation_held_out  # a view: the cached data is unchanged
    for seq, held, train in zip(small_data.sequences, small_data.train_sequences(), final.train_sequences()):
        assert np.array_equal(held, seq[:-2]) and np.array_equal(train, seq[:-1])
    # the test split is the same cases either way
    for split_a, split_b in zip(small_data.eval_cases("test"), final.eval_cases("test")):
        assert all(np.array_equal(a, b) for a, b in zip(split_a, split_b))
    with pytest.raises(DataError, match="train-on-validation"):
        final.eval_cases("valid")  # it was trained on: it cannot choose settings
    assert not final.subset([0, 1]).validation_held_out
    assert training_view({"train-on-validation": False}, small_data) is small_data


def test_each_users_last_training_target_is_its_validation_item(small_data):
    final = training_view({"train-on-validation": True}, small_data)
    inputs, targets = training_pairs(final, max_len=50).tensors
    _, valid = small_data.eval_cases("valid")
    users = final.trainable_users()
    assert np.array_equal(targets[:, -1].numpy(), valid[users])
    _, held_targets = training_pairs(small_data, max_len=50).tensors
    assert not np.array_equal(held_targets[:, -1].numpy(), valid[small_data.trainable_users()])


def test_a_user_with_three_items_trains_on_two_of_them():
    log = generate_synthetic(num_users=30, num_items=20, mean_length=6, seed=1)
    data = build_sequences(log, name="short")
    three = dataclasses.replace(data, sequences=[s[:3] for s in data.sequences],
                                timestamps=[t[:3] for t in data.timestamps])
    assert len(three.trainable_users()) == 0  # one training item: no (input, next item) pair
    assert len(training_view({"train-on-validation": True}, three).trainable_users()) == three.num_users


def test_the_run_config_reaches_simulated_and_deployed_partners(tmp_path):
    cfg = resolve_config(None, {**SMALL, "train-on-validation": True})
    assert not federation_data(cfg).validation_held_out
    assert not simulated_partner(cfg, 0, 2).validation_held_out
    assert simulated_partner(resolve_config(None, SMALL), 0, 2).validation_held_out  # not a cached view of the other

    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\n" + "".join(f"u{u},{i},{10 * u + i}\n" for u in range(4) for i in range(1, 6)))
    catalogue = save_catalogue(np.array([str(i) for i in range(1, 6)]), tmp_path / "catalogue.txt")
    deployed = resolve_config(None, {"catalogue": str(catalogue), "train-on-validation": True})
    data = partner_data(deployed, {"data-path": str(log)})
    assert not data.validation_held_out and [len(h) for h in data.train_sequences()] == [4] * 4


def test_the_popularity_reference_can_learn_the_validation_items_too(tmp_path, capsys):
    from simulations import baselines

    log = tmp_path / "log.csv"
    # Item 9 is no one's training item: the validation item of users 0-9 and the test item of users 10-19.
    # A filler user's 30 items outrank it, unless the validation items count as training data.
    rows = [(f"u{u}", [1 + u % 3, 4 + u % 4, 9 if u < 10 else 7, 2 + u % 5 if u < 10 else 9]) for u in range(20)]
    rows.append(("filler", list(range(20, 50))))
    log.write_text("user_id,item_id,timestamp\n" + "".join(
        f"{user},{item},{t}\n" for user, items in rows for t, item in enumerate(items)))
    scores = {}
    for flag in ([], ["--train-on-validation"]):
        assert baselines.main(["--dataset", str(log), *flag]) == 0
        scores[bool(flag)] = json.loads(capsys.readouterr().out)["popularity"]["hr@10"]
    assert scores[True] > scores[False] + 0.3  # users 10-19 find item 9 only then
    with pytest.raises(SystemExit) as stop:
        baselines.main(["--dataset", str(log), "--train-on-validation", "--split", "valid"])
    assert stop.value.code == 2 and "--train-on-validation" in capsys.readouterr().err


def test_the_centralised_bench_refuses_to_score_validation_items_it_trained_on(tmp_path, capsys):
    from simulations.bench import centralised

    overrides = json.dumps({**SMALL, "dp": False, "train-on-validation": True})
    assert centralised.main(["--overrides", overrides, "--out", str(tmp_path / "b.json"), "--validation"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train-on-validation" in err[0]
