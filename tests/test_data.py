"""Data layer: parsing of every supported format, bad rows, catalogue, leave-one-out split, partitions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.data import build_sequences, generate_synthetic, load_interactions, load_item_titles
from common.data.partition import iid_partition, load_partition
from common.errors import DataError


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_csv_with_aliases_and_extra_columns(tmp_path):
    p = write(tmp_path, "log.csv", "userId,movieId,rating,timestamp,device\n1,10,4,100,tv\n1,11,5,101,tv\n2,10,3,50,phone\n")
    log = load_interactions(p)
    assert log.user.tolist() == ["1", "1", "2"]
    assert log.item.tolist() == ["10", "11", "10"]
    assert log.timestamp.tolist() == [100, 101, 50]
    assert log.rating.tolist() == [4.0, 5.0, 3.0]


def test_a_column_named_twice_is_one_line_not_a_silent_drop(tmp_path):
    # A review: pandas renamed the second item_id to item_id.1 and it was dropped unseen ("ok: this log can join")
    for header in ("user_id,item_id,timestamp,item_id", "userId,user_id,item_id,timestamp"):
        p = write(tmp_path, "log.csv", f"{header}\n1,2,1,9\n1,3,2,9\n")
        with pytest.raises(DataError, match=r"log.csv: more than one column means (item_id|user_id) .*; keep one"):
            load_interactions(p)
    p = write(tmp_path, "log.csv", "user_id,item_id,timestamp,note,note\n1,2,1,a,b\n")  # extra columns may repeat
    assert load_interactions(p).item.tolist() == ["2"]


def test_parquet(tmp_path):
    p = tmp_path / "log.parquet"
    pd.DataFrame({"user_id": ["a", "a", "b"], "item_id": ["x", "y", "x"], "timestamp": [3, 1, 2]}).to_parquet(p)
    log = load_interactions(p)
    assert sorted(log.item.tolist()) == ["x", "x", "y"]
    assert log.rating is None


def test_missing_column_is_one_clear_line(tmp_path):
    p = write(tmp_path, "log.csv", "user_id,item_id\n1,2\n")
    with pytest.raises(DataError, match=r"log.csv: missing column\(s\) timestamp") as exc:
        load_interactions(p)
    assert "\n" not in str(exc.value)
    tsv = write(tmp_path, "log.tsv", "user_id,item_id,timestamp\n1,2,3\n")  # commas in a .tsv
    with pytest.raises(DataError, match="the header is comma-separated: name the file .csv"):
        load_interactions(tsv)


def test_bad_timestamps_are_dropped_and_counted(tmp_path):
    p = write(tmp_path, "log.csv", "user_id,item_id,timestamp\n1,2,100\n1,3,yesterday-ish\n1,4,2020-01-02\n"
              "1,5,1e303\n")  # no int64 time: it became INT64_MIN (every such row tied)
    log = load_interactions(p)
    assert log.dropped == {"bad-timestamp": 2}
    assert log.timestamp.tolist() == [100, 1577923200]


def test_duplicate_events_are_dropped_and_counted(tmp_path, caplog):
    # A bad-input review: a log exported twice was kept whole, each user's test item became a copy of its
    # validation item, and EASE's HR@10 went from 0.07 to 0.60 without a word
    rows = "1,10,4,100\n1,11,5,101\n2,10,3,50\n"
    p = write(tmp_path, "log.csv", "user_id,item_id,rating,timestamp\n" + rows + rows + "1,12,x,102\n1,12,2,102\n")
    log = load_interactions(p)
    assert log.dropped == {"duplicate": 3, "bad-rating": 1}
    assert list(zip(log.user.tolist(), log.item.tolist(), log.timestamp.tolist(), log.rating.tolist())) == [
        ("1", "10", 100, 4.0), ("1", "11", 101, 5.0), ("2", "10", 50, 3.0), ("1", "12", 102, 2.0)]
    assert "3 rows (duplicate)" in caplog.text
    # The same item again at another time is a real event (a re-watch): kept
    again = load_interactions(write(tmp_path, "again.csv", "user_id,item_id,timestamp\n1,10,100\n1,10,200\n"))
    assert again.timestamp.tolist() == [100, 200] and again.dropped == {}


def test_all_rows_bad_is_an_error(tmp_path):
    p = write(tmp_path, "log.csv", "user_id,item_id,timestamp\n1,2,x\n1,3,y\n")
    with pytest.raises(DataError, match="no valid rows"):
        load_interactions(p)


def test_nonexistent_path_and_empty_file(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDREC_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="no such file") as missing:
        load_interactions(tmp_path / "nope.csv")
    # an absolute path is never looked up under $FEDREC_DATA_DIR: no hint to set it (a partner review)
    assert str(missing.value) == f"{tmp_path / 'nope.csv'}: no such file or directory"
    with pytest.raises(DataError, match=r"nope.csv: no such file or directory \(set \$FEDREC_DATA_DIR"):
        load_interactions("nope.csv")
    with pytest.raises(DataError, match="empty"):
        load_interactions(write(tmp_path, "e.csv", ""))


def test_a_relative_path_is_found_under_the_data_folder_by_its_trailing_parts(tmp_path, monkeypatch):
    # a docs review: the shipped sweep configs say "../shared/data/ml-100k", and setting $FEDREC_DATA_DIR (as
    # the error advised) to where the data sets are kept did not make them find it
    from common.data.loaders import resolve_data_path

    (tmp_path / "sets" / "ml-100k").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDREC_DATA_DIR", str(tmp_path / "sets"))
    assert resolve_data_path("../shared/data/ml-100k") == tmp_path / "sets" / "ml-100k"
    assert resolve_data_path("ml-100k") == tmp_path / "sets" / "ml-100k"
    with pytest.raises(DataError, match=r"also looked in \$FEDREC_DATA_DIR"):
        resolve_data_path("../shared/data/ml-1m")


def test_unknown_items_and_short_users_are_counted(tmp_path):
    p = write(tmp_path, "log.csv", "user_id,item_id,timestamp\n" + "".join(
        f"{u},{i},{t}\n" for u, i, t in [(1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 99, 4), (2, 1, 1), (2, 2, 2)]))
    data = build_sequences(load_interactions(p), np.array(["1", "2", "3"]))
    assert data.dropped["unknown-item"] == 1
    assert data.dropped["short-user"] == 1  # user 2 has only two interactions
    assert data.user_ids.tolist() == ["1"]


def test_no_usable_user_is_an_error(tmp_path):
    p = write(tmp_path, "log.csv", "user_id,item_id,timestamp\n1,1,1\n1,2,2\n")
    with pytest.raises(DataError, match="no user has at least 3"):
        build_sequences(load_interactions(p))


def test_time_order_and_stable_tie_break(tmp_path):
    # Items 30 and 20 share the last timestamp: file order decides, so 20 (later in file) is the test item.
    p = write(tmp_path, "log.csv", "user_id,item_id,timestamp\n1,10,5\n1,30,9\n1,40,1\n1,20,9\n")
    data = build_sequences(load_interactions(p))
    cat = data.catalogue.tolist()
    assert cat == ["10", "20", "30", "40"]  # numeric order
    seq = [cat[i - 1] for i in data.sequences[0]]
    assert seq == ["40", "10", "30", "20"]
    hist, target = data.eval_cases("test")
    assert cat[target[0] - 1] == "20" and [cat[i - 1] for i in hist[0]] == ["40", "10", "30"]
    hist, target = data.eval_cases("valid")
    assert cat[target[0] - 1] == "30" and [cat[i - 1] for i in hist[0]] == ["40", "10"]
    assert [cat[i - 1] for i in data.train_sequences()[0]] == ["40", "10"]


def test_movielens_100k(ml100k_dir):
    log = load_interactions(ml100k_dir)
    assert len(log) == 100_000
    data = build_sequences(log)
    assert (data.num_users, data.num_items) == (943, 1682)
    titles = load_item_titles(ml100k_dir)
    assert titles["1"][0] == "Toy Story (1995)" and "Animation" in titles["1"][1]
    assert any("Mis" in t for t, _ in titles.values())  # latin-1 decoded


def test_movielens_1m_partial(ml1m_dir):
    log = load_interactions(ml1m_dir / "ratings.users_1-2999.dat")
    assert len(log) == 487_650
    assert len(np.unique(log.user)) == 2999
    assert load_item_titles(ml1m_dir)["1"][0] == "Toy Story (1995)"


def test_synthetic_is_deterministic_and_learnable_shape():
    a = generate_synthetic(num_users=50, num_items=30, seed=1)
    b = generate_synthetic(num_users=50, num_items=30, seed=1)
    c = generate_synthetic(num_users=50, num_items=30, seed=2)
    assert np.array_equal(a.item, b.item) and not np.array_equal(a.item, c.item)
    assert all(np.all(np.diff(t) >= 0) for t in build_sequences(a).timestamps)
    # Long tail: the most popular item is far more frequent than the median one.
    data = build_sequences(generate_synthetic(num_users=300, num_items=200, seed=1))
    counts = np.bincount(np.concatenate(data.sequences))[1:]
    assert counts.max() > 3 * np.median(counts)


def test_iid_partition_covers_every_user_once():
    parts = iid_partition(103, 5, seed=0)
    allu = np.concatenate(parts)
    assert sorted(allu.tolist()) == list(range(103))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_partition_errors(small_data):
    with pytest.raises(DataError, match="outside"):
        load_partition(small_data, 5, 5)
    with pytest.raises(DataError, match="some would be empty"):
        iid_partition(3, 5)


def test_item_metadata_needs_titles(tmp_path):
    csv = tmp_path / "movies.csv"
    csv.write_text("movieId,title,genres\n1,Alien (1979),Horror|Sci-Fi\n")
    assert load_item_titles(csv) == {"1": ("Alien (1979)", ["Horror", "Sci-Fi"])}
    log = tmp_path / "u.data"  # an interaction log given as metadata by mistake
    log.write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    with pytest.raises(DataError, match="not item metadata; expected u.item, movies.dat or a CSV with a title"):
        load_item_titles(log)


def test_other_movielens_files_are_not_titles(tmp_path):
    # ratings.dat and users.dat split on "::" too: read as movies.dat they gave a user's last item id as a "title"
    movies = tmp_path / "movies.dat"
    movies.write_text("1::Toy Story (1995)::Animation|Comedy\n\n2::Jumanji (1995)::Adventure\n", encoding="latin-1")
    assert load_item_titles(movies)["2"] == ("Jumanji (1995)", ["Adventure"])
    for name, line, fields in (("ratings.dat", "1::1193::5::978300760", 4), ("users.dat", "1::F::1::10::48067", 5)):
        (tmp_path / name).write_text(line + "\n")
        with pytest.raises(DataError, match=f"{name}: not item metadata; line 1 has {fields} '::' fields"):
            load_item_titles(tmp_path / name)
    garbage = tmp_path / "junk" / "u.item"
    garbage.parent.mkdir()
    garbage.write_text("garbage\n")
    with pytest.raises(DataError, match="u.item: not item metadata"):
        load_item_titles(garbage)


def test_simulated_partners_index_the_published_catalogue(tmp_path):
    # The server built (and released) the model over a published catalogue while simulated partners
    # indexed the data set's own: with the same items in another order, model.pt named the wrong items
    from common.config import resolve_config
    from common.data.catalogue import save_catalogue
    from common.task import catalogue, federation_data, partner_data

    base = resolve_config(None, {"synthetic-users": 60, "synthetic-items": 20})
    own = federation_data(base)
    published = save_catalogue(own.catalogue[::-1], tmp_path / "catalogue.txt")
    cfg = {**base, "catalogue": str(published)}
    part = partner_data(cfg, {"partition-id": 0, "num-partitions": 2})
    assert part.catalogue.tolist() == catalogue(cfg).tolist() == own.catalogue[::-1].tolist()
    # the same raw items for every user, through either catalogue
    plain = partner_data(base, {"partition-id": 0, "num-partitions": 2})
    assert [part.catalogue[s - 1].tolist() for s in part.sequences] == [plain.catalogue[s - 1].tolist()
                                                                        for s in plain.sequences]


def test_a_datetime_column_is_read_in_seconds_whatever_its_unit(tmp_path):
    # A partner journey: a Parquet datetime column was read as its epoch in microseconds (8.8e14 "seconds"),
    # so feedback posted later sorted before the whole history; datetime64[ms] likewise in milliseconds
    times = pd.to_datetime(["1997-12-04 15:55:49", "1997-12-04 15:56:49", "1997-12-04 16:00:00"])
    expected = [881250949, 881251009, 881251200]  # by hand: seconds since 1970 (UTC)
    for unit in ("ns", "us", "ms"):
        path = tmp_path / f"log_{unit}.parquet"
        pd.DataFrame({"user_id": ["1", "1", "1"], "item_id": ["a", "b", "c"],
                      "timestamp": times.as_unit(unit)}).to_parquet(path)
        assert load_interactions(path).timestamp.tolist() == expected, unit


def test_a_log_in_milliseconds_is_refused_and_a_far_future_row_is_dropped(tmp_path):
    path = tmp_path / "ms.csv"
    path.write_text("user_id,item_id,timestamp\n1,a,881250949000\n1,b,881251009000\n1,c,881251200000\n")
    with pytest.raises(DataError, match=r"ms.csv: timestamps look like milliseconds since 1970 \(e.g. 881250949000\)"):
        load_interactions(path)
    path.write_text("user_id,item_id,timestamp\n1,a,881250949\n1,b,881251009\n1,c,881251200000\n")
    data = load_interactions(path)
    assert data.timestamp.tolist() == [881250949, 881251009] and data.dropped == {"bad-timestamp": 1}


def test_dates_are_iso_8601_only_and_never_guessed(tmp_path):
    # 12/02/2023 is December or February: pandas' "mixed" format read 12/02 month-first and 13/02 day-first
    path = tmp_path / "dates.csv"
    path.write_text("user_id,item_id,timestamp\n1,a,2023-02-12T10:00:00Z\n1,b,2023-02-12 10:00:30\n"
                    "1,c,2023-02-12T12:00:00+02:00\n1,d,12/02/2023 10:00:00\n1,e,13/02/2023 10:00:00\n")
    data = load_interactions(path)
    assert data.item.tolist() == ["a", "b", "c"]  # c at +02:00 is 10:00 UTC, a's second
    assert data.timestamp.tolist() == [1676196000, 1676196030, 1676196000] and data.dropped == {"bad-timestamp": 2}


def test_common_export_date_forms_are_read_and_an_unknown_one_is_named(tmp_path):
    # A review: ISO 8601 only refused BigQuery's "... UTC", a comma decimal and RFC 2822, with no hint
    path = tmp_path / "export.csv"
    path.write_text("user_id,item_id,timestamp\n1,a,2023-02-12 10:00:00 UTC\n1,b,\"2023-02-12T10:00:01,5\"\n"
                    "1,c,\"Sun, 12 Feb 2023 10:00:02 GMT\"\n1,d,2023/02/12 10:00:03\n")
    assert load_interactions(path).timestamp.tolist() == [1676196000, 1676196001, 1676196002, 1676196003]
    path.write_text("user_id,item_id,timestamp\n1,a,12/02/2023 10:00:00\n1,b,13/02/2023 10:00:00\n")
    with pytest.raises(DataError, match=r"no valid rows \(2 bad-timestamp\); timestamps are Unix seconds, ISO 8601 "
                                        r"dates \(2023-02-12T10:00:00Z\) or a datetime column, not '12/02/2023 10:00:00'"):
        load_interactions(path)


def test_a_compressed_tsv_is_read_with_tabs(tmp_path):
    import gzip

    path = tmp_path / "log.tsv.gz"
    path.write_bytes(gzip.compress(b"user_id\titem_id\ttimestamp\n1\ta\t10\n1\tb\t20\n"))
    assert load_interactions(path).item.tolist() == ["a", "b"]  # it advised naming the file .tsv


def test_a_blank_rating_is_an_unrated_event_kept_and_a_bad_one_dropped(tmp_path):
    # A partner journey: a log mixing views (no rating) and ratings lost every view as "bad-rating"
    path = tmp_path / "mixed.csv"
    path.write_text("user_id,item_id,timestamp,rating\n1,a,10,4\n1,b,20,\n1,c,30, \n1,d,40,abc\n")
    log = load_interactions(path)
    assert log.item.tolist() == ["a", "b", "c"] and log.dropped == {"bad-rating": 1}
    assert log.rating[0] == 4.0 and np.isnan(log.rating[1:]).all()


def test_a_u_data_without_tabs_says_so(tmp_path):
    # A partner journey: a space-separated u.data was "no valid rows (2 missing-id)", naming no cause
    path = tmp_path / "u.data"
    path.write_text("1 10 4 881250949\n2 20 3 881250950\n")
    with pytest.raises(DataError, match=r"u.data: its lines have no tabs; u.data is tab-separated"):
        load_interactions(path)


def test_a_folder_without_a_known_log_name_lists_every_name_it_looks_for(tmp_path):
    # The message named five of the seven names a folder is searched for (not events.csv, nor the partial ML-1M file)
    from common.data.loaders import LOG_FILE_NAMES

    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\n1,2,3\n")
    with pytest.raises(DataError, match="no interaction log found") as caught:
        load_interactions(tmp_path)
    assert all(name in str(caught.value) for name in LOG_FILE_NAMES) and "give the log file itself" in str(caught.value)
