"""Token ids to text as they come: incremental detokenising and stop strings.

Re-decoding the whole output per token is quadratic; instead we decode a short window that starts
one token before the new ones (so a leading space or a merged character comes out right), the way
vLLM and TGI do. Text ending in U+FFFD is an incomplete UTF-8 character: we wait for the next token.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

# Fast tokenizers may raise "Already borrowed" when one thread encodes while another decodes: the
# server encodes prompts on its event loop while the engine thread decodes, so both take this lock.
TOKENIZER_LOCK = threading.Lock()


class TextStream:
    """Feed token ids, get the text they add; stops at the first of `stop` strings, which is not shown.

    Text that could be the start of a stop string is held back until it is clearly not one.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self._prefix = 0  # window start: one token before the first undecoded one
        self._read = 0  # tokens already turned into text
        self.text = ""  # everything decoded so far (stop string included, if one was hit)
        self._shown = 0  # characters of `text` handed out
        self.stopped: str | None = None  # the stop string that ended the text

    def _decode(self, ids: list[int]) -> str:
        with TOKENIZER_LOCK:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """The text `token` makes visible (may be empty)."""
        if self.stopped is not None:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Whatever was held back, once no more tokens come."""
        if self.stopped is None and self._read < len(self.ids):  # a trailing incomplete character
            self.text += self._decode(self.ids[self._prefix:])[len(self._decode(self.ids[self._prefix:self._read])):]
            self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if self.stop and self.stopped is None:
            start = max(0, self._shown - max(map(len, self.stop)))
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                end, self.stopped = min(hits)
                self.text = self.text[:end]
            elif not final:  # hold back a tail that may grow into a stop string
                for s in self.stop:
                    for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                        if self.text.endswith(s[:k]):
                            end = min(end, len(self.text) - k)
                            break
        piece = self.text[self._shown:end]
        self._shown = max(self._shown, end)
        return piece
