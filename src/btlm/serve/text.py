"""Token ids → text for a stream of generated tokens: incremental detokenisation and stop sequences.

Both are needed by every engine that samples token by token: a byte-level BPE token can hold part of a
UTF-8 character (so text is only released once it decodes cleanly), and a stop sequence can span tokens
(so text that could be the start of one is held back until it either completes or cannot).
"""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas.

    Decoding each new token alone breaks characters split across tokens and loses the spaces some
    tokenizers add between tokens; decoding the whole list each step is quadratic. So, as in text-generation
    servers, a short window is decoded: the text of ``ids[prefix:]`` minus the text of ``ids[prefix:read]``,
    released only when it does not end in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # tokens whose text has been released

    def push(self, token_id: int) -> str:
        """Add a token; return the newly complete text (may be empty)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read]) if self._read > self._prefix else ""
        after = decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Text of the tokens not yet released (an incomplete character decodes to U+FFFD)."""
        if self._read == len(self.ids):
            return ""
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read]) if self._read > self._prefix else ""
        after = decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):]


class StopMatcher:
    """Cuts generated text at the first stop sequence, holding back text that may start one.

    ``feed(delta)`` returns ``(text_to_release, stopped)``. Released text never contains a stop sequence
    nor the beginning of one that is still being generated, so a stream can be cut without retracting text.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self.stops:
            return delta, False
        text = self._pending + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._pending = ""
            return text[: min(hits)], True
        hold = self._longest_partial_stop(text)
        self._pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text

    def _longest_partial_stop(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop sequence."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
