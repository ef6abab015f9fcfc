"""Latency of ``GET /users/{id}/recommendations?k=10`` on ML-100K-sized data, over real HTTP.

    nice -n 5 python -m simulations.bench.serve_latency --data ../shared/data/ml-100k --requests 1000

Starts ``fedrec-client serve`` (uvicorn on 127.0.0.1, a separate process) over an event
store holding the log and an ML-100K-sized SASRec (default config: 64 dims, 2 blocks,
max-seq-len 50; weights are random unless ``--model`` is given: the cost is the same),
then sends requests one after another for random known users from one keep-alive httpx
client and prints p50/p90/p99/max in milliseconds, with and without explanations.
Without ``--data`` a synthetic log of ML-100K's size (943 users, 1682 items, ~106 events
per user) is used.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(folder: Path, data: str | None, model: str | None) -> tuple[Path, Path, list[str]]:
    """(model file, event store, user ids): the log imported into a fresh store, a model over its catalogue."""
    from flwr.app import ArrayRecord

    from common.config import resolve_config
    from common.data import build_sequences, generate_synthetic, load_interactions
    from common.data.event_store import EventStore
    from common.task import new_model
    from server.run_report import RunRecorder

    if data:
        log = load_interactions(data)
    else:
        log = generate_synthetic(num_users=943, num_items=1682, mean_length=106, seed=0)
    store_path = folder / "events.sqlite"
    with EventStore(store_path, create=True) as store:
        store.add_many(zip(log.user.tolist(), log.item.tolist(), log.timestamp.tolist(), [None] * len(log)))
    seqs = build_sequences(log)
    if model:
        model_path = Path(model)
    else:
        cfg = resolve_config(None, {})
        run = folder / "run"
        run.mkdir()
        RunRecorder(run, cfg, seqs.catalogue).save_model(ArrayRecord(new_model(cfg, seqs.num_items).state_dict()))
        model_path = run / "model.pt"
    return model_path, store_path, seqs.user_ids.tolist()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def measure(client: httpx.Client, users: list[str], n: int, explain: bool, rng: np.random.Generator) -> np.ndarray:
    """Milliseconds per request, one after another (client-side: request sent to body parsed)."""
    out = np.empty(n)
    for i in range(n):
        user = users[int(rng.integers(len(users)))]
        t0 = time.perf_counter()
        r = client.get(f"/users/{user}/recommendations", params={"k": 10, "explain": str(explain).lower()})
        r.json()
        out[i] = (time.perf_counter() - t0) * 1000
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="ML-100K folder (default: synthetic log of the same size)")
    parser.add_argument("--model", default=None, help="a model.pt over the same catalogue (default: random weights)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_path, store_path, users = prepare(Path(tmp), args.data, args.model)
        port = _free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        server = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--model", str(model_path),
                                   "--store", str(store_path), "--port", str(port)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        if client.get("/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"server did not start: {server.stderr.read().decode()[-2000:]}")
                    time.sleep(0.2)
                print(f"ML-100K-sized: {len(users)} users, store {store_path.stat().st_size / 1e6:.1f} MB, "
                      f"{os.cpu_count()} CPU cores, server pid {server.pid}")
                print(f"load average before: {os.getloadavg()[0]:.1f} (other processes share these cores)")
                # server CPU ms/request: what a request costs the server, whatever else runs on the machine
                print(f"{'explain':>8} {'n':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} "
                      f"{'server CPU ms/req':>18}")
                for explain in (False, True):
                    measure(client, users, args.warmup, explain, rng)
                    cpu0 = cpu_seconds(server.pid)
                    ms = measure(client, users, args.requests, explain, rng)
                    cpu = (cpu_seconds(server.pid) - cpu0) * 1000 / len(ms)
                    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
                    print(f"{str(explain).lower():>8} {len(ms):>6} {p50:>8.2f} {p90:>8.2f} {p99:>8.2f} "
                          f"{ms.max():>8.2f} {cpu:>18.2f}")
                print(f"load average after: {os.getloadavg()[0]:.1f}")
        finally:
            server.terminate()  # uvicorn shuts down cleanly on SIGTERM
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
