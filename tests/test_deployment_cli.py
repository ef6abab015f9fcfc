"""fedrec-server certs / catalogue and fedrec-client keys / data check: files, permissions, clear errors."""

from __future__ import annotations

import os
import re
import socket
import ssl
import stat
import threading

import pandas as pd
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.cli import main as client_main
from common.data import generate_synthetic
from common.data.catalogue import load_catalogue
from common.errors import DataError
from server.cli import main as server_main


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _tls_handshake(certs, server_name: str) -> None:
    """A real TLS handshake: a server with server.crt/key, a client trusting only ca.crt."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs / "server.crt", certs / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_name):
                pass
    finally:
        t.join(timeout=10)
        listener.close()


def test_certs_are_valid_for_the_given_hosts_only(tmp_path, capsys):
    certs = tmp_path / "certs"
    assert server_main(["certs", "--out", str(certs), "--host", "localhost", "--host", "127.0.0.1"]) == 0
    # Private keys owner-only, certificates readable
    assert _mode(certs / "ca.key") == 0o600 and _mode(certs / "server.key") == 0o600
    assert _mode(certs / "server.crt") == 0o644
    cert = x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # TLS as the SuperNodes will check it: the names work, another name does not
    _tls_handshake(certs, "localhost")
    _tls_handshake(certs, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(certs, "superlink.example.org")


def test_certs_refuse_to_overwrite_unless_forced(tmp_path, capsys):
    out = str(tmp_path / "certs")
    assert server_main(["certs", "--out", out, "--host", "localhost"]) == 0
    before = (tmp_path / "certs" / "ca.key").read_bytes()
    assert server_main(["certs", "--out", out, "--host", "localhost"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--force" in err[0] and "old credentials" in err[0]
    assert (tmp_path / "certs" / "ca.key").read_bytes() == before
    assert server_main(["certs", "--out", out, "--host", "localhost", "--force"]) == 0
    assert (tmp_path / "certs" / "ca.key").read_bytes() != before


@pytest.mark.parametrize("args, says", [
    (["--host", ""], "neither an IP address nor a DNS name"),
    (["--host", "bad host name!!"], "neither an IP address nor a DNS name"),
    (["--host", "localhost", "--days", "99999999"], "between 1 and 36500"),
    # a coordinator review: a mistyped IP became the DNS name "10.0.0.256", which no partner's TLS check accepts
    (["--host", "10.0.0.256"], "'10.0.0.256' is not an IP address (four numbers 0-255, or IPv6) nor a DNS name"),
    (["--host", "ünïcode.example"], "in its ASCII (punycode) form: xn--ncode-cta3g.example"),
])
def test_impossible_certificate_settings_are_one_line_and_write_nothing(tmp_path, capsys, args, says):
    assert server_main(["certs", "--out", str(tmp_path / "certs"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]
    assert not (tmp_path / "certs").exists()


def test_certs_on_a_full_disk_leave_no_half_set_behind(tmp_path, capsys, monkeypatch):
    # a coordinator review: a full disk left ca.crt and ca.key, and the rerun called them existing credentials
    import errno

    import common.files as files

    staged = files._staged
    calls = []

    def third_fails(target, data, mode):  # noqa: ANN001, ANN202
        calls.append(target)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return staged(target, data, mode)

    monkeypatch.setattr(files, "_staged", third_fails)
    out = tmp_path / "certs"
    assert server_main(["certs", "--out", str(out), "--host", "localhost"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert list(out.iterdir()) == []  # neither the first two files nor their temporary copies
    monkeypatch.setattr(files, "_staged", staged)
    assert server_main(["certs", "--out", str(out), "--host", "localhost"]) == 0  # no --force needed
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "ca.key", "server.crt", "server.key"]


def test_node_keys_are_what_flower_expects(tmp_path, capsys):
    from flwr.cli.supernode.register import try_load_public_key

    assert client_main(["keys", "--out", str(tmp_path), "--name", "partner-1"]) == 0
    private, public = tmp_path / "partner-1", tmp_path / "partner-1.pub"
    assert _mode(private) == 0o600
    # What flower-supernode --auth-supernode-private-key loads, and what `flwr supernode register` loads
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    registered = try_load_public_key(public)
    pub = serialization.load_pem_public_key(registered)
    assert pub.public_numbers() == key.public_key().public_numbers()
    # Refuse to overwrite; a bad name is one line
    assert client_main(["keys", "--out", str(tmp_path), "--name", "partner-1"]) == 2
    assert client_main(["keys", "--out", str(tmp_path), "--name", "../escape"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "already exists" in err[0] and "--name" in err[1]


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_an_output_path_that_is_a_folder_is_one_line_saying_so(tmp_path, capsys, force):
    # Was: "already exists; pass --force to overwrite it" (then, with --force, "cannot write or
    # read '.adir.tmp': Is a directory", naming an internal temporary file)
    folder = tmp_path / "adir"
    folder.mkdir()
    assert server_main(["catalogue", "--out", str(folder), "--run-config", "synthetic-users=30 synthetic-items=10",
                        *force]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {folder} is a directory; give a file path"]
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("command", ["certs", "keys"])
def test_an_output_folder_that_is_a_file_is_one_line_saying_so(tmp_path, capsys, command):
    # mkdir on a path that is a file raised FileExistsError: a 20-line traceback; then "cannot write or
    # read '<file>/ca.key': File exists" (or "Not a directory"), which did not say --out must be a folder
    afile = tmp_path / "afile"
    afile.write_text("x")
    main, extra = (server_main, ["--host", "localhost"]) if command == "certs" else (client_main, ["--name", "p1"])
    for out in (afile, afile / "sub"):
        assert main([command, "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --out {out}") and "--out must be a folder" in err[0], err
    assert afile.read_text() == "x"


@pytest.fixture()
def partner_log(tmp_path):
    log = generate_synthetic(num_users=60, num_items=30, seed=5)
    frame = pd.DataFrame({"user_id": log.user, "item_id": log.item, "timestamp": log.timestamp})
    path = tmp_path / "log.csv"
    frame.to_csv(path, index=False)
    return path, frame


def test_catalogue_export_and_data_check(tmp_path, partner_log, capsys, monkeypatch):
    path, frame = partner_log
    cat = tmp_path / "catalogue.txt"
    assert server_main(["catalogue", "--out", str(cat), "--run-config", "synthetic-users=60 synthetic-items=30 seed=5"]) == 0
    items = load_catalogue(cat)
    assert sorted(items.tolist(), key=int) == sorted(set(frame["item_id"].astype(str)), key=int)
    # the run-config hint names the file absolutely: flwr run does not ship it, each machine resolves it
    monkeypatch.chdir(tmp_path)
    assert server_main(["catalogue", "--out", "rel.txt", "--run-config", "synthetic-users=60 synthetic-items=30 seed=5"]) == 0
    assert f'catalogue="{tmp_path / "rel.txt"}"' in capsys.readouterr().out
    assert server_main(["catalogue", "--out", str(cat), "--run-config", "synthetic-users=60 synthetic-items=30 seed=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists; pass --force" in err and "catalogue the global model was built on" in err
    assert "credentials" not in err
    # A catalogue missing a third of the items: their interactions are dropped and counted
    kept = items[: 2 * len(items) // 3]
    (tmp_path / "partial.txt").write_text("\n".join(kept) + "\n")
    capsys.readouterr()
    assert client_main(["data", "check", "--data-path", str(path), "--catalogue", str(tmp_path / "partial.txt")]) == 0
    out, err = capsys.readouterr()
    unknown = int((~frame["item_id"].astype(str).isin(set(kept))).sum())
    assert f"{unknown} unknown-item" in out
    users = frame[frame["item_id"].astype(str).isin(set(kept))].groupby("user_id").size()
    assert f"users kept: {int((users >= 3).sum())} " in out
    # the partial catalogue leaves some users short: a count of users among counts of rows says so (a partner journey)
    assert int((users < 3).sum()) > 0 and f"{int((users < 3).sum())} short-user (users, not rows)" in out
    assert "ok: this log can join a run (see the warning above)" in out
    # ... and more than a fifth of the rows outside the catalogue is said to be a likely mistake
    assert unknown > 0.2 * len(frame)
    assert f"warning: {100 * unknown / len(frame):.0f}% of the rows ({unknown}) are items outside the catalogue" in err
    # the whole catalogue: no warning
    assert client_main(["data", "check", "--data-path", str(path), "--catalogue", str(cat)]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.rstrip().endswith("ok: this log can join a run")
    # a file that is not a catalogue (the log itself): the error blames the catalogue, not the log's users
    assert client_main(["data", "check", "--data-path", str(path), "--catalogue", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none of its" in err[0] and "published catalogue" in err[0]


def test_data_check_errors_are_one_line(tmp_path, partner_log, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("user,when\n1,2\n")
    assert client_main(["data", "check", "--data-path", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing column" in err[0] and "item_id" in err[0]
    dup = tmp_path / "dup.txt"
    dup.write_text("1\n2\n1\n")
    assert client_main(["data", "check", "--data-path", str(partner_log[0]), "--catalogue", str(tmp_path / "none.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert client_main(["data", "check", "--data-path", str(partner_log[0]), "--catalogue", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a directory; give the catalogue file itself" in err[0]
    with pytest.raises(DataError, match="more than once"):
        load_catalogue(dup)
    bom = tmp_path / "bom.txt"  # saved by Windows Notepad: the BOM is not part of the first id
    bom.write_bytes("\ufeff1\r\n2\r\n".encode())
    assert load_catalogue(bom).tolist() == ["1", "2"]



def test_data_check_counts_the_users_training_counts(tmp_path, partner_log, capsys):
    # A user with 3 events has one training item: no example. The check said "ok" for a log of such users,
    # and every round that sampled the partner then failed with "no users to train on".
    from common.data.loaders import load_interactions
    from common.data.sequences import build_sequences
    from common.training import user_count_for_training

    three = tmp_path / "three.csv"
    three.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{(u + 7 * t) % 40},{1000 * u + t}\n"
                                                             for u in range(60) for t in range(3)))
    assert client_main(["data", "check", "--data-path", str(three)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no user has a training example")
    # The count it reports is the DP population the partner's training uses
    path = partner_log[0]
    assert client_main(["data", "check", "--data-path", str(path)]) == 0
    dp_users = user_count_for_training(build_sequences(load_interactions(path)))
    out, err = capsys.readouterr()
    assert f"train {dp_users} users with a training example" in out
    # without --catalogue its "ok" was read as ready to join, unchecked against the federation's items (a review)
    assert "no --catalogue, so the log's own items were taken as the catalogue" in err
    assert out.rstrip().endswith("ok: this log can join a run (see the warning above)")
    assert dp_users < build_sequences(load_interactions(path)).num_users  # the partner log has 3-event users too


def test_item_text_refuses_to_overwrite_a_published_file_before_encoding(tmp_path, capsys):
    out = tmp_path / "item_text.npz"
    out.write_bytes(b"published")
    assert server_main(["item-text", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists; pass --force" in err[0] and "features the model was trained on" in err[0]
    assert out.read_bytes() == b"published"
    # on data without titles (the default synthetic set) it says where titles must be, not "run item-text"
    assert server_main(["item-text", "--out", str(tmp_path / "new.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no item titles beside it" in err[0] and "fedrec-server item-text" not in err[0]


def test_data_check_checks_the_supernodes_node_config_before_it_starts(tmp_path, partner_log, capsys):
    # A partner had no way to check its --node-config before the first round: an unquoted value was a Flower
    # traceback, a bad max-epsilon or a log given as ledger-path failed only then (a bad-input review)
    from common.data.catalogue import catalogue_fingerprint

    path, _ = partner_log
    cat = tmp_path / "catalogue.txt"
    assert server_main(["catalogue", "--out", str(cat), "--run-config", "synthetic-users=60 synthetic-items=30 seed=5"]) == 0
    pin = catalogue_fingerprint(load_catalogue(cat))
    ledger = tmp_path / "ledger.sqlite"
    capsys.readouterr()
    good = f'data-path="{path}" ledger-path="{ledger}" max-epsilon=4.0 catalogue-fingerprint="{pin.upper()}"'
    assert client_main(["data", "check", "--catalogue", str(cat), "--node-config", good]) == 0
    assert capsys.readouterr().out.rstrip().endswith("ok: this log can join a run")
    assert not ledger.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["catalogue.txt", "log.csv"]
    for node, said in (
        ("max-epsilon=abc", "is not key=value pairs Flower can read; put text values in double quotes"),
        (f'data-path="{path}" max-epsilon=4.0', "max-epsilon = 4 caps this partner's privacy ledger, so it needs"),
        (f'data-path="{path}" max-epsilon=-1', "max-epsilon"),
        (f'data-path="{path}" max-epsilion=4.0', "did you mean max-epsilon"),
        (f'data-path="{path}" ledger-path="{path}"', r"is not a privacy ledger \(not an SQLite database\)"),
        (f'data-path="{path}" ledger-path="{tmp_path / "no" / "l.sqlite"}"', "the folder .*no does not exist"),
        (f'data-path="{path}" catalogue-fingerprint="{"0" * 16}"', f"has fingerprint {pin}; this SuperNode would refuse"),
        ("max-delta=1e-6", "give --data-path, or a --node-config with data-path"),
    ):
        assert client_main(["data", "check", "--catalogue", str(cat), "--node-config", node]) == 2, node
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(said, err[0]), (node, err)
    assert client_main(["data", "check", "--data-path", str(tmp_path / "other.csv"), "--node-config",
                        f'data-path="{path}"']) == 2
    assert "is not the node config's data-path" in capsys.readouterr().err
    assert path.read_text().startswith("user_id,item_id,timestamp")  # the log named as ledger was left as it was
