"""A sequence's output text as it streams: token bytes in, text out, stop strings cut where they start.
Pure Python, no engine: the decode engine keeps one per sequence and one per detokenized list."""

from __future__ import annotations

import codecs


class OutputText:
    """Token bytes -> the text to stream. Incomplete UTF-8 is held until its last byte arrives;
    text that may be the start of a stop string is held until it is known not to be, so a stop
    string that spans tokens never reaches the client, and output ends just before it."""

    def __init__(self, stop=()):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""  # everything decoded so far (cut at the stop string once one is hit)
        self.num_emitted = 0  # characters of `text` already streamed

    def add(self, data: bytes) -> tuple[str, bool]:
        """Append one token's bytes. Returns (text to stream now, whether a stop string completed)."""
        new = self._utf8.decode(data)
        if not new:
            return "", False
        search_from = max(0, len(self.text) - self._longest_stop + 1)
        self.text += new
        if not self.stop:
            return self._emit(len(self.text)), False
        hits = [at for at in (self.text.find(s, search_from) for s in self.stop) if at >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._emit(len(self.text)), True
        return self._emit(len(self.text) - self._held_back()), False

    def flush(self) -> str:
        """At the end (EOS, length): the held-back text, and U+FFFD for a dangling partial character."""
        self.text += self._utf8.decode(b"", final=True)
        return self._emit(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text) - self.num_emitted), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _emit(self, end: int) -> str:
        piece = self.text[self.num_emitted : end]
        self.num_emitted = max(self.num_emitted, end)
        return piece
