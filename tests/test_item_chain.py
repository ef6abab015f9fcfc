"""The partner's item chain (common/item_chain.py): its probabilities by hand, the blended ranking
against a brute-force NDCG, a partner scoring with its own users' counts only, and the knobs' checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from common.config import resolve_config
from common.errors import ConfigError
from common.evaluation import evaluate_model
from common.item_chain import chain_from_config, item_chain
from common.metrics import means_from_sums, pad_left
from common.models import SASRec
from tests.test_baselines import _brute_ndcg, _data  # (ties in a ranking at their expected value)


def test_chain_probabilities_by_hand() -> None:
    # neighbours in [1, 2, 3] and [2, 3]: 1-2 once, 2-3 twice (each pair counted in both directions)
    chain = item_chain([np.array([1, 2, 3]), np.array([2, 3])], 5, window=2, decay=0.5, weight=1.0)
    probs = np.exp(chain.log_probs([np.array([1, 3]), np.array([], dtype=np.int64)]))
    # history [1, 3]: latest 3 (weight 1) has neighbour 2 (count 2); 1 (weight 0.5) has neighbour 2 (count 1)
    # -> item 2 scores 2 + 0.5 = 2.5; the tie break (1e-6 x popularity / max) is all the rest, where item 4,
    # in no history, counts as half an event (not probability 0: the blend could never recommend a new item)
    popularity = np.array([0, 1, 2, 2, 0.5]) / 2 * 1e-6
    expected = popularity.copy()
    expected[2] += 2.5
    np.testing.assert_allclose(probs[0], expected / expected.sum() + 1e-12, rtol=1e-9)
    # an empty history ranks by popularity alone (no neighbour to count from)
    np.testing.assert_allclose(probs[1], popularity / popularity.sum() + 1e-12, rtol=1e-9)
    assert probs.shape == (2, 5)


def test_window_limits_the_items_looked_at() -> None:
    chain = item_chain([np.array([1, 2]), np.array([3, 4])], 5, window=1, decay=1.0, weight=1.0)
    # only the latest item (3) counts: 4 is its neighbour, 2 (neighbour of the older 1) gets nothing
    logp = chain.log_probs([np.array([1, 3])])[0]
    assert logp[4] > np.log(0.99) and logp[2] < np.log(1e-5)


def test_evaluation_ranks_by_model_plus_weighted_chain(small_data) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = SASRec(small_data.num_items, dim=8, max_len=10, num_blocks=1, dropout=0.0).eval()
    width = small_data.num_items + 1
    histories, targets = small_data.eval_cases("test")
    # an independent dense chain from the training histories: counts of a next to b, both orders
    m = np.zeros((width, width))
    for s in small_data.train_sequences():
        for a, b in zip(s[:-1], s[1:]):
            m[a, b] += 1
            m[b, a] += 1
    popularity = small_data.item_counts() / small_data.item_counts().max() * 1e-6
    chain = np.tile(popularity, (len(histories), 1))
    for row, h in enumerate(histories):
        for step, item in enumerate(h[::-1][:4]):
            chain[row] += 0.7 ** step * m[item]
    with torch.no_grad():
        logp = torch.log_softmax(model.score(pad_left(histories, 10)).double(), dim=1).numpy()
    expected = logp + 1.5 * np.log(chain / chain.sum(axis=1, keepdims=True) + 1e-12)
    blended = evaluate_model(model, small_data, max_len=10, chain=item_chain(
        small_data.train_sequences(), width, window=4, decay=0.7, weight=1.5))
    assert means_from_sums(blended)["ndcg@10"] == pytest.approx(_brute_ndcg(expected, histories, targets), abs=1e-9)
    alone = means_from_sums(evaluate_model(model, small_data, max_len=10))["ndcg@10"]
    assert alone == pytest.approx(_brute_ndcg(logp, histories, targets), abs=1e-9)
    assert means_from_sums(blended)["ndcg@10"] > alone  # the synthetic log's neighbours carry signal


def test_a_partner_scores_with_its_own_users_counts(small_data) -> None:  # noqa: ANN001
    from flwr.app import Context, RecordDict

    from client.private_factors import evaluate_partner

    torch.manual_seed(0)
    model = SASRec(small_data.num_items, dim=8, max_len=10, num_blocks=1, dropout=0.0).eval()
    ours = small_data.subset(np.arange(0, 100))
    cfg = resolve_config({"max-seq-len": 10, "tie-orders": 1, "chain-weight": 1.0, "chain-window": 5,
                          "chain-decay": 0.6})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    sums = evaluate_partner(model, ours, context, cfg)
    own = item_chain(ours.train_sequences(), ours.num_items + 1, window=5, decay=0.6, weight=1.0)
    everyone = item_chain(small_data.train_sequences(), small_data.num_items + 1, window=5, decay=0.6, weight=1.0)

    def shared(s: dict) -> dict:  # what a real partner sends
        return {k: v for k, v in s.items() if not k.startswith("rec-items@")}

    assert sums == shared(evaluate_model(model, ours, max_len=10, chain=own))
    assert sums != shared(evaluate_model(model, ours, max_len=10, chain=everyone))  # nobody else's counts
    assert sums != evaluate_partner(model, ours, context, {**cfg, "chain-weight": 0.0})  # 0 = the model alone
    assert chain_from_config({**cfg, "chain-weight": 0.0}, ours.train_sequences(), 61) is None


def test_the_chain_never_sees_validation_or_test_items() -> None:
    # user 0's only training pair is 1-2; its validation (3) and test (4) items must not be neighbours
    data = _data([[1, 2, 3, 4], [1, 2, 5, 6]], 6)
    chain = chain_from_config(resolve_config({"chain-weight": 1.0, "chain-window": 3}), data.train_sequences(), 7)
    logp = chain.log_probs([np.array([2])])[0]
    assert logp[1] > np.log(0.99)
    assert max(logp[3], logp[4], logp[5], logp[6]) < np.log(1e-5)
    # train-on-validation: the validation item (3) is training data, so 2-3 counts; the test item never does
    final_fit = dataclasses.replace(data, validation_held_out=False)
    logp = chain_from_config(resolve_config({"chain-weight": 1.0}), final_fit.train_sequences(), 7).log_probs(
        [np.array([3])])[0]
    assert logp[2] > np.log(0.99) and logp[4] < np.log(1e-5)


@pytest.mark.parametrize("override, key", [({"chain-weight": -0.5}, "chain-weight"), ({"chain-window": 0}, "chain-window"),
                                           ({"chain-decay": 0.0}, "chain-decay"), ({"chain-decay": 1.5}, "chain-decay")])
def test_bad_chain_knobs_are_refused(override: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        resolve_config(override)


def test_noised_evaluation_refuses_the_chain() -> None:
    # the noised sums' sensitivity (common/private_evaluation.py) holds only if a user moves their own sums
    cfg = {"dp-mode": "local", "evaluation-noise-multiplier": 5.0}
    assert resolve_config(cfg)["evaluation-noise-multiplier"] == 5.0
    with pytest.raises(ConfigError, match="chain-weight > 0 with evaluation-noise-multiplier"):
        resolve_config({**cfg, "chain-weight": 0.5})
    assert resolve_config({**cfg, "chain-weight": 0.5, "model": "mf"})["model"] == "mf"  # MF ignores the chain


# -- serving: `recommend` / `serve` rank as the partner evaluated, and explain the blend --------------------

@pytest.fixture(scope="module")
def chain_model(tmp_path_factory):
    """A small SASRec saved as a run's model.pt whose run config blends the partner's chain in."""
    from common.data import build_sequences, generate_synthetic
    from common.task import new_model
    from common.training import train_local
    from tests.test_serving import save_model

    log = generate_synthetic(num_users=120, num_items=40, mean_length=12, seed=11)
    data = build_sequences(log)
    cfg = resolve_config(None, {"embedding-dim": 16, "num-blocks": 1, "max-seq-len": 20, "dropout": 0.0, "seed": 5,
                                "chain-weight": 0.8, "chain-window": 6, "chain-decay": 0.7})
    model = new_model(cfg, data.num_items)
    train_local(model, data, epochs=4, batch_size=32, learning_rate=0.01, max_len=20, seed=1)
    run = tmp_path_factory.mktemp("chain-run")
    save_model(run, model, data.catalogue, cfg)
    return run, log


def _blended_scores(gm, histories_of_everyone: list[np.ndarray], history: np.ndarray) -> torch.Tensor:  # noqa: ANN001
    """The served ranking computed by hand: log-softmax of the model's scores + 0.8 x the chain of every history."""
    chain = item_chain(histories_of_everyone, len(gm.catalogue) + 1, window=6, decay=0.7, weight=0.8)
    with torch.no_grad():
        logp = torch.log_softmax(gm.model.score(pad_left([history], 20)).double(), dim=1)[0]
    return logp + 0.8 * torch.from_numpy(chain.log_probs([history])[0])


def test_served_ranking_and_explanations_follow_the_blend(chain_model) -> None:  # noqa: ANN001
    from client.recommend import LogHistory, Recommender, load_global_model

    run, log = chain_model
    gm = load_global_model(run)
    source = LogHistory(log)
    everyone = [np.array([gm.index[i] for i in h], dtype=np.int64) for h in source.all_histories()]
    named = 0
    for user in sorted(set(log.user.tolist()))[:8]:
        result = Recommender(gm).recommend(user, source, 4, explain=True)
        history = np.array([gm.index[i] for i in source.history(user)[0]], dtype=np.int64)
        scores = _blended_scores(gm, everyone, history)
        scores[[0, *history.tolist()]] = float("-inf")
        assert [r.item_id for r in result.items] == [str(gm.catalogue[i - 1]) for i in torch.topk(scores, 4).indices]
        assert [r.score for r in result.items] == pytest.approx(torch.topk(scores, 4).values.tolist(), abs=1e-6)
        for rec in result.items:
            if not rec.explanation.because:
                continue
            top, target = rec.explanation.because[0], gm.index[rec.item_id]
            # removing the named item's event lowers the blended score by the influence reported
            without = np.delete(history, np.flatnonzero(history == top.index)[0])
            drop = float(_blended_scores(gm, everyone, history)[target] - _blended_scores(gm, everyone, without)[target])
            assert drop == pytest.approx(top.influence, abs=1e-5)
            named += 1
    assert named >= 8


def test_served_chain_follows_new_events_in_the_store(chain_model, tmp_path) -> None:  # noqa: ANN001
    from client.recommend import Recommender, load_global_model
    from common.data.event_store import EventStore

    run, _ = chain_model
    gm = load_global_model(run)
    a, b, c = (str(x) for x in gm.catalogue[:3])
    with EventStore(tmp_path / "events.db", create=True) as store:
        store.add_many([("u1", a, 1, None), ("u1", b, 2, None)])
        recommender = Recommender(gm)
        before = recommender.chain(store)
        assert before is not None and before is recommender.chain(store)  # built once per store state
        # another user rates c next to a: the chain counts the new pair from then on
        store.add_many([("u2", a, 3, None), ("u2", c, 4, None)])
        after = recommender.chain(store)
        logp = after.log_probs([np.array([gm.index[a]])])[0]
        assert logp[gm.index[c]] > np.log(0.3) and before.log_probs([np.array([gm.index[a]])])[0][gm.index[c]] < np.log(1e-5)
        assert store.all_histories() == [[a, b], [a, c]]
        # serve's refresh: a rebuild reads the whole store, so new events enter at most every chain_refresh_s
        slow = Recommender(gm, chain_refresh_s=60.0)
        first = slow.chain(store)
        store.add_many([("u3", b, 5, None), ("u3", c, 6, None)])
        counted = []
        store_count = store.count
        store.count = lambda: counted.append(1) or store_count()  # within the window the store is not queried
        assert slow.chain(store) is first and not counted
        slow._chain = (slow._chain[0], slow._chain[1] - 61.0, first)  # a minute later: the new events are read
        assert slow.chain(store) is not first and counted
        assert Recommender(gm, use_chain=False).chain(store) is None  # the partner's opt-out (--no-chain)


def test_recommend_cli_no_chain_ranks_by_the_model_alone(chain_model, tmp_path, capsys) -> None:  # noqa: ANN001
    import json

    from client.cli import main
    from client.recommend import LogHistory, Recommender, load_global_model

    run, log = chain_model
    csv = tmp_path / "log.csv"
    csv.write_text("user_id,item_id,timestamp\n" + "\n".join(
        f"{u},{i},{t}" for u, i, t in zip(log.user, log.item, log.timestamp)))
    user = str(log.user[0])
    args = ["recommend", "--model", str(run), "--data-path", str(csv), "--user", user, "--k", "5", "--format", "json"]
    gm = load_global_model(run)
    by_hand = {flag: [r.score for r in Recommender(gm, use_chain=flag).recommend(user, LogHistory(log), 5).items]
               for flag in (True, False)}
    assert by_hand[True] != by_hand[False]
    for extra, flag in (([], True), (["--no-chain"], False)):
        assert main([*args, *extra]) == 0
        scores = [item["score"] for item in json.loads(capsys.readouterr().out)["items"]]
        assert scores == pytest.approx(by_hand[flag], abs=1e-6)


def test_a_model_without_the_chain_serves_the_model_alone(chain_model) -> None:  # noqa: ANN001
    from client.recommend import LogHistory, Recommender, load_global_model

    run, log = chain_model
    gm = load_global_model(run)
    assert Recommender(gm).chain(LogHistory(log)) is not None
    gm.config = {**gm.config, "chain-weight": 0.0}
    assert Recommender(gm).chain(LogHistory(log)) is None
    gm.config = {**gm.config, "chain-weight": 0.8, "model": "mf"}  # MF ignores the knobs, served as evaluated
    assert Recommender(gm).chain(LogHistory(log)) is None
