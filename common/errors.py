"""Errors a user can cause, each rendered as one clear line."""


class FedRecError(Exception):
    """Base class for errors caused by input or configuration, not by a bug.

    ``public``: the sentence another party may see (a partner's error reply to the coordinator)
    when the message itself quotes the partner's data, e.g. a headerless log's first row; None
    when the message holds none (client/safe_errors.py still removes paths and quoted values).
    """

    def __init__(self, *args: object, public: str | None = None) -> None:
        super().__init__(*args)
        self.public = public


class DataError(FedRecError):
    """An interaction log, catalogue or partition cannot be used; the message names the file and the problem."""


class EmptyPartitionError(DataError):
    """A partition of the users that holds none of them (a skewed split, more partners than users)."""


class ConfigError(FedRecError):
    """A run-config or node-config value is invalid; the message names the key."""


class PrivacyError(FedRecError):
    """A privacy precondition fails (budget exhausted, too few users for the target epsilon)."""


class FederationError(FedRecError):
    """A round cannot proceed: too few partners connected in time, or too few valid updates."""


class CheckpointError(FedRecError):
    """A checkpoint is missing, corrupt, or belongs to a different model, catalogue or config."""
