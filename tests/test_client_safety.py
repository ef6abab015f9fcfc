"""What a partner sends when it fails: a reason without its data, its paths or a library's quote of either."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from client.app import make_client_app
from client.safe_errors import INTERNAL_ERROR, USER_ERROR, private_paths, safe_reason
from common.errors import ConfigError, DataError, PrivacyError
from tests.conftest import flower_message

SECRET_ROW = "alice-7731,matrix-reloaded,1600000123"


@pytest.mark.parametrize(("exc", "kept", "gone"), [
    (DataError(f"/home/partner/private/log.csv: missing column(s) user_id (found {SECRET_ROW})"),
     "log.csv: missing column(s) user_id", ["/home/partner", "alice-7731"]),
    (DataError("catalogue /srv/x/catalogue.txt: item id 'matrix-reloaded' appears more than once"),
     "catalogue catalogue.txt: item id <value> appears", ["/srv", "matrix-reloaded"]),
    (PrivacyError("budget exhausted: epsilon 8.000 of 8.0 spent"), "budget exhausted: epsilon 8.000 of 8.0", []),
    (ConfigError("partition-id 7 is outside 0..1"), "partition-id 7 is outside 0..1", []),
    # a default ledger's file name holds the hash of the partner's data (eighteenth session)
    (PrivacyError("privacy ledger /srv/ledgers/partner-0123456789abcdef.sqlite is in use by another training"),
     "privacy ledger <default ledger file> is in use", ["0123456789abcdef"]),
    (KeyError("alice-7731"), "KeyError: internal error at the partner", ["alice-7731"]),
    (ValueError(f"could not convert string to float: '{SECRET_ROW}'"), "ValueError: internal error", ["alice"]),
])
def test_safe_reason_keeps_the_advice_and_drops_the_data(exc, kept, gone):
    reason = safe_reason(exc)
    assert kept in reason
    assert all(g not in reason for g in gone)
    assert "\n" not in reason and len(reason) <= 320


def test_a_headerless_log_does_not_leak_its_first_row_to_the_server(tmp_path):
    # A partner forgot the header: the loader's message names the "columns" it found, i.e. a data row
    log = tmp_path / "private" / "log.csv"
    log.parent.mkdir()
    log.write_text(f"{SECRET_ROW}\nbob-1,heat,1600000200\n")
    (tmp_path / "catalogue.txt").write_text("heat\n")
    app = make_client_app({"run-dir": str(tmp_path), "dp": False, "catalogue": str(tmp_path / "catalogue.txt")})
    context = Context(run_id=1, node_id=1, node_config={"data-path": str(log)}, state=RecordDict(), run_config={})
    msg = flower_message(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"server-round": 1})}), "train")

    reply = app(msg, context)

    assert reply.has_error() and reply.error.code == USER_ERROR
    assert "missing column" in reply.error.reason
    assert "alice" not in reply.error.reason and str(tmp_path) not in reply.error.reason


@pytest.mark.parametrize("first_row", [
    # an egress review: the sanitiser's "(found ...)" pattern failed as soon as a value held a parenthesis
    "alice@example.com,Toy Story (1995),1700000000", "alice@example.com,item(7),1700000000",
    "alice@example.com),item-1,1700000000"])
def test_a_headerless_row_with_parentheses_does_not_reach_the_server(tmp_path, first_row):
    log = tmp_path / "log.csv"
    log.write_text(f"{first_row}\nbob-1,heat,1600000200\n")
    (tmp_path / "catalogue.txt").write_text("heat\n")
    app = make_client_app({"run-dir": str(tmp_path), "dp": False, "catalogue": str(tmp_path / "catalogue.txt")})
    context = Context(run_id=1, node_id=1, node_config={"data-path": str(log)}, state=RecordDict(), run_config={})
    reply = app(flower_message(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"server-round": 1})}),
                               "train"), context)
    assert reply.has_error() and "log.csv: missing column(s)" in reply.error.reason
    assert not any(part in reply.error.reason for part in ("alice", "item(7)", "item-1", "Toy", "1700000000")), \
        reply.error.reason


@pytest.mark.parametrize("data_path", ["/tmp/Jane Doe/patients/log.csv", "clients/alice@example.com/log.csv"])
def test_the_partners_folders_stay_out_of_the_reason(tmp_path, data_path, monkeypatch):
    # an egress review: a path with spaces, or a relative one, was sent whole
    monkeypatch.chdir(tmp_path)
    app = make_client_app({"run-dir": str(tmp_path), "dp": False, "catalogue": str(tmp_path / "catalogue.txt")})
    (tmp_path / "catalogue.txt").write_text("heat\n")
    context = Context(run_id=1, node_id=1, node_config={"data-path": data_path}, state=RecordDict(), run_config={})
    reply = app(flower_message(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"server-round": 1})}),
                               "train"), context)
    assert reply.has_error() and "log.csv" in reply.error.reason
    assert not any(part in reply.error.reason for part in ("Jane", "patients", "alice", "clients")), reply.error.reason


def test_path_cutting_keeps_the_sentence_and_finds_paths_resolved_through_the_data_dir(tmp_path, monkeypatch):
    # A diff review: a data-path "." removed every dot of the reason (a budget of 3.912 read 3912), "/" every
    # slash, "s/log.csv" the "s" of other words; and a relative data-path resolved through $FEDREC_DATA_DIR
    # was sent with that folder's name
    budget = PrivacyError("budget exhausted: epsilon 3.912 of 4 spent; see docs/privacy.md and runs/ for the data")
    for path in (".", "/", "s/log.csv", "data/log.csv"):
        context = Context(run_id=1, node_id=1, node_config={"data-path": path}, state=RecordDict(), run_config={})
        assert safe_reason(budget, private_paths(context)) == str(budget)
    secret = tmp_path / "rev3 Acme Corp"
    secret.mkdir()
    (secret / "log.csv").write_text("")
    monkeypatch.setenv("FEDREC_DATA_DIR", str(secret))
    app = make_client_app({"run-dir": str(tmp_path), "dp": False, "catalogue": str(tmp_path / "catalogue.txt")})
    (tmp_path / "catalogue.txt").write_text("heat\n")
    context = Context(run_id=1, node_id=1, node_config={"data-path": "log.csv"}, state=RecordDict(), run_config={})
    reply = app(flower_message(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"server-round": 1})}),
                               "train"), context)
    assert reply.has_error() and reply.error.reason.startswith("log.csv: file is empty"), reply.error.reason
    assert "Acme" not in reply.error.reason


def test_an_unexpected_error_is_reported_by_type_only(tmp_path, monkeypatch, caplog):
    import client.app as client_app

    def boom(*_args, **_kwargs):
        raise RuntimeError(f"row {SECRET_ROW} broke the tokenizer")

    monkeypatch.setattr(client_app, "_evaluate", boom)
    app = make_client_app({"run-dir": str(tmp_path)})
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                      run_config={})
    reply = app(flower_message(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({})}), "evaluate"), context)

    assert reply.has_error() and reply.error.code == INTERNAL_ERROR
    assert reply.error.reason.startswith("RuntimeError: internal error at the partner")
    assert "alice" not in reply.error.reason
    assert any("alice" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)  # kept in the local log


def test_a_real_partner_keeps_its_recommended_item_ids(small_data):  # noqa: ANN001
    # An egress review: evaluation replies carried rec-items@10, the distinct recommended item ids; with seen
    # items left out, a small partner's lists are close to the complement of its users' histories
    import torch
    from flwr.app import Context, RecordDict

    from client.private_factors import evaluate_partner
    from common.config import resolve_config
    from common.evaluation import combine_partner_metrics
    from common.models import SASRec

    torch.manual_seed(0)
    model = SASRec(small_data.num_items, max_len=10, dim=16, num_blocks=1, num_heads=1, dropout=0.0)
    cfg = resolve_config({"max-seq-len": 10})

    def sums(node_config: dict) -> dict:
        return evaluate_partner(model, small_data, Context(run_id=1, node_id=0, node_config=node_config,
                                                           state=RecordDict(), run_config={}), cfg)

    real, simulated = sums({"data-path": "log.csv"}), sums({"partition-id": 0, "num-partitions": 1})
    assert "rec-items@10" not in real and simulated["rec-items@10"]
    assert {k: v for k, v in simulated.items() if k not in ("rec-items@10", "partition-id")} == real
    assert "coverage@10" not in combine_partner_metrics([real], small_data.num_items)  # n/a, not a made-up 0
    assert combine_partner_metrics([simulated], small_data.num_items)["coverage@10"] > 0


def test_path_cutting_units_and_the_length_cap(monkeypatch):
    # A mutation audit: each private source was only tested together with the other, a folder named alone
    # and the length cap not at all
    from client.safe_errors import MAX_REASON_CHARS, _without_private_paths

    assert _without_private_paths("/data/Acme Corp/log.csv: file is empty", [], ["/data/Acme Corp"]) == \
        "log.csv: file is empty"
    assert _without_private_paths("no log in /data/Acme Corp", [], ["/data/Acme Corp"]) == "no log in <folder>"
    assert _without_private_paths("/data/Acme Corp/log.csv: file is empty", ["/data/Acme Corp/log.csv"]) == \
        "log.csv: file is empty"
    monkeypatch.setenv("FEDREC_DATA_DIR", "/data/Acme Corp")
    context = Context(run_id=1, node_id=1, node_config={"data-path": "log.csv"}, state=RecordDict(), run_config={})
    assert "/data/Acme Corp/log.csv" in private_paths(context)
    assert "Acme" not in safe_reason(DataError("event store folder /data/Acme Corp is not writable"), [])
    long = safe_reason(ConfigError("x" * 1000))
    assert len(long) == MAX_REASON_CHARS + 3 and long.endswith("...")
    words = safe_reason(ConfigError("spend " * 200))
    assert len(words) <= MAX_REASON_CHARS + 3 and words.endswith("spend...")  # cut where a word ends


def test_a_reason_is_one_line_whatever_the_message_holds():
    # our own errors may quote a multi-line value or a wrapped sentence: the server's log reads one line per refusal
    assert safe_reason(ConfigError("batch-size too large:\n  set it  below 8")) == "batch-size too large: set it below 8"
