"""Bad data never crashes a partner: random and malformed logs per format give a valid log or a DataError.

How many per format: the Hypothesis profile's max_examples (tests/conftest.py: 150 in CI,
500 with HYPOTHESIS_PROFILE=thorough); the bugs the 500-input runs found are @examples here.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from common.data.loaders import Interactions, load_interactions
from common.errors import DataError

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # max_examples: the profile's

NAMES = ["user_id", "item_id", "timestamp", "rating", "userId", "movieId", "time", "uid", "iid", "ts", "event",
         " user_id ", "USER_ID", "", "item", "user"]
# Cells that have broken parsers before: separators, quotes, line breaks, NaN/inf spellings,
# huge and negative numbers, dates, non-ASCII, NUL, whitespace.
NASTY = ["", " ", "nan", "NaN", "inf", "-inf", "1e400", "-1", "0", "9" * 30, "1.5", "2021-03-04", "2021-13-45",
         "2021-03-04T05:06:07Z", "\"", "\"a,b\"", ",", "\t", "::", "é", "\x00", "None", "null", "True", " 7 ",
         "1,000", "0x1A", "١٢٣"]
cell = st.one_of(st.sampled_from(NASTY), st.integers(-10**20, 10**20).map(str),
                 st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=8))


def check(path: Path, data_lines: int | None = None) -> None:
    """The property: a valid log, or a DataError; nothing else."""
    try:
        log = load_interactions(path)
    except DataError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip(), "a DataError is one line"
        return
    assert isinstance(log, Interactions)
    n = len(log)
    assert n > 0 and len(log.item) == n and len(log.timestamp) == n
    assert log.timestamp.dtype == np.int64
    assert all(isinstance(u, str) and u and u == u.strip() for u in log.user)
    assert all(isinstance(i, str) and i and i == i.strip() for i in log.item)
    if log.rating is not None:
        # a blank rating is an unrated event (NaN); never an infinite one
        assert len(log.rating) == n and not np.isinf(log.rating).any()
    assert all(isinstance(v, int) and v > 0 for v in log.dropped.values())
    if data_lines is not None:
        assert n + sum(log.dropped.values()) <= data_lines


def in_temp(name: str, payload: bytes, data_lines: int | None = None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(payload)
        check(path, data_lines)


def delimited(rows: list[list[str]], sep: str) -> str:
    return "\n".join(sep.join(r) for r in rows) + "\n"


@SETTINGS
@given(header=st.lists(st.sampled_from(NAMES), min_size=0, max_size=6),
       rows=st.lists(st.lists(cell, min_size=0, max_size=7), max_size=12),
       garbage=st.one_of(st.none(), st.binary(max_size=64)))
# Regressions found by earlier 500-input runs (fixed in common/data/loaders.py):
@example(header=["user_id", "userId", "item_id", "timestamp"], rows=[["1", "2", "3", "4"]], garbage=None)  # aliases
@example(header=["user_id", "item_id", "timestamp", "rating"], rows=[["1", "2", "3", "1e300"]], garbage=None)  # float32
@example(header=["user_id", "item_id", "timestamp"], rows=[["\x00", "2", "3"], ["1", "\x00", "4"]], garbage=None)  # NUL
@example(header=["user_id", "user_id"], rows=[["inf", "", ""]], garbage=None)  # "inf" as a row name: OverflowError
def test_csv(header, rows, garbage):
    payload = garbage if garbage is not None else delimited([header] + rows, ",").encode("utf-8", "surrogatepass")
    in_temp("log.csv", payload)


@SETTINGS
@given(columns=st.dictionaries(st.sampled_from(NAMES), st.sampled_from(["int", "float", "str", "bool", "date", "null",
                                                                        "mixed", "bytes"]), max_size=5),
       n=st.integers(0, 8), seed=st.integers(0, 2**16), garbage=st.one_of(st.none(), st.binary(max_size=64)))
def test_parquet(columns, n, seed, garbage):
    if garbage is not None:
        in_temp("log.parquet", garbage)
        return
    rng = np.random.default_rng(seed)
    make = {
        "int": lambda: rng.integers(-10**12, 10**12, n),
        "float": lambda: rng.choice([np.nan, np.inf, -1.0, 0.5, 1e300, 3.0], n),
        "str": lambda: rng.choice(NASTY, n).astype(object),
        "bool": lambda: rng.integers(0, 2, n).astype(bool),
        "date": lambda: pd.to_datetime(rng.integers(0, 2 * 10**9, n), unit="s"),
        "null": lambda: pd.Series([None] * n, dtype=object),
        "mixed": lambda: pd.Series([["1", 2, 3.5, None][i % 4] for i in range(n)], dtype=object).astype(str),
        "bytes": lambda: pd.Series([bytes([i % 256]) * 3 for i in range(n)], dtype=object),
    }
    frame = pd.DataFrame({name: make[kind]() for name, kind in columns.items()}, index=range(n))
    buf = io.BytesIO()
    frame.to_parquet(buf)
    in_temp("log.parquet", buf.getvalue(), data_lines=n)


@SETTINGS
@given(rows=st.lists(st.lists(cell, min_size=0, max_size=6), max_size=12),
       garbage=st.one_of(st.none(), st.binary(max_size=64)))
def test_ml100k_u_data(rows, garbage):
    payload = garbage if garbage is not None else delimited(rows, "\t").encode("utf-8", "surrogatepass")
    in_temp("u.data", payload)


@SETTINGS
@given(rows=st.lists(st.lists(cell, min_size=0, max_size=6), max_size=12),
       garbage=st.one_of(st.none(), st.binary(max_size=64)))
def test_ml1m_ratings_dat(rows, garbage):
    payload = garbage if garbage is not None else delimited(rows, "::").encode("latin-1", "replace")
    in_temp("ratings.dat", payload)


def test_valid_rows_survive_next_to_bad_ones(tmp_path):
    """The property is not vacuous: good rows in a messy file are kept, bad ones counted."""
    p = tmp_path / "log.csv"
    p.write_text("user_id,item_id,timestamp,rating\n1,10,100,4\n1,nan,101,5\n2,11,not-a-time,3\n"
                 "2,12,102,inf\n3,13,103,2\n")
    log = load_interactions(p)
    assert log.user.tolist() == ["1", "3"] and log.item.tolist() == ["10", "13"]
    assert log.dropped == {"missing-id": 1, "bad-timestamp": 1, "bad-rating": 1}
