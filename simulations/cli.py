"""What every ``python -m simulations.*`` command does with a user mistake."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from common.errors import FedRecError


def user_errors_exit(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a command's ``main``: a :class:`FedRecError` (bad data, config, budget: something the
    user can fix) prints one ``error: ...`` line on stderr and exits with status 2, no traceback."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except FedRecError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return wrapped
