"""A real deployment on one machine: TLS SuperLink with node authentication, SuperNodes, ``flwr run``.

    python -m simulations.deployment --partners 3 --run-config "num-server-rounds=2"

starts exactly what the deployment guide (docs/deployment.md) tells the coordinator and the partners to
run (``fedrec-server certs``, ``fedrec-client keys``, ``flower-superlink --ssl-* --enable-supernode-auth
--database``, ``flwr supernode register``, ``flower-supernode --root-certificates
--auth-supernode-private-key --node-config``, ``flwr run . <connection>``), each partner on its own
synthetic log, on 127.0.0.1 with free ports, in a temporary folder, and stops every process it
started. The end-to-end tests and the SecAgg+ benchmark use the same class.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from common.privacy import REPRODUCIBLE_NOISE_ENV
from simulations.flower_env import PROJECT_ROOT, set_flower_env
from common.cli_errors import user_errors_exit

BIN = Path(sys.executable).parent  # flower-superlink, flwr, ... of this environment
CONNECTION = "fedrec-local"


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # /proc/PID/stat: "pid (comm) state ppid ..."; comm may contain spaces, so split after ')'
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Flower starts SuperExec and app processes in new sessions)."""
    children, tree, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


@dataclass
class Process:
    """One started command: its Popen, its log file, its name."""

    name: str
    popen: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, text: str, timeout: float, *, count: int = 1) -> bool:
        """Wait until ``text`` appears ``count`` times in the log (or the process exits)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.output().count(text) >= count:
                return True
            if self.popen.poll() is not None:
                return self.output().count(text) >= count
            time.sleep(0.2)
        return False

    def stop(self, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        """Signal the whole process tree, wait up to ``grace`` s, then SIGKILL what is left."""
        tree = process_tree(self.popen.pid)
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in tree):
            self.popen.poll()
            time.sleep(0.1)
        for pid in tree + process_tree(self.popen.pid):
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class LocalFederation:
    """Credentials, one SuperLink and any number of SuperNodes under ``root``; ``close()`` stops all."""

    root: Path
    port: int = 0
    processes: list[Process] = field(default_factory=list)
    superlink: Process | None = None
    node_ids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from server.credentials import create_server_credentials

        self.root.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.root / "flwr-home"
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env.pop("FLWR_HOME", None)
        # Real SuperNodes draw their DP noise from OS entropy, even when a simulation tool imported in
        # this process asked for reproducible noise (simulations/flower_env.py: set_simulation_env)
        self.env.pop(REPRODUCIBLE_NOISE_ENV, None)
        self.env.update(set_flower_env())
        self.env["FLWR_HOME"] = str(self.flwr_home)
        self.env["PYTHONUNBUFFERED"] = "1"
        # SuperExec looks for a ClientApp/ServerApp to start once a second by default; every message
        # waits for that poll, so a shorter one shortens each round trip (Flower's documented knob)
        self.env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
        self.certs = create_server_credentials(self.root / "certs", hosts=["localhost", "127.0.0.1"])
        self.port = self.port or free_port()
        self.database = self.root / "superlink.db"
        self._write_connection()

    # -- coordinator ----------------------------------------------------------------------------
    def _write_connection(self) -> None:
        """The SuperLink connection ``flwr run``/``flwr supernode`` read from $FLWR_HOME/config.toml."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs.ca_cert}"\n'
        )

    def start_superlink(self, timeout: float = 60.0) -> Process:
        """flower-superlink with TLS, SuperNode authentication and a persistent database."""
        cmd = [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(self.certs.ca_cert),
               "--ssl-certfile", str(self.certs.server_cert), "--ssl-keyfile", str(self.certs.server_key),
               "--enable-supernode-auth", "--database", str(self.database), "--port", str(self.port)]
        n = sum(1 for p in self.processes if p.name.startswith("superlink"))
        self.superlink = self._start(f"superlink-{n}", cmd)
        if not self.superlink.wait_for("Application startup complete", timeout):
            raise RuntimeError(f"SuperLink did not start:\n{self.superlink.output()[-3000:]}")
        return self.superlink

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """A ``flwr`` CLI command against this SuperLink, from the project folder."""
        return subprocess.run([str(BIN / "flwr"), *args], cwd=PROJECT_ROOT, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def register(self, public_key: Path) -> int:
        """``flwr supernode register KEY.pub``; returns the node id."""
        res = self.flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json", timeout=60)
        try:
            return int(json.loads(res.stdout[res.stdout.index("{"):])["node-id"])
        except (ValueError, KeyError) as exc:
            raise RuntimeError(f"registration failed: {res.stdout}\n{res.stderr}") from exc

    def registered_nodes(self) -> set[int]:
        """Node ids the SuperLink knows (``flwr supernode ls``)."""
        res = self.flwr("supernode", "ls", CONNECTION, "--format", "json", timeout=60)
        data = json.loads(res.stdout[res.stdout.index("{"):])
        return {int(n["node-id"]) for n in data.get("nodes", [])}

    def run(self, run_config: dict[str, object], timeout: float) -> subprocess.CompletedProcess:
        """``flwr run . <connection> --run-config ... --stream``: returns when the run ends."""
        parts = [f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
                 for k, v in run_config.items()]
        return self.flwr("run", ".", CONNECTION, "--run-config", " ".join(parts), "--stream", timeout=timeout)

    # -- partners -------------------------------------------------------------------------------
    def partner_keys(self, name: str) -> tuple[Path, Path]:
        from client.keys import create_node_keys

        keys = create_node_keys(self.root / "keys", name=name)
        return keys.private_key, keys.public_key

    def start_supernode(self, name: str, private_key: Path, data_path: Path, *, max_retries: int = 10,
                        max_wait_time: float = 120.0, **node_config: str) -> Process:
        """flower-supernode trusting our CA, authenticating with ``private_key``, on its own log.

        ``max_retries``/``max_wait_time``: how long it keeps trying to reach the SuperLink (and to
        be activated: register the node's key first). Generous by default, so a busy or restarting
        SuperLink does not make a partner give up; a test expecting refusal passes small ones.
        """
        config = " ".join(f"{k}={json.dumps(str(v))}" for k, v in {"data-path": data_path, **node_config}.items())
        cmd = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
               "--root-certificates", str(self.certs.ca_cert), "--auth-supernode-private-key", str(private_key),
               "--node-config", config, "--port", str(free_port()), "--max-retries", str(max_retries),
               "--max-wait-time", f"{max_wait_time:g}"]
        return self._start(name, cmd)

    def _start(self, name: str, cmd: list[str]) -> Process:
        log = self.root / f"{name}.log"
        with open(log, "wb") as fh:
            popen = subprocess.Popen(cmd, cwd=self.root, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        proc = Process(name, popen, log)
        self.processes.append(proc)
        return proc

    def close(self, grace: float = 10.0) -> None:
        """Stop every process started here, whatever state they are in: SIGTERM to all trees at
        once, up to ``grace`` s for all of them together, then SIGKILL to what is left."""
        live = [proc for proc in self.processes if proc.popen.poll() is None]  # exited ones are reaped: pids reusable
        pids = [pid for proc in live for pid in process_tree(proc.popen.pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            for proc in live:
                proc.popen.poll()
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in live:
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def write_partner_logs(folder: Path, partners: int, *, users: int, items: int, seed: int) -> list[Path]:
    """Split one synthetic log by user into ``partners`` CSV files (user u goes to partner u mod n)."""
    from common.data import generate_synthetic

    log = generate_synthetic(num_users=users, num_items=items, seed=seed)
    frame = pd.DataFrame({"user_id": log.user, "item_id": log.item, "timestamp": log.timestamp})
    owner = frame["user_id"].astype(int) % partners
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in range(partners):
        path = folder / f"partner-{p + 1}.csv"
        frame[owner == p].to_csv(path, index=False)
        paths.append(path)
    return paths


@user_errors_exit
def main(argv: list[str] | None = None) -> int:

    from common.cli_args import parse_run_config, positive_float, positive_int
    from common.config import resolve_config
    from common.data.catalogue import save_catalogue
    from common.errors import ConfigError
    from common.task import catalogue

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partners", type=positive_int, default=3)
    parser.add_argument("--run-config", action="append", default=[], help='e.g. "num-server-rounds=2 secure-aggregation=true"')
    parser.add_argument("--timeout", type=positive_float, default=1800.0, help="seconds before the run is abandoned")
    args = parser.parse_args(argv)
    overrides = parse_run_config(args.run_config)
    cfg = resolve_config(None, overrides)
    if cfg["dataset"] != "synthetic":  # the partners' files are split from one synthetic log (write_partner_logs)
        raise ConfigError(f"dataset = {cfg['dataset']!r}: this demonstration gives its partners synthetic logs; "
                          "for real data start the SuperLink and SuperNodes yourself (docs/deployment.md)")
    root = Path(tempfile.mkdtemp(prefix="fedrec-deploy-"))
    # the demonstration's ledgers live in this folder: so do their markers' copies (client/ledger_file.py), which
    # the SuperNodes started below inherit, rather than the user's ~/.local/state
    os.environ.setdefault("FEDREC_STATE_DIR", str(root / "state"))
    fed = LocalFederation(root)
    try:
        items = catalogue({**cfg, "catalogue": ""})
        cat = save_catalogue(items, root / "catalogue.txt")
        logs = write_partner_logs(root / "data", args.partners, users=int(cfg["synthetic-users"]),
                                  items=int(cfg["synthetic-items"]), seed=int(cfg["seed"]))
        fed.start_superlink()
        for i, log in enumerate(logs):
            private, public = fed.partner_keys(f"partner-{i + 1}")
            fed.register(public)
            # each partner keeps its own privacy ledger, as the deployment guide's partner command sets it
            ledger = root / "ledgers" / f"partner-{i + 1}.sqlite"
            fed.start_supernode(f"partner-{i + 1}", private, log, **{"ledger-path": ledger})
        run_config = {**overrides, "catalogue": str(cat), "run-dir": str(root / "runs"), "run-name": "deployment"}
        t0 = time.perf_counter()
        try:
            res = fed.run(run_config, timeout=args.timeout)
        except subprocess.TimeoutExpired as exc:  # the finally below stops every process
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            print(out[-4000:])
            print(f"error: the run did not finish within --timeout {args.timeout:g} s; abandoned (files under {root})",
                  file=sys.stderr)
            return 2
        print(res.stdout[-4000:], res.stderr[-2000:], sep="\n")
        print(f"run took {time.perf_counter() - t0:.1f} s; files under {root} "
              f"(partners' ledgers in {root / 'ledgers'})")
        return 0 if (root / "runs" / "deployment" / "metrics.jsonl").exists() else 1
    finally:
        fed.close()


if __name__ == "__main__":
    sys.exit(main())
