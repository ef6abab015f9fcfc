"""A released global model file (``model.pt``): its weights, catalogue and run config.

``server/run_report.py`` writes it; serving (``client/recommend.py``), ``fedrec-server add-items``
and ``init-model`` (``server/``) read it through :func:`read_model_file`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from common.errors import DataError


def read_model_file(path: str | os.PathLike) -> dict[str, Any]:
    """The file's ``{"state_dict", "catalogue", "config", ...}`` (catalogue a list, config a dict);
    a missing, foreign or corrupt file is one :class:`DataError` line naming it."""
    import torch

    file = Path(path)
    hint = "; a checkpoint.pt? give the run directory or its model.pt" if file.name.startswith("checkpoint") else ""
    try:
        # weights_only: a model.pt comes from the coordinator, and a full unpickler would run whatever code a
        # tampered file names at the partner; tensors, lists, dicts and strings are all a model file holds
        blob = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"model {file}: no such file (give a run directory or its model.pt)") from None
    except OSError as exc:  # permissions, a folder: the file was never read (a review: read as "another format")
        if exc.filename is None and file.is_file() and os.access(file, os.R_OK):
            # torch's own read of a cut file: OSError(22) "Invalid argument" read as a permission problem (a review)
            raise DataError(f"model {file}: cut short or damaged ({exc.strerror or exc}); copy it again from "
                            "the run directory") from None
        raise DataError(f"model {file}: cannot read it ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001 -- torch.load raises pickle, zip, EOF, runtime errors for foreign files
        raise DataError(f"model {file}: not a fedrec model file "
                        f"(expected state_dict, catalogue, config; {_why(file, exc)}){hint}") from None
    # What it holds, apart from how it was read: a torch file of something else is not "damaged"
    if not isinstance(blob, dict):
        raise DataError(f"model {file}: not a fedrec model file (expected state_dict, catalogue, config; it holds "
                        f"a {type(blob).__name__}){hint}")
    missing = [key for key in ("state_dict", "catalogue", "config") if key not in blob]
    if missing:
        raise DataError(f"model {file}: not a fedrec model file (expected state_dict, catalogue, config; "
                        f"missing {', '.join(repr(k) for k in missing)}){hint}")
    try:
        state, catalogue, config = blob["state_dict"], list(blob["catalogue"]), dict(blob["config"])
    except (TypeError, ValueError) as exc:
        raise DataError(f"model {file}: not a fedrec model file (its catalogue or config has the wrong form: "
                        f"{exc}){hint}") from None
    return {**blob, "state_dict": state, "catalogue": catalogue, "config": config}


def _why(file: Path, exc: Exception) -> str:
    """Why ``torch.load`` refused ``file``, in one line."""
    import pickle
    import zipfile

    if isinstance(exc, EOFError) or file.stat().st_size == 0:
        return "the file is empty or cut short"
    if not zipfile.is_zipfile(file):  # torch.save writes a zip archive; a text file read as a legacy pickle said "missing 101"
        return "not a torch.save archive: another format, or a copy cut short"
    if isinstance(exc, pickle.UnpicklingError):
        # never torch's words: they advise weights_only=False, i.e. running whatever code the file names
        return "a torch.save archive holding objects other than weights (refused: loading them could run code)"
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # one line
    first = first.split(". ")[0][:200]  # torch's first sentence; the rest is advice about its internals
    return f"a damaged torch.save archive: {type(exc).__name__}: {first}"  # whose words: torch's
