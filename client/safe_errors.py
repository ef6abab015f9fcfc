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
MAX_REASON_CHARS = 400  # a ledger's rollback refusal, with its advice, is about 330

# An absolute path (or ~/...): a "/" not preceded by a word character, then path segments.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])~?(?:/[\w.@+=-]+)+/?")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PARENTHESISED = re.compile(r"\s\([^()]*\)")  # " (found a, b)" but not "column(s)"
# A default ledger's file name holds the hash of the partner's data (client/partner_identity.py local_label)
_DEFAULT_LEDGER = re.compile(r"partner-[0-9a-f]{16}\.sqlite")


def safe_reason(exc: BaseException, private_paths: Iterable[object] = ()) -> str:
    """The reason the server may see for ``exc``: one line, no data values, no paths.

    An error whose message quotes the partner's data says so with its ``public`` sentence, which
    is sent instead. ``private_paths``: the partner's own paths (node config ``data-path``,
    ``ledger-path``), relative or with spaces, which become their file names wherever they occur;
    the folders above them, and ``$FEDREC_DATA_DIR``, are left out."""
    kind = type(exc).__name__
    if not isinstance(exc, FedRecError):
        return f"{kind}: internal error at the partner; its operator has the details in the partner's log"
    text = exc.public if getattr(exc, "public", None) is not None else str(exc)
    text = _without_private_paths(text, private_paths, private_folders())
    text = " ".join(text.split())
    text = _ABSOLUTE_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], text)
    text = _QUOTED.sub("<value>", text)
    text = _PARENTHESISED.sub("", text)
    text = _DEFAULT_LEDGER.sub("<default ledger file>", text)
    if len(text) > MAX_REASON_CHARS:  # at a word's end where there is one ("the spen..." read as a typo: a journey)
        cut = text[:MAX_REASON_CHARS]
        text = (cut.rsplit(" ", 1)[0] if " " in cut[MAX_REASON_CHARS // 2:] else cut) + "..."
    return text


def _without_private_paths(text: str, paths: Iterable[object], folders: Iterable[object] = ()) -> str:
    """``text`` with each of the partner's ``paths`` cut to its file name and its ``folders`` (and every
    folder above a path) removed, matched only where a path starts and ends (a data-path "." or
    "s/log.csv" must not eat the sentence's dots or the "s" of other words)."""
    names: dict[str, str] = {}  # form -> what stands for it when it appears alone
    for raw, is_folder in [*((p, False) for p in paths), *((f, True) for f in folders)]:
        path = Path(str(raw).strip()).expanduser()
        if not str(raw).strip():
            continue
        for form in (path, path.absolute()):
            names.setdefault(str(form), "<folder>" if is_folder else form.name)
            for parent in form.parents:
                names.setdefault(str(parent), "<folder>")
    start, end = r"(?<![\w.@/-])", r"(?![\w.@/-])"
    for form in sorted(names, key=len, reverse=True):
        if not Path(form).name or form in (".", ".."):
            continue  # "/" or ".": no name, and replacing them would eat every slash or dot
        text = re.sub(start + re.escape(form) + "/", "", text)  # the folder part of a path under it
        if "/" in form:  # alone; a one-word relative folder ("data") is also a word of the sentence
            text = re.sub(start + re.escape(form) + end, names[form], text)
    return text


PRIVATE_NODE_KEYS = ("data-path", "ledger-path", "partner-state-dir")  # node config values that name the partner's folders


def private_paths(context: Context | None) -> list[object]:
    """The partner's own paths (see :func:`safe_reason`): node config ``data-path`` / ``ledger-path`` /
    ``partner-state-dir``,
    and the data path as the loader resolves it under ``$FEDREC_DATA_DIR`` (:func:`private_folders`)."""
    import os

    from common.data.loaders import DATA_DIR_ENV

    config = context.node_config if context is not None else {}
    out: list[object] = [config[k] for k in PRIVATE_NODE_KEYS if config.get(k)]
    if os.environ.get(DATA_DIR_ENV) and config.get("data-path"):
        out.append(os.path.join(os.environ[DATA_DIR_ENV], str(config["data-path"])))
    return out


def private_folders() -> list[object]:
    """Folders whose names are the partner's alone: ``$FEDREC_DATA_DIR`` (where relative data paths resolve)."""
    import os

    from common.data.loaders import DATA_DIR_ENV

    return [os.environ[DATA_DIR_ENV]] if os.environ.get(DATA_DIR_ENV) else []


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
