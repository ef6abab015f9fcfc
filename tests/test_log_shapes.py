"""Logs whose columns are not what they seem: read right, or refused in one line (a bad-input review).

Each case was accepted as "ok" before, with wrong numbers: a Parquet id column with one null cut every id to
its first character; rows with one more field than the header were read shifted by one column; float ids
became "28.0"; ids beyond int64 raised a traceback; booleans read as times.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.data.loaders import load_interactions
from common.data.sequences import build_sequences
from common.errors import DataError

ROWS = [(u, 100 + (u * 7 + k) % 13, 1000 + k) for u in range(1, 13) for k in range(5)]


def _frame() -> pd.DataFrame:
    return pd.DataFrame(ROWS, columns=["user_id", "item_id", "timestamp"])


def test_one_null_id_in_parquet_drops_that_row_and_keeps_every_other_id_whole(tmp_path):
    frame = _frame().astype({"user_id": str})
    frame.loc[3, "user_id"] = None
    path = tmp_path / "log.parquet"
    frame.to_parquet(path)
    log = load_interactions(path)
    assert log.dropped == {"missing-id": 1}
    assert sorted(set(log.user.tolist()), key=int) == [str(u) for u in range(1, 13)]  # "10", "11", "12" whole


def test_float_ids_in_parquet_are_their_integers(tmp_path):
    frame = _frame().astype({"item_id": float})
    frame.loc[5, "item_id"] = np.nan  # why a writer stores the column as float
    frame.to_parquet(tmp_path / "log.parquet")
    log = load_interactions(tmp_path / "log.parquet")
    assert log.dropped == {"missing-id": 1}
    assert set(log.item.tolist()) == {str(i) for i in range(100, 113)}


def test_booleans_lists_and_fractions_are_no_ids_nor_times(tmp_path):
    frame = _frame().astype({"item_id": object, "timestamp": object})
    frame.at[0, "item_id"], frame.at[1, "item_id"], frame.at[2, "item_id"] = True, 2.5, "x"
    frame.at[3, "timestamp"] = True
    frame.to_pickle(tmp_path / "frame.pkl")  # Parquet keeps one type a column: checked on the frame itself
    from common.data.loaders import _validate

    log = _validate(frame, "frame")
    assert log.dropped == {"bad-id": 2, "bad-timestamp": 1}
    bools = pd.DataFrame({"user_id": [1, 2], "item_id": [3, 4], "timestamp": [True, False]})
    bools.to_parquet(tmp_path / "b.parquet")
    with pytest.raises(DataError, match="no valid rows .*2 bad-timestamp"):
        load_interactions(tmp_path / "b.parquet")


def test_rows_with_more_fields_than_the_header_are_refused_in_one_line(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t},5\n" for u, i, t in ROWS))
    with pytest.raises(DataError, match=r"log.csv: its rows have 4 fields and its header names 3"):
        load_interactions(path)
    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t4\t{t}\t0\n" for u, i, t in ROWS))
    with pytest.raises(DataError, match=r"u.data: its lines have 5 tab-separated fields; u.data has 4"):
        load_interactions(folder)


def test_a_trailing_separator_on_every_row_is_read_as_if_absent(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t},\n" for u, i, t in ROWS))
    log = load_interactions(path)
    assert not log.dropped and len(log.user) == len(ROWS)
    assert log.user.tolist() == [str(u) for u, _, _ in ROWS] and log.timestamp.tolist() == [t for *_, t in ROWS]


def test_ids_beyond_int64_are_ordered_as_text(tmp_path):
    path = tmp_path / "log.csv"
    big = 10**25
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"{big + u},{big + i},{t}\n" for u, i, t in ROWS))
    data = build_sequences(load_interactions(path))
    assert data.num_items == 13 and len(data.user_ids) == 12


def test_decimal_and_binary_ids_are_read_as_text(tmp_path):
    # A review of the first version: Spark / Oracle decimal(38, 0) and unmarked BINARY id columns became bad-id
    from decimal import Decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "user_id": pa.array([Decimal(u) for u, _, _ in ROWS], pa.decimal128(38, 0)),
        "item_id": pa.array([str(i).encode() for _, i, _ in ROWS], pa.binary()),
        "timestamp": [t for *_, t in ROWS]}), tmp_path / "log.parquet")
    log = load_interactions(tmp_path / "log.parquet")
    assert not log.dropped and log.user.tolist() == [str(u) for u, _, _ in ROWS]
    assert log.item.tolist() == [str(i) for _, i, _ in ROWS]


def test_a_first_column_of_row_names_is_read_as_before(tmp_path):
    # R's write.table(sep="\t", quote=FALSE): a header of 3 names, rows led by their number (pandas aligned them)
    path = tmp_path / "log.tsv"
    path.write_text("user_id\titem_id\ttimestamp\n" + "".join(f"{n}\t{u}\t{i}\t{t}\n" for n, (u, i, t)
                                                               in enumerate(ROWS, start=1)))
    log = load_interactions(path)
    assert not log.dropped and log.user.tolist() == [str(u) for u, _, _ in ROWS]
    assert log.timestamp.tolist() == [t for *_, t in ROWS]
