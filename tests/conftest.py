"""Shared fixtures: small data sets, the shared MovieLens folder, Flower's environment."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from hypothesis import settings

from simulations.flower_env import set_flower_env

set_flower_env()

# Copies of ledger markers (client/ledger_file.py mirror_path) go to a folder of this run, not the user's
# ~/.local/state: every test's ledger is its own, and none is left behind in the home folder
if "FEDREC_STATE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["FEDREC_STATE_DIR"] = tempfile.mkdtemp(prefix="fedrec-test-state-")
    atexit.register(shutil.rmtree, os.environ["FEDREC_STATE_DIR"], ignore_errors=True)

# A suite started in the background of a non-interactive shell (`make test &`, some CI runners)
# inherits SIGINT ignored, and an ignored signal stays ignored in every child: the tests that press
# Ctrl-C, on themselves or on a run they start, would see nothing happen. Python's own handler, as
# in a terminal (children then start with the default action).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Under pytest-xdist (`make test` runs TEST_WORKERS workers) each worker computes with one torch
# thread: two workers of two threads each on a 2-core machine oversubscribe it, and small models
# then run many times slower. Processes a test starts (Ray, SuperNodes) keep their own defaults.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)

# Hypothesis: "ci" (default) keeps the property tests to 150 inputs each, the same ones every run
# (derandomize: a suite run never turns red for a bug that no change brought in, as one random draw
# did); the loader properties' known regressions are explicit @examples, run every time.
# HYPOTHESIS_PROFILE=thorough runs 500 fresh random inputs per test (what found those bugs) when a
# loader changes; add what it finds as an @example with the fix.
settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Real MovieLens data lives outside the repository (never copied in): ../shared/data by default.
SHARED_DATA = Path(os.environ.get("FEDREC_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    path = SHARED_DATA / "ml-100k"
    if not (path / "u.data").is_file():
        pytest.skip(f"MovieLens 100K not found at {path} (set FEDREC_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def ml1m_dir() -> Path:
    path = SHARED_DATA / "ml-1m"
    if not (path / "ratings.users_1-2999.dat").is_file():
        pytest.skip(f"partial MovieLens 1M not found at {path} (set FEDREC_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def small_data():
    """A small deterministic synthetic data set (200 users, 60 items)."""
    from common.data import build_sequences, generate_synthetic

    return build_sequences(generate_synthetic(num_users=200, num_items=60, mean_length=15, seed=3), name="small")


def flower_message(content, message_type: str = "train", *, src_node_id: int = 0, dst_node_id: int = 1):
    """A Message as a SuperNode would hand it to a ClientApp (outside a Flower runtime)."""
    import time
    import uuid

    from flwr.app import Message, Metadata

    meta = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=src_node_id, dst_node_id=dst_node_id,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type)
    return Message(content=content, metadata=meta)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one torch thread is 10-50x faster than two on a loaded 2-core machine.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def recording_client_app(overrides: dict):
    """(client app, sent): the project's ClientApp for ``overrides``, recording (message type, content) of
    every message it answers into ``sent`` (what the coordinator sent in each round)."""
    from client.app import make_client_app

    real, sent = make_client_app(overrides), []

    def spy(msg, context):  # noqa: ANN001, ANN202
        sent.append((msg.metadata.message_type, msg.content))
        return real(msg, context)

    return spy, sent


def dp_accounting_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Google dp_accounting's RDP epsilon of ledger rows (noise, sample rate, steps): an accountant independent
    of Opacus; a sample rate 1 row is a plain Gaussian mechanism there (no subsampling)."""
    from dp_accounting import dp_event, rdp

    acc = rdp.RdpAccountant()
    for sigma, q, steps in history:
        event = dp_event.GaussianDpEvent(sigma)
        acc.compose(event if q == 1.0 else dp_event.PoissonSampledDpEvent(q, event), steps)
    return acc.get_epsilon(delta)
