"""argparse value types that refuse what cannot work with argparse's own one-line usage error."""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _int_at_least(text, 0)


def seed(text: str) -> int:
    """A seed: an integer in [0, 2**63) (torch.manual_seed takes a signed 64-bit one; larger raised a traceback)."""
    value = _int_at_least(text, 0)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"{value} must be below 2**63")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def open_fraction(text: str) -> float:
    """A number in (0, 1)."""
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text} must be below 1")
    return value


def delta(text: str) -> float:
    """A DP delta in [0, 1) (0 = the default rule)."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be in [0, 1) (0 = min(1e-5, 0.1 / users))")
    return value


def port(text: str) -> int:
    """A TCP port."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1-65535)")
    return value


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of integers >= 1, e.g. ``5,20``."""
    return [positive_int(part.strip()) for part in text.split(",")]


def positive_ints_or_none(text: str) -> list[int]:
    """Like :func:`positive_ints`, but ``""`` is the empty list (e.g. "no partner counts")."""
    return positive_ints(text) if text.strip() else []


def non_negative_ints(text: str) -> list[int]:
    """A comma-separated list of integers >= 0, e.g. ``0,1`` (thread counts, 0 = all cores)."""
    return [non_negative_int(part.strip()) for part in text.split(",")]


# Flower's own key=value pattern (flwr.common.config.parse_config_args), to find what it would skip
_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def parse_run_config(values: str | list[str] | None) -> dict:
    """``--run-config`` values parsed by Flower's parser, but text it would silently skip (a token
    without ``=``, e.g. ``--run-config dp`` or ``embedding-dim 64``) and a TOML file mixed with
    pairs are one :class:`ConfigError` line instead of an ignored setting."""
    from flwr.common.config import parse_config_args

    from common.errors import ConfigError

    values = [v for v in ([values] if isinstance(values, str) else values or []) if v]
    if not values:
        return {}
    if not (len(values) == 1 and values[0].endswith(".toml")):
        for value in values:
            if value.endswith(".toml"):
                raise ConfigError("--run-config: a TOML file cannot be combined with key=value pairs")
            leftover = _PAIR.sub(" ", value).split()
            if leftover:
                raise ConfigError(f"--run-config: {leftover[0]!r} is not key=value "
                                  "(e.g. --run-config 'num-server-rounds=3 dataset=\"ml-100k\"')")
        keys = [key for value in values for key, _ in _PAIR.findall(value)]
        if repeated := sorted({k for k in keys if keys.count(k) > 1}):  # Flower: "invalid format" only
            raise ConfigError(f"--run-config: {repeated[0]} is given more than once; give each key once")
        try:
            return parse_config_args(values)
        except Exception:  # noqa: BLE001 -- click.ClickException, or a TOML error from older Flower
            # Flower's error names no key: find the value it cannot read (unquoted text, e.g. a path)
            for key, value in (pair for v in values for pair in _PAIR.findall(v)):
                try:
                    parse_config_args([f"{key}={value}"])
                except Exception:  # noqa: BLE001 -- as above
                    raise ConfigError(_unreadable_value(key, value)) from None
            raise
    try:
        return parse_config_args(values)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 -- a TOML syntax error, or a table / list Flower cannot flatten
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"--run-config {values[0]}: not a flat TOML file of run config keys ({reason}); a sweep "
                          "file goes to `python -m simulations.sweep`") from None


def _unreadable_value(key: str, value: str) -> str:
    """Why Flower cannot read ``key=value``, and what to write instead."""
    if re.search(r",\s*[\w.-]+=", value):  # "quote it" was wrong advice for pairs joined by commas (a review)
        return f"--run-config: {key}={value}: separate key=value pairs with spaces, not commas"
    if re.fullmatch(r"[+-]?\d+,\d+", value):
        return f"--run-config: {key}={value} is not a number; write decimals with a point: {key}={value.replace(',', '.')}"
    return (f"--run-config: {key}={value} is not a number, true / false or quoted text; "
            f"put text in double quotes: {key}=\"{value}\"")


def app_run_config(project: str | os.PathLike) -> dict:
    """The ``[tool.flwr.app.config]`` table of the Flower app in folder ``project``, flattened as
    ``flwr run`` reads it: what a run config starts from before ``--run-config``. ``{}`` where the
    folder has no ``pyproject.toml`` or its file is not a Flower app's; a file TOML cannot read is a
    :class:`ConfigError` line (``flwr run`` would refuse it too)."""
    import tomllib

    from flwr.common.config import flatten_dict

    from common.errors import ConfigError

    path = Path(project) / "pyproject.toml"
    if not path.is_file():
        return {}
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a TOML file flwr run can read ({exc})") from None
    app = table.get("tool", {}).get("flwr", {}).get("app")
    if not isinstance(app, dict):
        return {}
    config = app.get("config", {})
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: [tool.flwr.app] config is not a table of run config keys")
    return flatten_dict(config)


PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the folder of pyproject.toml, where `flwr run .` runs


def with_app_config(overrides: dict, project: str | os.PathLike | None = None, *, always_say: bool = False) -> dict:
    """``overrides`` on top of the ``[tool.flwr.app.config]`` of the app in ``project`` (default this
    project), as ``flwr run`` reads them (Flower's ``run_simulation`` hands apps no run config, so an
    edit of the file was ignored by the simulations). Prints the keys where the file differs from the
    built-in defaults; ``always_say`` (``fedrec-server check``): also an unedited file, or no app there."""
    project = PROJECT_ROOT if project is None else project
    app = app_run_config(project)
    edited = edited_keys(app)
    if app and (edited or always_say):
        print(f"config: {Path(project) / 'pyproject.toml'} [tool.flwr.app.config] "
              f"({'edited: ' + ', '.join(edited) if edited else 'the built-in defaults'}), then --run-config", flush=True)
    elif always_say:
        print(f"note: {project} holds no Flower app's pyproject.toml: checked against the built-in defaults; "
              "give --app the folder flwr run is given")
    return {**app, **overrides}


def edited_keys(app_config: dict) -> list[str]:
    """The keys of an app's ``[tool.flwr.app.config]`` whose value differs from the built-in defaults."""
    from common.config import DEFAULTS

    return sorted(k for k, v in app_config.items() if k not in DEFAULTS or v != DEFAULTS[k]
                  or isinstance(v, bool) != isinstance(DEFAULTS[k], bool))


def output_file(text: str) -> Path:
    """A file to write at the end of a long command, checked before the work starts: not a
    folder, and its nearest existing parent is a folder we may write in (missing ones get created)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text}: not allowed to write there")
    return path
