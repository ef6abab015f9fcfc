"""Non-neural references (simulations/baselines.py) against independent computations."""

from __future__ import annotations

import json
from flwr.app import ArrayRecord

import numpy as np
import pytest

from common.data import SequenceData
from common.item_chain import item_chain
from simulations import baselines


def _data(sequences: list[list[int]], num_items: int) -> SequenceData:
    return SequenceData(
        catalogue=np.array([str(i) for i in range(1, num_items + 1)]),
        user_ids=np.array([str(u) for u in range(len(sequences))]),
        sequences=[np.array(s, dtype=np.int64) for s in sequences],
        timestamps=[np.arange(len(s)) for s in sequences],
    )


def test_ease_equals_one_ridge_regression_per_item() -> None:
    rng = np.random.default_rng(0)
    train = [rng.choice(np.arange(1, 9), size=rng.integers(2, 7), replace=False) for _ in range(30)]
    width, l2 = 9, 3.0
    b = baselines.ease_weights(train, width, l2)
    x = np.zeros((len(train), width))
    for row, h in enumerate(train):
        x[row, h] = 1.0
    for j in range(width):
        others = [i for i in range(width) if i != j]
        xo = x[:, others]  # regress item j's column on every other column, no self-weight
        ridge = np.linalg.solve(xo.T @ xo + l2 * np.eye(width - 1), xo.T @ x[:, j])
        assert b[j, j] == 0.0
        np.testing.assert_allclose(b[others, j], ridge, atol=1e-10)


def test_markov_counts_direct_successors_and_decays_older_items() -> None:
    m = baselines.markov_transitions([np.array([1, 2, 3]), np.array([2, 3, 1, 2])], 4)
    expected = np.zeros((4, 4))
    for a, b in [(1, 2), (2, 3), (2, 3), (3, 1), (1, 2)]:
        expected[a, b] += 1
    np.testing.assert_array_equal(m, expected)
    tie = np.array([0.0, 0.01, 0.02, 0.03])
    scores = baselines.markov_scores([np.array([3, 1, 2]), np.array([], dtype=np.int64)], m,
                                     window=2, decay=0.5, tie_break=tie)
    # latest item 2 (weight 1) then 1 (weight 0.5); item 3 is outside the window of 2
    np.testing.assert_allclose(scores[0], tie + 1.0 * expected[2] + 0.5 * expected[1])
    np.testing.assert_allclose(scores[1], tie)  # no history: popularity tie-break only


def _brute_ndcg(scores: np.ndarray, histories, targets, k: int = 10) -> float:
    total = 0.0
    for row, (h, t) in enumerate(zip(histories, targets)):
        others = [i for i in range(1, scores.shape[1]) if i != t and i not in set(h.tolist())]
        rank = sum(scores[row, i] > scores[row, t] for i in others)
        tied = sum(scores[row, i] == scores[row, t] for i in others)
        # a random tie-break puts the target at each place of its tied block equally often
        total += np.mean([1.0 / np.log2(r + 2) if r < k else 0.0 for r in range(rank, rank + tied + 1)])
    return total / len(targets)


def test_references_learn_from_training_histories_only() -> None:
    rng = np.random.default_rng(2)
    data = _data([list(rng.choice(np.arange(1, 16), size=rng.integers(4, 10), replace=False)) for _ in range(40)], 15)
    out = baselines.reference_metrics(data, split="test", ks=(10,), ease_l2=5.0, markov_window=3, markov_decay=0.5)
    histories, targets = data.eval_cases("test")
    counts = data.item_counts().astype(float)
    tie = 1e-6 * counts / counts.max()

    def expected(fit_on):
        x = np.zeros((len(histories), 16))
        for row, h in enumerate(histories):
            x[row, h] = 1.0
        ease = x @ baselines.ease_weights(fit_on, 16, 5.0)
        markov = baselines.markov_scores(histories, baselines.markov_transitions(fit_on, 16), window=3,
                                         decay=0.5, tie_break=tie)
        return _brute_ndcg(ease, histories, targets), _brute_ndcg(markov, histories, targets)

    ease, markov = expected(data.train_sequences())
    assert out["ease"]["ndcg@10"] == pytest.approx(ease) and out["markov"]["ndcg@10"] == pytest.approx(markov)
    # fitted on the evaluation histories (which include the validation items) the figures differ
    assert expected(histories) != pytest.approx((ease, markov))
    assert out["popularity"]["ndcg@10"] == pytest.approx(_brute_ndcg(np.tile(counts, (40, 1)), histories, targets))


def test_cli_prints_every_reference(tmp_path, capsys) -> None:  # noqa: ANN001
    log = tmp_path / "log.csv"
    rows = ["user_id,item_id,timestamp"]
    rng = np.random.default_rng(1)
    for u in range(12):
        for t, item in enumerate(rng.choice(20, size=6, replace=False)):
            rows.append(f"{u},{item},{t}")
    log.write_text("\n".join(rows) + "\n")
    assert baselines.main(["--dataset", str(log), "--ease-l2", "10"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ease"]["l2"] == 10.0 and 0.0 <= out["markov"]["ndcg@10"] <= 1.0


def test_holdout_fraction_leaves_out_the_users_a_simulation_holds_out(tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    from common.config import resolve_config
    from common.partners import split_population

    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\n" + "".join(f"u{u},{(u + t) % 15},{t}\n" for u in range(40) for t in range(5)))
    seen = []
    real = baselines.reference_metrics
    monkeypatch.setattr(baselines, "reference_metrics", lambda data, **kw: seen.append(data) or real(data, **kw))
    assert baselines.main(["--dataset", str(log), "--holdout-fraction", "0.25", "--seed", "3"]) == 0
    members, held = split_population(resolve_config(None, {"dataset": str(log), "holdout-fraction": 0.25, "seed": 3}))
    assert list(seen[0].user_ids) == list(members.user_ids) and len(held.user_ids) == 10
    assert json.loads(capsys.readouterr().out)["popularity"]["hr@10"] >= 0.0
    with pytest.raises(SystemExit):
        baselines.main(["--dataset", str(log), "--holdout-fraction", "1"])


def test_last_step_ties_count_users_whose_order_is_arbitrary() -> None:
    data = _data([[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]], 3)
    data.timestamps = [np.array(t) for t in ([0, 5, 5], [0, 5, 30], [0, 5, 100], [0, 0, 0])]
    assert baselines.last_step_ties(data) == {"test-same-timestamp-as-previous": 0.5,
                                              "test-within-60s-of-previous": 0.75}


@pytest.mark.parametrize("argv", [["--ease-l2", "0"], ["--markov-window", "0"], ["--markov-decay", "-1"]])
def test_bad_knobs_are_refused(argv, tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit) as stop:
        baselines.main(["--dataset", str(tmp_path), *argv])
    assert stop.value.code == 2


def test_blend_is_chosen_on_validation_and_scored_on_test(small_data) -> None:  # noqa: ANN001
    import torch

    from common.metrics import evaluate_ranking, means_from_sums, pad_left
    from common.models import SASRec

    torch.manual_seed(0)
    model = SASRec(small_data.num_items, dim=8, max_len=10, num_blocks=1, dropout=0.0).eval()
    chains, weights = ((3, 0.5), (6, 0.8)), (0.5, 2.0)
    out = baselines.blend_with_model(small_data, model, max_len=10, chains=chains, weights=weights)
    assert out["model"]["ndcg@10"] == pytest.approx(
        means_from_sums(evaluate_ranking(model, small_data, split="test", max_len=10))["ndcg@10"])
    assert out["model"]["valid-ndcg@10"] == pytest.approx(  # the model alone on the validation split
        means_from_sums(evaluate_ranking(model, small_data, split="valid", max_len=10))["ndcg@10"])
    width = small_data.num_items + 1
    counts = small_data.item_counts().astype(float)
    tie = 1e-6 * counts / counts.max()
    m = baselines.markov_transitions(small_data.train_sequences(), width)

    def blended(split: str, window: int, decay: float, w: float) -> float:
        histories, targets = small_data.eval_cases(split)
        with torch.no_grad():
            logp = torch.log_softmax(model.score(pad_left(histories, 10)).double(), dim=1).numpy()
        chain = baselines.markov_scores(histories, m + m.T, window=window, decay=decay, tie_break=tie)
        # the partner-side chain (common/item_chain.py, sparse) is this dense computation
        probs = np.exp(item_chain(small_data.train_sequences(), width, window=window, decay=decay, weight=w)
                       .log_probs(histories))
        np.testing.assert_allclose(probs, chain / chain.sum(axis=1, keepdims=True), rtol=1e-9, atol=2e-12)  # (+ the log floor)
        return _brute_ndcg(logp + w * np.log(chain / chain.sum(axis=1, keepdims=True) + 1e-12), histories, targets)

    grid = {(c[0], c[1], w): blended("valid", *c, w) for c in chains for w in weights}
    chosen = (out["cooccurrence"]["window"], out["cooccurrence"]["decay"], out["blend"]["weight"])
    assert grid[chosen] == pytest.approx(max(grid.values())) == pytest.approx(out["blend"]["valid-ndcg@10"])
    assert out["blend"]["ndcg@10"] == pytest.approx(blended("test", *chosen))
    # "k x popularity" is the model's NDCG@10 over the popularity ranking's, on the same users
    pop_ndcg = baselines.reference_metrics(small_data)["popularity"]["ndcg@10"]
    vs = out["model"]["ndcg@10-vs-popularity"]
    assert vs["ratio"] == pytest.approx(out["model"]["ndcg@10"] / pop_ndcg)
    assert vs["ratio-ci95"][0] <= vs["ratio"] <= vs["ratio-ci95"][1]


def test_paired_ratio_interval() -> None:
    rng = np.random.default_rng(0)
    base = rng.random(500)
    exact = baselines.paired_ratio(3.0 * base, base)  # the same users, 3x each: no spread at all
    assert exact["ratio"] == pytest.approx(3.0) and exact["ratio-ci95"] == pytest.approx([3.0, 3.0])
    small = baselines.paired_ratio(rng.random(100), rng.random(100))
    large = baselines.paired_ratio(rng.random(5000), rng.random(5000))
    width = [r["ratio-ci95"][1] - r["ratio-ci95"][0] for r in (small, large)]
    assert width[1] < width[0] / 3  # about 1/sqrt(50) as wide with 50x the users
    assert large["ratio-ci95"][0] < 1.0 < large["ratio-ci95"][1]  # two draws of the same law
    with pytest.raises(ValueError, match="equally long"):
        baselines.paired_ratio(np.ones(3), np.ones(4))


def test_a_negative_seed_is_refused_by_the_parser(tmp_path, capsys) -> None:  # noqa: ANN001
    # Was: numpy's "ValueError: expected non-negative integer" traceback from the holdout draw
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\n" + "".join(f"u{u},{(u + t) % 15},{t}\n" for u in range(40) for t in range(5)))
    with pytest.raises(SystemExit) as stop:
        baselines.main(["--dataset", str(log), "--holdout-fraction", "0.2", "--seed", "-1"])
    assert stop.value.code == 2
    assert "argument --seed: -1 must be at least 0" in capsys.readouterr().err


def test_blend_model_refuses_a_log_that_is_not_its_data_set_and_reads_synthetic(tmp_path, capsys) -> None:  # noqa: ANN001
    # A review: a model trained on 20 synthetic items blended with another log scored that log over its
    # items 1-20 (93% of the events dropped with a warning) and printed normal-looking numbers
    from common.config import resolve_config
    from common.task import federation_data, new_model
    from server.run_report import RunRecorder

    cfg = resolve_config(None, {"synthetic-users": 60, "synthetic-items": 20, "max-seq-len": 10, "embedding-dim": 8,
                                "num-blocks": 1})
    data = federation_data(cfg)
    run = tmp_path / "run"
    run.mkdir()
    RunRecorder(run, cfg, data.catalogue).save_model(ArrayRecord(new_model(cfg, data.num_items).state_dict()))
    other = tmp_path / "other.csv"
    other.write_text("user_id,item_id,timestamp\n" + "\n".join(f"{u},x{(u + t) % 40},{t}" for u in range(30)
                                                                 for t in range(6)) + "\n")
    assert baselines.main(["--dataset", str(other), "--blend-model", str(run)]) == 2
    assert "events are on items that --blend-model" in capsys.readouterr().err
    # The model's own synthetic set is rebuilt from its config
    assert baselines.main(["--dataset", "synthetic", "--blend-model", str(run)]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["model"]["ndcg@10"] <= 1.0
    # References on the default runs' synthetic set
    assert baselines.main(["--dataset", "synthetic"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["popularity"]["ndcg@10"] <= 1.0


@pytest.mark.parametrize("unknown_share,refused", [(0.2, True), (0.05, False)])
def test_blend_model_threshold_of_unknown_items(tmp_path, unknown_share, refused) -> None:  # noqa: ANN001
    # Mutation audit: only an almost wholly foreign log was tested; the cut is 10% of the events
    from types import SimpleNamespace

    from common.errors import DataError

    trained = SimpleNamespace(catalogue=np.array([f"i{i}" for i in range(20)]), config={"dataset": "x"}, path="run")
    rows, n = ["user_id,item_id,timestamp"], 200
    for e in range(n):
        item = f"x{e}" if e < unknown_share * n else f"i{e % 20}"
        rows.append(f"u{e % 20},{item},{e}")
    log = tmp_path / "log.csv"
    log.write_text("\n".join(rows) + "\n")
    if refused:
        with pytest.raises(DataError, match="events are on items that --blend-model"):
            baselines._model_data(str(log), trained)
    else:
        assert baselines._model_data(str(log), trained).num_items == 20
