"""Known failures. Each message says what was wrong and what to do; the CLI prints it on one line.

A failure a worker reports to the coordinator travels as its class's `code` (Refused.code,
Failed.code), never as words to look for in the message: `error_for_code` turns the code back into
the class, and the coordinator's HTTP layer maps the class to a status. Rewording a message
changes neither.
"""


class DisaggError(Exception):
    """Base for failures the CLI reports as one line (full trace with --debug)."""

    code = "error"


class ConfigError(DisaggError):
    code = "config"


class ModelError(DisaggError):
    """Missing, unreadable or unsupported model file."""

    code = "model"


class PeerError(DisaggError):
    """A worker that is unreachable, dead, or answers with the wrong model or protocol."""

    code = "peer"


class CapacityError(DisaggError):
    """A worker has no free slot and its queue is full: retry later or add workers."""

    code = "capacity"


class RequestError(DisaggError):
    """A request that cannot be served as asked (bad parameters)."""

    code = "bad_request"


class PromptTooLong(RequestError):
    """The prompt does not fit a decode slot's context."""

    code = "too_long"


_BY_CODE = {cls.code: cls for cls in (CapacityError, RequestError, PromptTooLong)}


def error_for_code(code: str, message: str) -> DisaggError:
    """The failure a worker's Refused code stands for; a code this side does not know is the
    request's fault (a RequestError), as a refusal always is unless it says capacity."""
    return _BY_CODE.get(code, RequestError)(message)
