"""Stopping a sweep's run: its whole process group, and signals that must not cut a stop short.

A sweep runs each simulation as ``python -m simulations.run`` in a session of its own; the
simulation starts Ray processes in the same group. Flower's SIGTERM handler may block, so a stop
is SIGTERM, a grace period, then SIGKILL of the group. Ctrl-C and ``kill <sweep pid>`` stop the
sweep the same way (``Stopped`` is SIGTERM as a KeyboardInterrupt).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import NoReturn

STOP_GRACE_S = 10.0  # seconds a stopped run gets to end on SIGTERM before its process group is killed


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C's KeyboardInterrupt so that both stop a sweep the same way."""

    signum = signal.SIGTERM  # common/cli_errors.py: exit status 128 + signum


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    """While the block runs, SIGTERM (``kill``) raises :class:`Stopped`: it ended the sweep alone,
    leaving the running simulation and its Ray processes behind."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers: main thread only
        yield
        return

    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_stops_ray_too() -> Iterator[None]:
    """:func:`sigterm_stops` around a Flower simulation: ``ray.init`` installs Ray's own SIGTERM handlers
    (a Python one calling ``sys.exit`` and a C++ one that aborts), so ``kill`` ended the run with SIGABRT,
    no stop line and no files (a commit review). Ours is installed again once Ray has started."""
    import ray

    start = ray.init

    def init(*args: object, **kwargs: object) -> object:
        started = start(*args, **kwargs)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_stopped)
        return started

    ray.init = init
    try:
        with sigterm_stops():
            yield
    finally:
        ray.init = start


def stop_ray() -> None:
    """Stop the Ray processes this process started, if any: ``os._exit`` skips Ray's own exit hook, and a
    Ctrl-C during Ray's start or a second one during Flower's stop left its agents running (a commit review)."""
    if "ray" not in sys.modules:  # never started here
        return
    with contextlib.suppress(Exception):
        sys.modules["ray"].shutdown()


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (a results row half written, a run half stopped),
    then act as they would have. Python-level handlers, not the thread's signal mask: the kernel hands a
    masked signal to another thread (numpy's, tqdm's, the run timer), and Python still ran the handler
    in the main thread inside the block (a review). Outside the main thread there is nothing to defer."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: object) -> None:
        pending.append(signum)

    previous = {signum: signal.signal(signum, hold) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:  # the first one, as its own handler would have taken it
            handler = previous[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(pending[0])


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group has already ended
        os.killpg(pgid, signum)


def stop_run(proc: subprocess.Popen) -> None:
    """Stop a run's process group (its own session: ``simulations.run`` and its Ray processes):
    SIGTERM, then SIGKILL after :data:`STOP_GRACE_S` seconds. Flower's SIGTERM handler may block,
    and a single SIGTERM left the sweep waiting on it forever."""
    with signals_deferred():  # a second Ctrl-C or SIGTERM must not cut the stop short
        _signal_group(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_GRACE_S)
        # Also after a clean exit: a Ray worker left in the group would hold the output pipe open
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def exit_interrupted(exc: KeyboardInterrupt, message: str) -> NoReturn:
    """End the process after Ctrl-C (exit status 130) or SIGTERM as :class:`Stopped` (143), printing
    ``message``. ``os._exit``: a simulation's ServerApp runs in a thread Flower does not stop, which
    waits for replies up to its round-timeout (600 s by default) and so kept one Ctrl-C from ending
    the process; its files are written atomically or line by line (a cut line is skipped on reading)."""
    with signals_deferred():  # a second Ctrl-C must not cut the message or the flush short
        print(message, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + getattr(exc, "signum", signal.SIGINT))
