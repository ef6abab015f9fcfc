"""What every command (fedrec-server, fedrec-client, python -m simulations.*) does with a user mistake."""

from __future__ import annotations

import errno
import functools
import os
import signal
import sqlite3
import sys
from collections.abc import Callable

from common.errors import FedRecError

# Storage the user can fix: no space or quota left, a read-only file system, a name or file too long
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.EFBIG})
USER_MISTAKE = 2  # the exit status of a user mistake (one error: line)
RUN_NOT_COMPLETE = 3  # a run that ended without all its rounds (fedrec-server report; simulations that aggregated nothing)


def user_errors_exit(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a command's ``main``: a :class:`FedRecError` (bad data, config, budget: something the
    user can fix), a ``--run-config`` string Flower cannot parse (its ``click`` error) or an output
    path that cannot be written prints one ``error: ...`` line on stderr and exits with status 2,
    no traceback. Ctrl-C is one ``stopped`` line and status 130 (143 for a SIGTERM raised as an
    interrupt with ``signum``); output piped into a reader that left (``| head``) ends quietly."""
    from click import ClickException

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except FedRecError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return USER_MISTAKE
        except ClickException as exc:  # flwr.common.config.parse_config_args
            print(f"error: --run-config: {exc.format_message()}", file=sys.stderr)
            return 2
        except sqlite3.OperationalError as exc:  # locked past SQLite's wait, a full disk: not damage
            print(f"error: an SQLite file this command uses is busy or unavailable ({exc}); try again",
                  file=sys.stderr)
            return USER_MISTAKE
        except sqlite3.DatabaseError as exc:  # an event store damaged after it opened (a serving review: traceback)
            print(f"error: an SQLite file this command reads (event store or ledger) is damaged ({exc}); restore it "
                  "from a backup", file=sys.stderr)
            return USER_MISTAKE
        except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
            print(f"error: cannot write or read {exc.filename!r}: {exc.strerror}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            print(f"stopped ({signal.Signals(signum).name})", file=sys.stderr)
            return 128 + signum
        except BrokenPipeError:
            # As Python's documentation advises: stdout's reader is gone, and flushing it again at
            # exit would print a second BrokenPipeError
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        except OSError as exc:  # a full disk, a read-only mount, a name too long: a traceback before (a review)
            if exc.errno not in STORAGE_ERRNOS:
                raise
            where = f" {exc.filename!r}" if exc.filename else ""
            print(f"error: cannot write{where}: {exc.strerror or exc}; free space or choose another folder, "
                  "then run the command again", file=sys.stderr)
            return USER_MISTAKE

    return wrapped
