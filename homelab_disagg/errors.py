"""Known failures. Each message says what was wrong and what to do; the CLI prints it on one line."""


class DisaggError(Exception):
    """Base for failures the CLI reports as one line (full trace with --debug)."""


class ConfigError(DisaggError):
    pass


class ModelError(DisaggError):
    """Missing, unreadable or unsupported model file."""


class PeerError(DisaggError):
    """A worker that is unreachable, dead, or answers with the wrong model or protocol."""


class CapacityError(DisaggError):
    """A worker has no free slot and its queue is full: retry later or add workers."""


class RequestError(DisaggError):
    """A request that cannot be served as asked (too long, bad parameters)."""
