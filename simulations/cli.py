"""What every ``python -m simulations.*`` command does with a user mistake (common/cli_errors.py)."""

from common.cli_errors import user_errors_exit  # noqa: F401
