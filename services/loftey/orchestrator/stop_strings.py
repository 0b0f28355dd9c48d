"""Stop-string matching over streamed text that never lets a stop string's fragment out."""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Hold back streamed text while it could still become one of the stop strings.

    Feed it text deltas in order. It returns the text that is safe to stream:
    everything except a pending tail, the longest suffix of the text so far that
    is a prefix of some stop string. When a stop string appears, the text is cut
    where it starts and :attr:`matched` is set. Generation ends there, so a longer
    stop string that would start earlier but is not yet complete does not count.
    Because any occurrence starts inside the pending tail or the new delta,
    searching ``pending + delta`` finds every stop string, including one split
    over many deltas.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(stop)
        self._pending = ""
        self.matched: str | None = None

    def feed(self, delta: str) -> str:
        """Add a delta; return the text now safe to stream (possibly empty)."""
        if self.matched is not None:
            return ""
        if not self._stop:
            return delta

        text = self._pending + delta
        match_start, matched = _first_match(text, self._stop)
        if matched is not None:
            self.matched = matched
            self._pending = ""
            return text[:match_start]

        hold = _held_back_length(text, self._stop)
        self._pending = text[len(text) - hold :]
        return text[: len(text) - hold]

    def flush(self) -> str:
        """Return the pending tail once generation ended without a match."""
        pending, self._pending = self._pending, ""
        return pending


def _first_match(text: str, stop: Sequence[str]) -> tuple[int, str | None]:
    best_start, best = len(text), None
    for candidate in stop:
        start = text.find(candidate)
        if start != -1 and start < best_start:
            best_start, best = start, candidate
    return best_start, best


def _held_back_length(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    longest = 0
    for candidate in stop:
        for length in range(min(len(candidate) - 1, len(text)), longest, -1):
            if text.endswith(candidate[:length]):
                longest = length
                break
    return longest
