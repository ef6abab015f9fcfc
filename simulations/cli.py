"""What every ``python -m simulations.*`` command does with a user mistake (common/cli_errors.py)."""

from common.cli_errors import RUN_NOT_COMPLETE, user_errors_exit  # noqa: F401

# Exit status of a simulation that ended but aggregated no update in any round (as fedrec-server report's
# "incomplete"): its spend is still in privacy.json, so a sweep records that row (simulations/sweep.py)
NOTHING_AGGREGATED = RUN_NOT_COMPLETE
