"""Token ids of one sample -> the text a person or an API client may see, with stop strings.

`TextStream` detokenises incrementally and never splits a UTF-8 character; a stop string
ends the text *before* the match (as the OpenAI API and vLLM do), and text that could still
become a stop string is held back until it cannot. The engine's dispatcher
(`qwen25.engine.dispatch`) keeps one per sample and cancels the work once a stop string
is found, so no compute is spent past it.
"""

from __future__ import annotations

from collections.abc import Sequence

from qwen25.errors import UserError


class TextStream:
    """Token ids of one sample -> safe-to-show text deltas, honouring stop strings."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise UserError("stop strings must be non-empty strings")
        self._decoder = tokenizer.stream_decoder(skip_special_tokens=skip_special_tokens)
        self._stop = list(stop)
        self._pending = ""  # decoded but not yet shown: might be the start of a stop string
        self.text = ""  # everything shown so far
        self.stopped = False  # a stop string was found (the text ends before it)

    def push(self, token_id: int) -> str:
        """Feed one generated id; returns the text that can be shown now (may be "")."""
        if self.stopped:
            return ""
        self._pending += self._decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: the held-back text (unless a stop string cut it)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cut = min((i for i in (self._pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self._pending, self.stopped = self._pending[:cut], "", True
        elif final:
            out, self._pending = self._pending, ""
        else:
            keep = _longest_stop_prefix(self._pending, self._stop)
            out = self._pending[:len(self._pending) - keep]
            self._pending = self._pending[len(self._pending) - keep:]
        self.text += out
        return out


def _longest_stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
