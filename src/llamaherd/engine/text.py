"""Streamed text cut at the first stop string, released only once no stop string can still start in it."""

from __future__ import annotations


class StopText:
    """Pushes token ids through a StreamDecoder (llamaherd.tokenizer) and hands out the text that is safe to show.

    Text that could be the beginning of a stop string is held back (up to the longest stop string, less one
    character); once a stop string appears, the text before it is the rest of the output and `stopped` is set.
    """

    def __init__(self, decoder, stop_strings: list[str] | tuple[str, ...] = ()) -> None:
        self.decoder, self.stop_strings = decoder, list(stop_strings)
        self.hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self.text, self.emitted, self.stopped = "", 0, False

    def push(self, token_id: int) -> str:
        """Add one generated id; return the newly released text (possibly "")."""
        self.text += self.decoder.push(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """The end of the output: release what was held back (still cut at a stop string)."""
        self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cut = min((i for s in self.stop_strings if (i := self.text.find(s)) != -1), default=-1)
        if cut != -1:
            self.stopped, self.text = True, self.text[:cut]
            final = True
        end = len(self.text) if final else len(self.text) - self.hold
        if end <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted:end], end
        return piece
