"""Latency of ``GET /users/{id}/recommendations?k=10`` on ML-100K-sized data, over real HTTP.

    nice -n 5 python -m simulations.bench.serve_latency --data ../shared/data/ml-100k --requests 1000

Starts ``fedrec-client serve`` (uvicorn on 127.0.0.1, a separate process; uvloop and
httptools when installed) over an event store holding the log and an ML-100K-sized SASRec
(default config: 64 dims, 2 blocks, max-seq-len 50; weights are random unless ``--model`` is
given: the cost is the same), then sends requests one after another for random known users
from one keep-alive HTTP/1.1 connection (``--client``: Python's ``http.client``, the
lightest, or httpx): ``--warmup`` requests per setting (not measured), then
``--requests`` per setting, alternating with and without explanations (and the "floor": the
same route with ``k=0``, refused with a 422 before any model work) in rounds of ``--chunk``
so that all see the same machine load. Prints p50/p95/p99/max in milliseconds
(client side: request sent to body parsed), the server's CPU time per request, and the
1-minute load average sampled every chunk (the machine may be shared: with more runnable
processes than cores the percentiles include waiting for a core). Writes the numbers to
``--out`` (JSON). Without ``--data`` a synthetic log of ML-100K's size (943 users, 1682
items, ~106 events per user) is used.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

from simulations.bench import write_results
from simulations.deployment import free_port
from common.cli_args import non_negative_int, positive_int
from common.cli_errors import user_errors_exit


def prepare(folder: Path, data: str | None, model: str | None,
            synthetic_users: int = 943) -> tuple[Path, Path, list[str]]:
    """(model file, event store, user ids): the log imported into a fresh store, a model over its catalogue."""
    from flwr.app import ArrayRecord

    from common.config import resolve_config
    from common.data import build_sequences, generate_synthetic, load_interactions
    from common.data.event_store import EventStore
    from common.task import new_model
    from server.run_report import RunRecorder

    if model:  # read now: a bad one was "server did not start", a traceback after the store's import (a review)
        from client.recommend import load_global_model

        load_global_model(model)
    if data:
        log = load_interactions(data)
    else:
        log = generate_synthetic(num_users=synthetic_users, num_items=1682, mean_length=106, seed=0)
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


class Client:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1: ``get(path)`` -> (status, body)."""

    def __init__(self, kind: str, port: int) -> None:
        self.kind = kind
        if kind == "httpx":
            self._httpx = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        else:
            self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def get(self, path: str) -> tuple[int, bytes]:
        if self.kind == "httpx":
            r = self._httpx.get(path)
            return r.status_code, r.content
        self._conn.request("GET", path)
        r = self._conn.getresponse()
        return r.status, r.read()

    def reset(self) -> None:
        """After a failed connect: the next request opens a new connection (httpx does so itself)."""
        if self.kind != "httpx":
            self._conn.close()

    def describe(self) -> str:
        return (f"httpx {httpx.__version__}" if self.kind == "httpx" else "http.client (Python stdlib)") + \
            ", one keep-alive connection, sequential"

    def close(self) -> None:
        self._httpx.close() if self.kind == "httpx" else self._conn.close()


# What is measured: the request's query and the status it must get. "floor" is the same route with a
# k the API refuses: HTTP, routing, validation and a JSON reply but no model work, i.e. what the
# machine's load alone adds to any request.
SETTINGS = {"explain=false": ("k=10&explain=false", 200), "explain=true": ("k=10&explain=true", 200),
            "floor": ("k=0", 422)}


def measure(client: Client, users: list[str], n: int, setting: str, rng: np.random.Generator) -> np.ndarray:
    """Milliseconds per request, one after another (client-side: request sent to JSON body parsed)."""
    query, expected = SETTINGS[setting]
    out = np.empty(n)
    for i in range(n):
        user = users[int(rng.integers(len(users)))]
        t0 = time.perf_counter()
        status, body = client.get(f"/users/{user}/recommendations?{query}")
        json.loads(body)
        out[i] = (time.perf_counter() - t0) * 1000
        if status != expected:
            raise RuntimeError(f"HTTP {status}: {body[:500]!r}")
    return out


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def _event_loop() -> dict[str, str]:
    """What uvicorn's "auto" picks in this environment (uvloop / httptools when importable)."""
    import importlib.util

    return {"loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
            "http": "httptools" if importlib.util.find_spec("httptools") else "h11"}


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="ML-100K folder (default: synthetic log of the same size)")
    parser.add_argument("--model", default=None, help="a model.pt over the same catalogue (default: random weights)")
    parser.add_argument("--synthetic-users", type=positive_int, default=943, help="users of the synthetic log (no --data)")
    parser.add_argument("--requests", type=positive_int, default=1000, help="measured requests per setting")
    parser.add_argument("--warmup", type=non_negative_int, default=50, help="unmeasured requests per setting first")
    parser.add_argument("--chunk", type=positive_int, default=50, help="requests per round before switching setting")
    parser.add_argument("--client", choices=("http.client", "httpx"), default="http.client")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_latency.json"),
                        help="results JSON ('' to skip)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    settings = list(SETTINGS)
    with tempfile.TemporaryDirectory() as tmp:
        model_path, store_path, users = prepare(Path(tmp), args.data, args.model, args.synthetic_users)
        port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        server = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--model", str(model_path),
                                   "--store", str(store_path), "--port", str(port)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            client = Client(args.client, port)
            try:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        if client.get("/health")[0] == 200:
                            break
                    except (OSError, http.client.HTTPException, httpx.TransportError):
                        client.reset()
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"server did not start: {server.stderr.read().decode()[-2000:]}")
                    time.sleep(0.2)
                print(f"ML-100K-sized: {len(users)} users, store {store_path.stat().st_size / 1e6:.1f} MB, "
                      f"{os.cpu_count()} CPU cores, server pid {server.pid} (nice {os.nice(0)}), {_event_loop()}")
                uptime_before = _uptime()
                print(f"before: {uptime_before}")
                for setting in settings:  # warm-up, not measured
                    measure(client, users, args.warmup, setting, rng)
                ms: dict[str, list[np.ndarray]] = {e: [] for e in settings}
                cpu = dict.fromkeys(settings, 0.0)
                client_cpu = dict.fromkeys(settings, 0.0)
                loads: list[float] = []
                done = 0
                while done < args.requests:
                    n = min(args.chunk, args.requests - done)
                    for setting in settings:
                        cpu0, client0 = cpu_seconds(server.pid), time.process_time()
                        ms[setting].append(measure(client, users, n, setting, rng))
                        cpu[setting] += cpu_seconds(server.pid) - cpu0
                        client_cpu[setting] += time.process_time() - client0
                    loads.append(os.getloadavg()[0])
                    done += n
                uptime_after = _uptime()
            finally:
                client.close()
        finally:
            server.terminate()  # uvicorn shuts down cleanly on SIGTERM
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    rows = []
    print(f"{'request':>14} {'n':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'server CPU ms/req':>18} {'client CPU ms/req':>18}")
    for setting in settings:
        a = np.concatenate(ms[setting])
        p50, p95, p99 = np.percentile(a, [50, 95, 99])
        row = {"request": setting, "query": SETTINGS[setting][0], "n": len(a), "p50_ms": round(p50, 2),
               "p95_ms": round(p95, 2), "p99_ms": round(p99, 2), "max_ms": round(float(a.max()), 2),
               "server_cpu_ms_per_request": round(cpu[setting] * 1000 / len(a), 2),
               "client_cpu_ms_per_request": round(client_cpu[setting] * 1000 / len(a), 2)}
        rows.append(row)
        print(f"{setting:>14} {len(a):>6} {p50:>8.2f} {p95:>8.2f} {p99:>8.2f} {a.max():>8.2f} "
              f"{row['server_cpu_ms_per_request']:>18.2f} {row['client_cpu_ms_per_request']:>18.2f}")
    print(f"after: {uptime_after}")
    print(f"1-min load average while measuring: mean {np.mean(loads):.2f}, min {min(loads):.2f}, max {max(loads):.2f} "
          f"on {os.cpu_count()} cores")
    if args.out:
        result = {"settings": {"command": "python -m simulations.bench.serve_latency " + " ".join(argv or sys.argv[1:]),
                               "when_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "cpus": os.cpu_count(), "nice": os.nice(0), "data": args.data or "synthetic",
                               "users": len(users), "k": 10, "warmup_per_setting": args.warmup,
                               "chunk": args.chunk, "client": client.describe(),
                               **_event_loop()},
                  "load": {"uptime_before": uptime_before, "uptime_after": uptime_after,
                           "load1_while_measuring": {"mean": round(float(np.mean(loads)), 2),
                                                     "min": round(min(loads), 2), "max": round(max(loads), 2)}},
                  "rows": rows}
        write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
