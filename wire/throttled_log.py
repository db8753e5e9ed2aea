"""One warning line per interval for what a peer can send at any rate (malformed control messages, bad
KV frames, a refused handshake): one line per bad input would flood the log."""

from __future__ import annotations

import logging
import time

WARN_INTERVAL_S = 10.0  # at most one log line per this long


class ThrottledWarning:
    """A warning logged at most once per `interval_s`; the lines held back are counted into the next
    one. For what a peer can send at any rate: one line per bad input would flood the log."""

    def __init__(self, log: logging.Logger, interval_s: float = WARN_INTERVAL_S):
        self.log, self.interval_s = log, interval_s
        self._next_s = 0.0
        self._num_held = 0

    def __call__(self, fmt: str, *args, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now < self._next_s:
            self._num_held += 1
            return
        if self._num_held:
            fmt, args = fmt + " (and %d more in the last %.0f s)", (*args, self._num_held, self.interval_s)
        self.log.warning(fmt, *args, exc_info=exc_info)
        self._next_s, self._num_held = now + self.interval_s, 0
