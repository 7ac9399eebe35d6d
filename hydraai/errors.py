"""The named exceptions HydraAI raises, each with a message a user can act on."""


class HydraError(Exception):
    """Base class of every error HydraAI raises on purpose."""


class ConfigError(HydraError, ValueError):
    """A run config value is missing, of the wrong type or out of range."""


class DataError(HydraError):
    """A dataset could not be found, read or split as configured."""


class TokenizerMismatch(HydraError):
    """The tokenizer a message carries is not the one the coordinator uses."""


class CheckpointError(HydraError):
    """A checkpoint is missing, damaged or belongs to another model shape."""


class RunFailed(Exception):
    """The ServerApp stopped on a HydraError it has already logged in one line.

    It is not a HydraError, so that nothing catches it short of Flower, which
    then marks the run as failed.
    """


class LedgerError(HydraError):
    """The ledger database cannot be opened, read or written."""


class UnknownUser(LedgerError):
    """No user with this user_id exists in the ledger."""


class InsufficientBalance(LedgerError):
    """A user's balance does not cover a debit."""


class LedgerBusy(LedgerError):
    """Another process held the ledger's write lock past the busy timeout."""


class ReportError(HydraError):
    """A run has no folder or metrics to report on, or they cannot be read."""
