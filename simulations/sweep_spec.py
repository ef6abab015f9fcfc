"""A sweep config (TOML, described in simulations/sweep.py) read and checked: its grid of runs,
each run's id and run-config overrides, before the first run starts.

Kept apart from running the sweep (simulations/sweep.py, which re-exports these names) so the
checks can be read, and tested, without the runner's process handling.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from common.config import DEFAULTS, resolve_config
from common.errors import ConfigError, FedRecError
from common.privacy import dp_mode, refuse_many_examples_per_user, uses_central_dp, uses_local_dp

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SWEEP_ONLY = ("num-partners", "seed")
SWEEP_KEYS = ("name", "output", "runs-dir", "seeds", "run-timeout")  # the [sweep] table


def load_sweep(path: str | os.PathLike, *, check_data: bool = True) -> dict[str, Any]:
    """Read and check a sweep config; every key must be a run-config key (or num-partners). ``check_data``:
    also load each cell's data and partners as its run will (simulations/preflight.py); ``--table`` does not."""
    p = Path(path)
    try:
        spec = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read sweep config ({exc})") from None
    if unknown := sorted(set(spec) - {"sweep", "fixed", "grid"}):
        raise ConfigError(f"{p}: unknown table or key {unknown[0]!r}; a sweep config has [sweep], [fixed] and [grid]")
    sweep, fixed, grid = spec.get("sweep", {}), spec.get("fixed", {}), spec.get("grid", {})
    for name, table in (("sweep", sweep), ("fixed", fixed), ("grid", grid)):
        if not isinstance(table, dict):
            raise ConfigError(f"{p}: {name} must be a [{name}] table, got {table!r}")
    for key in sweep:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"{p}: unknown [sweep] key {key!r}; known: {', '.join(SWEEP_KEYS)} "
                              "(run-config keys go under [fixed] or [grid])")
    for key in [*fixed, *grid]:
        if key not in DEFAULTS and key not in SWEEP_ONLY:
            raise ConfigError(f"{p}: unknown key {key!r} (not in [tool.flwr.app.config])")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{p}: grid key {key!r} needs a non-empty list of values")
    _refuse_keys_the_sweep_sets(p, sweep, fixed, grid)
    if "output" not in sweep:
        raise ConfigError(f"{p}: [sweep] needs output = \"path/to/results.csv\"")
    seeds = sweep.get("seeds", [fixed.get("seed", DEFAULTS["seed"])])
    integers = isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    if not seeds or not integers:
        raise ConfigError(f"{p}: [sweep] seeds must be a non-empty list of integers, got {seeds!r}")
    timeout = sweep.get("run-timeout", 3600)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ConfigError(f"{p}: [sweep] run-timeout must be a positive number of seconds, got {timeout!r}")
    spec = {"name": sweep.get("name", p.stem), "output": project_path(p, "output", sweep["output"]),
            "runs-dir": project_path(p, "runs-dir", sweep.get("runs-dir", f"runs/sweeps/{p.stem}")), "seeds": list(seeds),
            "fixed": fixed, "grid": grid, "timeout": float(timeout)}
    try:
        unused: set[str] = set()
        resolved = []
        for run in expand(spec):
            resolved.append((run, check_run(run, spec, check_data=check_data)))
            unused |= unused_budget_keys(run, resolved[-1][1])
        _refuse_a_grid_of_no_effect(grid, unused)  # first: it names the knob that makes runs alike
        seen: dict[str, dict[str, Any]] = {}
        for run, cfg in resolved:
            _refuse_a_repeated_run(run, cfg, seen)
    except FedRecError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    finally:
        if check_data:
            from common.partners import clear_data_caches

            clear_data_caches()  # the runs load their own: the sweep process would hold every data set for hours
    return spec


def project_path(config: Path, key: str, value: object) -> Path:
    """A [sweep] path, absolute; a relative one is under the repository root, where every run's process
    starts (it was under the current directory: started elsewhere, a sweep wrote a new CSV and reran all)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{config}: [sweep] {key} must be a path, got {value!r}")
    return PROJECT_ROOT / Path(value).expanduser()


def check_run(run: Mapping[str, Any], spec: Mapping[str, Any], *, check_data: bool = True) -> dict[str, Any]:
    """The run config one run's process will get, resolved and checked as ``simulations.run`` does, so
    a bad value is one line naming its key before the first run starts (it was a traceback from the
    progress bar, or a failed row per run); returns it."""
    partners = run["num-partners"]
    if isinstance(partners, bool) or not isinstance(partners, int) or partners < 1:
        raise ConfigError(f"num-partners = {partners!r} must be a whole number of partners, at least 1")
    cfg = resolve_config(None, run_config(run, spec, run_id(run)))
    refuse_many_examples_per_user(cfg)
    if check_data:
        from simulations.preflight import check_simulation  # data, torch and flwr: after the cheap checks

        # in the repository root, where the run's process starts: a relative dataset is read from there (a review)
        with contextlib.chdir(PROJECT_ROOT):
            check_simulation(cfg, partners)  # data, partitions, min-nodes and the ServerApp's own refusals
    return cfg


def _refuse_keys_the_sweep_sets(p: Path, sweep: Mapping[str, Any], fixed: Mapping[str, Any],
                                grid: Mapping[str, Any]) -> None:
    """:class:`ConfigError` for a key the sweep would overwrite in every run: a [grid] seed (or a [fixed]
    one beside [sweep] seeds) gave identical runs under one run id; run-dir / run-name were dropped."""
    if "seed" in grid or ("seed" in fixed and "seeds" in sweep):
        table = "grid" if "seed" in grid else "fixed"
        raise ConfigError(f"{p}: [{table}] seed would be replaced by the sweep's seeds; "
                          "list them under [sweep] as seeds = [1, 2, 3]")
    if both := sorted(set(fixed) & set(grid)):  # [fixed]'s value was dropped in silence (a research-CLI review)
        raise ConfigError(f"{p}: {both[0]} is in both [fixed] and [grid], and the grid's values would replace the "
                          "fixed one in every run; keep it in one table")
    for key in ("run-dir", "run-name"):
        if key in fixed or key in grid:
            raise ConfigError(f"{p}: {key} is set by the sweep (run directories go under [sweep] runs-dir, "
                              f"named <name>-<run-id>); remove {key} from [{'fixed' if key in fixed else 'grid'}]")


def _refuse_a_repeated_run(run: Mapping[str, Any], cfg: Mapping[str, Any], seen: dict[str, dict[str, Any]]) -> None:
    """:class:`ConfigError` for a run that repeats an earlier one of the sweep: ``seeds = [1, 1]`` or
    ``[8, 8.0]`` in a grid were two rows under two run ids, the second "resuming" the first's finished run."""
    same = {k: v for k, v in cfg.items() if k not in ("run-name", "run-dir")}
    key = json.dumps([run["num-partners"], same], sort_keys=True, default=str)
    if (earlier := seen.get(key)) is None:
        seen[key] = dict(run)
        return
    if differ := {k: v for k, v in run.items() if earlier.get(k) != v}:
        raise ConfigError(f"{ {k: earlier.get(k) for k in differ} } and {differ} give the same run at seed "
                          f"{run['seed']}; list each grid value once")
    raise ConfigError(f"the run at seed {run['seed']} is listed twice (a seed or grid value repeated); "
                      "list each seed and grid value once")


def expand(spec: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every run of the sweep: fixed keys + one grid combination + a seed.

    Seed-major order: a sweep stopped early has the whole grid for its first seeds,
    not every seed of its first cells.
    """
    keys = list(spec["grid"])
    for seed in spec["seeds"]:
        for combo in itertools.product(*(spec["grid"][k] for k in keys)):
            run = {**spec["fixed"], **dict(zip(keys, combo)), "seed": seed}
            run.setdefault("num-partners", 5)
            yield run


def is_no_dp(run: Mapping[str, Any]) -> bool:
    eps = run.get("target-epsilon")
    # "infinity" too: it read as inf and was refused, told to write "inf" (a docs review)
    return isinstance(eps, str) and eps.lower() in ("inf", "infinity", "none") or (isinstance(eps, float) and math.isinf(eps))


def run_id(run: Mapping[str, Any]) -> str:
    """A stable id of a run's full configuration (the resume key)."""
    return hashlib.sha1(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_overrides(run: Mapping[str, Any]) -> dict[str, Any]:
    """Run-config overrides of one run: ``target-epsilon = "inf"`` (no local DP-SGD budget) turns
    local DP off: dp-mode local -> off (``dp = false``), both -> central; central DP stays as asked
    (it used to be switched off silently with everything else)."""
    out = {k: v for k, v in run.items() if k != "num-partners"}
    if is_no_dp(run):
        out.pop("target-epsilon")
        mode = out.get("dp-mode", DEFAULTS.get("dp-mode", "local"))
        if mode == "both":
            out["dp-mode"] = "central"
        elif mode in ("local", "off"):
            out["dp"] = False
            out["dp-mode"] = "off"
    return out


def unused_budget_keys(run: Mapping[str, Any], cfg: Mapping[str, Any]) -> set[str]:
    """The privacy-budget knobs that change nothing in ``run`` (``cfg``: the config it runs with):
    target-epsilon without DP-SGD at the partners (dp-mode central or off; "inf" is what turns DP-SGD
    off, so a run asking for it uses it), target-delta without any DP (central DP accounts at it)."""
    asked = resolve_config(None, {k: run[k] for k in ("dp", "dp-mode") if k in run})
    unused = set() if uses_local_dp(dp_mode(asked)) else {"target-epsilon"}
    unused |= set() if uses_central_dp(dp_mode(cfg)) else {"central-noise-multiplier"}
    return unused | ({"target-delta"} if dp_mode(cfg) == "off" else set())


_NO_EFFECT = {  # budget knob -> (the runs that ignore it, the runs to sweep it over instead)
    "target-epsilon": ("DP-SGD at the partners (dp-mode central or off)", 'dp-mode "local" or "both"'),
    "target-delta": ('DP at all (dp-mode off, dp = false, or target-epsilon = "inf" without central DP)', "DP"),
    "central-noise-multiplier": ("central DP (dp-mode local or off)", 'dp-mode "central" or "both"'),
}


def _refuse_a_grid_of_no_effect(grid: Mapping[str, Any], unused: set[str]) -> None:
    """A [grid] that varies a budget knob some runs ignore gave those runs' cells one run each time
    over, drawn at the knob's value as if it had been their budget."""
    for key in sorted(unused & {k for k, values in grid.items() if len(values) > 1}):
        ignoring, instead = _NO_EFFECT[key]
        raise ConfigError(f"[grid] {key} varies, but some runs have no {ignoring}, where it changes nothing; "
                          f"vary it in a sweep of runs with {instead} only")


def run_name(spec: Mapping[str, Any], rid: str) -> str:
    """The run directory's name (under ``runs-dir``) of the sweep's run ``rid``."""
    return f"{spec['name']}-{rid}"


def run_config(run: Mapping[str, Any], spec: Mapping[str, Any], rid: str) -> dict[str, Any]:
    """One run's ``--run-config`` overrides: its cell's, plus the sweep's run directory and run name."""
    return {**run_overrides(run), "run-dir": str(spec["runs-dir"]), "run-name": run_name(spec, rid)}
