"""What a partner sends when it fails: a reason without its data, its paths or a library's quote of either."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from client.app import make_client_app
from client.safe_errors import INTERNAL_ERROR, USER_ERROR, safe_reason
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
