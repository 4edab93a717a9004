"""Stop sequences: end generated text at the first occurrence of any of them, also while it streams piece by piece."""

from __future__ import annotations

from collections.abc import Sequence


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to (excluding) the earliest stop sequence, and whether one occurred."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class StopStream:
    """Releases streamed text that can no longer turn into a stop sequence; `stopped` once one has appeared.

    A tail that is a prefix of some stop sequence ("\\n\\nQ" of "\\n\\nQuestion:") is held back until the next piece
    decides it; `finish()` releases it when generation ends without a stop.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.released = 0
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        cut, self.stopped = cut_at_stop(self.text, self.stops)
        if self.stopped:
            self.text = cut
            return self._release(len(cut))
        held = max((n for s in self.stops for n in range(1, len(s)) if cut.endswith(s[:n])), default=0)
        return self._release(len(cut) - held)

    def finish(self) -> str:
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        out, self.released = self.text[self.released:end], max(self.released, end)
        return out
