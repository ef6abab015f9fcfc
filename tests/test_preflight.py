"""A simulation's config is refused before Ray starts (simulations/preflight.py): the ServerApp's refusals,
min-nodes above the partner count, and partitions too small to train; a sweep refuses them before its
first run."""

from __future__ import annotations

import json

import pytest

from common.config import resolve_config
from common.errors import ConfigError, FedRecError
from simulations import preflight, run, sweep

SMALL = {"synthetic-users": 150, "synthetic-items": 40, "max-seq-len": 20, "embedding-dim": 16, "num-blocks": 1,
         "num-server-rounds": 1, "batch-size": 8}


def _no_ray(monkeypatch):
    import flwr.simulation

    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **_: pytest.fail("Ray was started"))


def _argv(partners: int, **overrides) -> list[str]:
    text = " ".join(f"{k}={v!r}".replace("'", '"') if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in {**SMALL, **overrides}.items())
    return ["--num-partners", str(partners), "--run-config", text]


@pytest.mark.parametrize("partners, overrides, message", [
    (3, {"min-nodes": 5}, "min-nodes = 5 but the simulation has 3 partners"),
    # the ServerApp's own refusal, found about 14 s in, after partitioning and Ray's start
    (5, {"dp-mode": "central", "target-delta": 0.5}, "target-delta = 0.5 is at least 1 / 2 partners"),
    (5, {"aggregation": "krum", "min-nodes": 2}, "krum"),
    # every partition below batch-size: every partner refused every round, and the run exited 3 at the end
    (5, {"batch-size": 64}, r"5 of 5 simulated partners cannot train \(partner-0: only \d+ users with training data, "
                            r"not more than batch-size 64.*fewer than min-nodes = 2"),
    # every partner refused every round opening its ledger under a file, and the run exited 3 at the end
    (3, {"ledger-dir": f"{__file__}/ledgers"}, r"ledger-dir = .*test_preflight.py/ledgers'?: .*test_preflight.py is a "
                                               r"file, not a folder"),
    # typos of a model or its item features, and a start model that is not there: found inside every partner
    # after Ray's start (about 30 s each, every run of a sweep: a journey review)
    (3, {"model": "sasrek"}, "model = 'sasrek' is unknown; use one of sasrec, mf"),
    (3, {"item-features": "txt"}, "item-features = 'txt' is unknown; use one of id, text, id\\+text"),
    (3, {"init-model": "runs/nope"}, r"init-model = 'runs/nope': runs/nope does not exist; give a run directory"),
])
def test_a_run_the_coordinator_or_its_partners_would_refuse_is_one_line_before_ray(partners, overrides, message,
                                                                                  monkeypatch, capsys):
    _no_ray(monkeypatch)
    assert run.main(_argv(partners, **overrides)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    import re

    assert re.search(message, err[0]), err[0]


def test_item_init_with_too_large_a_catalogue_is_one_line_before_ray(monkeypatch, capsys):
    # it was refused inside the ServerApp, after Ray's start and the partners' data
    import server.item_init

    _no_ray(monkeypatch)
    monkeypatch.setattr(server.item_init, "MAX_ITEMS", 30)  # SMALL has 40 items
    assert run.main(_argv(3, **{"dp": False, "item-init": "cooccurrence"})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: item-init = "cooccurrence" with 40 items: each partner would send a 41 x 41 table (0.0 GB); '
                   'it takes at most 30 items, use item-init = "random"'], err


def test_partners_too_small_for_the_batch_are_named_while_the_others_train(monkeypatch, capsys):
    cfg = resolve_config(None, {**SMALL, "partitioning": "size-skew", "batch-size": 12})
    unable = preflight.check_simulation(cfg, 5)
    assert unable and len(unable) < 4, unable  # some, and at least min-nodes (2) left to train
    assert all("not more than batch-size 12" in why for why in unable.values())
    line = preflight.describe_unable(unable, 5)
    assert line.startswith(f"warning: {len(unable)} of 5 simulated partners will refuse every round (partner-")

    class Started(Exception):
        pass

    import flwr.simulation

    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **_: (_ for _ in ()).throw(Started()))
    with pytest.raises(Started):
        run.run_federation({**SMALL, "partitioning": "size-skew", "batch-size": 12}, 5)
    assert line in capsys.readouterr().err


def test_what_partners_would_not_refuse_is_not_counted():
    cfg = resolve_config(None, {**SMALL, "batch-size": 64})
    assert len(preflight.partners_unable_to_train(cfg, 5)) == 5
    # without local DP, and with a noised count (trained at 2 steps an epoch at least), nothing refuses a small partner
    assert preflight.partners_unable_to_train(resolve_config(None, {**SMALL, "batch-size": 64, "dp": False}), 5) == {}
    noised = resolve_config(None, {**SMALL, "batch-size": 64, "simulated-count-noise": True})
    assert preflight.partners_unable_to_train(noised, 5) == {}
    # a target-delta meaningless for a partner's users: its partner refuses it
    loose = resolve_config(None, {**SMALL, "target-delta": 0.05})
    assert all("target-delta = 0.05 is at least 1 / " in why for why in preflight.partners_unable_to_train(loose, 5).values())
    assert len(preflight.partners_unable_to_train(loose, 5)) == 5


def test_a_partitioning_that_cannot_split_the_users_this_way_is_refused():
    cfg = resolve_config(None, {**SMALL, "partitioning": "cross-device"})
    with pytest.raises(FedRecError, match="cross-device partitioning needs one partner per user"):
        preflight.check_simulation(cfg, 5)


def test_cross_device_with_local_dp_names_the_fix_not_one_partners_symptom():
    # one user per partner: no DP-SGD batch to sample; the line said "partner-0: only 1 user ..." (a doc audit)
    from common.partners import split_population

    cfg = resolve_config(None, {**SMALL, "partitioning": "cross-device", "min-nodes": 1})
    users = split_population(cfg)[0].num_users  # one partner each
    with pytest.raises(ConfigError, match='cross-device.*local DP-SGD.*dp-mode = "off" or "central"'):
        preflight.check_simulation(cfg, users)
    # where empty partitions (not DP) leave too few, the line names them: dp-mode off would not help
    crowded = resolve_config(None, {**SMALL, "partitioning": "cross-device", "min-nodes": users,
                                    "simulated-count-noise": True})
    with pytest.raises(FedRecError, match="no user with a training example"):
        preflight.check_simulation(crowded, users)
    for mode in ("off", "central"):  # what the line suggests passes the preflight
        preflight.check_simulation(resolve_config(None, {**SMALL, "partitioning": "cross-device", "min-nodes": 1,
                                                         "dp-mode": mode}), users)


def test_a_sweep_refuses_a_cell_whose_partners_cannot_train_before_any_run(tmp_path, monkeypatch):
    # cross-device on synthetic data: another user count per seed, and every run failed on its own row
    calls = []
    monkeypatch.setattr(sweep, "execute", lambda run, *a, **k: calls.append(run))
    config = tmp_path / "s.toml"
    config.write_text(f'[sweep]\noutput = "{tmp_path}/r.csv"\nseeds = [1]\n[fixed]\n'
                      + "".join(f"{k} = {v}\n" for k, v in SMALL.items())
                      + 'partitioning = "cross-device"\n[grid]\nnum-partners = [150]\n')
    with pytest.raises(ConfigError, match="cross-device partitioning needs one partner per user"):
        sweep.load_sweep(config)
    config.write_text(config.read_text().replace('partitioning = "cross-device"\n', "").replace("[150]", "[2, 30]"))
    with pytest.raises(ConfigError, match=r"30 of 30 simulated partners cannot train"):
        sweep.load_sweep(config)
    assert calls == []


def test_a_target_no_partner_can_reach_and_a_delta_checked_before_the_noised_count_are_found():
    # A review: both passed the preflight while every partner refused every round (the run ended with exit 3)
    unreachable = resolve_config(None, {**SMALL, "target-epsilon": 0.05, "num-server-rounds": 5})
    unable = preflight.partners_unable_to_train(unreachable, 5)
    assert len(unable) == 5 and all("cannot reach epsilon=0.05" in why for why in unable.values()), unable
    assert preflight.partners_unable_to_train(resolve_config(None, {**SMALL, "num-server-rounds": 5}), 5) == {}
    noised = resolve_config(None, {**SMALL, "target-delta": 0.05, "simulated-count-noise": True})
    assert all("target-delta = 0.05 is at least 1 / " in why for why in preflight.partners_unable_to_train(noised, 5).values())
    assert len(preflight.partners_unable_to_train(noised, 5)) == 5


def test_a_sweep_reads_a_relative_dataset_under_the_repository_root_from_anywhere(tmp_path, monkeypatch):
    # A review: the preflight read [fixed] dataset against the current directory, while every run starts in the
    # repository root; every shipped config (dataset = "../shared/data/...") failed outside it, --table too
    import os

    from common.data.catalogue import PROJECT_ROOT

    data = tmp_path / "data"
    data.mkdir()
    rows = [f"{u},{i},{t}" for u in range(1, 41) for t, i in enumerate(range(1 + u % 5, 9 + u % 5))]
    (data / "log.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    relative = os.path.relpath(data / "log.csv", PROJECT_ROOT)
    config = tmp_path / "s.toml"
    config.write_text(f'[sweep]\noutput = "{tmp_path}/r.csv"\nseeds = [1]\n[fixed]\ndataset = "{relative}"\n'
                      "batch-size = 4\nnum-server-rounds = 1\nmax-seq-len = 8\n[grid]\nnum-partners = [2]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert sweep.load_sweep(config)["fixed"]["dataset"] == relative
    assert os.getcwd() == str(elsewhere)


def test_an_empty_partition_is_named_and_another_data_error_is_raised(monkeypatch):
    # The empty partition was recognised by its message's words ("has no users"): now by its type
    from common.errors import DataError, EmptyPartitionError

    real = preflight.simulated_partner

    def partner(cfg, pid, n):
        if pid == 1:
            raise EmptyPartitionError("partition 1 of 3 (iid) is empty in other words")
        return real(cfg, pid, n)

    monkeypatch.setattr(preflight, "simulated_partner", partner)
    assert preflight.partners_unable_to_train(resolve_config(None, SMALL), 3) == {1: "no users"}
    monkeypatch.setattr(preflight, "simulated_partner", lambda cfg, pid, n: (_ for _ in ()).throw(DataError("has no users")))
    with pytest.raises(DataError, match="has no users"):
        preflight.partners_unable_to_train(resolve_config(None, SMALL), 3)


def test_the_in_process_runner_makes_the_same_checks_and_writes_the_population(tmp_path, capsys):
    # A simulation-features journey: local_grid waited out node-wait-timeout for min-nodes above its partner
    # count, ran a 3-partner cross-device split to exit 0, and wrote no holdout.json for the audit
    from simulations import local_grid

    assert local_grid.main(_argv(3, **{"min-nodes": 5, "run-dir": str(tmp_path)})) == 2
    assert "min-nodes = 5 but the simulation has 3 partners" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before any run directory
    assert local_grid.main(_argv(3, **{"holdout-fraction": 0.2, "run-dir": str(tmp_path), "run-name": "h"})) == 0
    held = json.loads((tmp_path / "h" / "holdout.json").read_text())
    assert held["holdout-fraction"] == 0.2 and held["user-ids"] and (tmp_path / "h" / "partitions.json").is_file()
