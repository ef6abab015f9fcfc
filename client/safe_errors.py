"""Error replies that never carry a partner's data to the server.

Flower forwards a ClientApp's exception text to the server, and exception texts quote what
they choke on: a pandas parser error quotes the offending line, a ``KeyError`` the user id,
a headerless CSV's "columns" are its first data row, a path names the partner's folders.
``error_reply`` turns any exception into a reply whose reason is safe to send; the full text
goes to the partner's own log only.

* Our own errors (``FedRecError``: budget, config, data problems) keep their sentence, which
  says what to fix, with absolute paths cut to the file name, and quoted values and
  parenthesised details (where messages put found columns or a parser's words) removed.
* Anything else (a bug, a library error) becomes its exception type and a fixed sentence.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from common.errors import FedRecError

LOG = logging.getLogger("fedrec.client")
USER_ERROR = 400  # the partner can fix it (data, config, budget)
INTERNAL_ERROR = 500  # a bug or an environment problem at the partner
MAX_REASON_CHARS = 300

# An absolute path (or ~/...): a "/" not preceded by a word character, then path segments.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])~?(?:/[\w.@+=-]+)+/?")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PARENTHESISED = re.compile(r"\s\([^()]*\)")  # " (found a, b)" but not "column(s)"


def safe_reason(exc: BaseException, private_paths: Iterable[object] = ()) -> str:
    """The reason the server may see for ``exc``: one line, no data values, no paths.

    An error whose message quotes the partner's data says so with its ``public`` sentence, which
    is sent instead. ``private_paths``: the partner's own paths (node config ``data-path``,
    ``ledger-path``), relative or with spaces, which become their file names wherever they occur."""
    kind = type(exc).__name__
    if not isinstance(exc, FedRecError):
        return f"{kind}: internal error at the partner; its operator has the details in the partner's log"
    text = exc.public if getattr(exc, "public", None) is not None else str(exc)
    for path in sorted({str(p) for p in private_paths if str(p).strip()}, key=len, reverse=True):
        for form in {path, str(Path(path).expanduser().absolute())}:
            text = text.replace(form, Path(form).name)
            for parent in Path(form).parents:  # its folders: as a path's prefix, or named alone (multi-segment)
                if str(parent) not in ("/", "."):
                    text = text.replace(str(parent) + "/", "")
                    if "/" in str(parent):
                        text = text.replace(str(parent), "<folder>")
    text = " ".join(text.split())
    text = _ABSOLUTE_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], text)
    text = _QUOTED.sub("<value>", text)
    text = _PARENTHESISED.sub("", text)
    if len(text) > MAX_REASON_CHARS:
        text = text[:MAX_REASON_CHARS] + "..."
    return text


PRIVATE_NODE_KEYS = ("data-path", "ledger-path")  # node config values that name the partner's folders


def private_paths(context: Context | None) -> list[object]:
    """The partner's own paths in its node config (see :func:`safe_reason`)."""
    config = context.node_config if context is not None else {}
    return [config[k] for k in PRIVATE_NODE_KEYS if config.get(k)]


def error_reply(msg: Message, exc: BaseException, context: Context | None = None) -> Message:
    """Log ``exc`` in full locally, reply to ``msg`` with a sanitised :class:`Error`."""
    if isinstance(exc, FedRecError):
        LOG.warning("round failed at this partner: %s", exc)
        code = USER_ERROR
    else:
        LOG.exception("round failed at this partner with an unexpected error")
        code = INTERNAL_ERROR
    return Message(Error(code=code, reason=safe_reason(exc, private_paths(context))), reply_to=msg)


def sanitising_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp-wide mod: an exception anywhere below it (handlers and other mods) becomes a
    sanitised error reply instead of Flower forwarding its text to the server."""
    try:
        return call_next(msg, context)
    except Exception as exc:  # noqa: BLE001 -- that is the point
        return error_reply(msg, exc, context)
