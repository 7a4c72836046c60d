"""From answer token ids to what the client sees: text deltas that never split a character, `stop` strings cut
out, and a ChatGLM3 tool call held back until it can be parsed whole.

The text of an answer is always `decode_answer(ids)` (what infer_generation.py prints), so a stream's deltas join
to exactly the non-streamed content. A delta is sent only when it cannot change any more: text that ends in a
partial UTF-8 sequence (U+FFFD), trailing whitespace (the final text is stripped) and any tail that could begin a
stop string wait for the next token.
"""
from typing import List, Optional, Tuple

from data import parse_tool_call
from glm_tune.generation import decode_answer, decode_text

REPLACEMENT = "\ufffd"


class AnswerText:
    def __init__(self, tokenizer, stop: List[str] = (), tool_names=None):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tool_names = set(tool_names or ())  # None/empty: the answer is plain text, never a tool call
        self.ids: List[int] = []
        self.sent = ""
        self.stopped = False  # a stop string was generated
        self.first_line = None  # ChatGLM3's metadata line, once complete: "" for plain text, a tool's name for a call
        self.holding_call = False  # a metadata line was written: a tool call until proven otherwise

    def add(self, token: int) -> str:
        """Record a token; the new text that is safe to send now ("" when nothing is)."""
        self.ids.append(int(token))
        if self.tool_names and self.first_line is None:
            raw = self._raw()
            if "\n" not in raw:
                return ""
            self.first_line = raw.partition("\n")[0].strip()
            self.holding_call = bool(self.first_line)
        if self.holding_call:
            return ""
        text, stopped = self._cut(decode_answer(self.tokenizer, self.ids))
        self.stopped = stopped
        if not stopped:
            text = self._settled(text)
        return self._delta(text)

    def finish(self) -> Tuple[str, Optional[Tuple[str, dict]]]:
        """(the rest of the text not yet sent, (tool name, arguments) or None) once generation has ended."""
        if self.holding_call:
            call = parse_tool_call(self._raw())
            if call is not None and call[0] in self.tool_names:
                return "", call
        text, self.stopped = self._cut(decode_answer(self.tokenizer, self.ids))
        return self._delta(text.strip()), None

    @property
    def text(self) -> str:
        """The whole answer as sent (after finish)."""
        return self.sent

    # -------------------------------------------------------------------------------------------- helpers

    def _raw(self) -> str:
        return decode_text(self.tokenizer, self.ids)

    def _cut(self, text: str) -> Tuple[str, bool]:
        """The text before the first stop string, and whether there was one."""
        cuts = [text.find(s) for s in self.stop if s in text]
        return (text[:min(cuts)].rstrip(), True) if cuts else (text, False)

    def _settled(self, text: str) -> str:
        """The part of `text` no later token can change."""
        text = text.rstrip(REPLACEMENT).rstrip()
        for s in self.stop:  # a tail that may grow into a stop string
            for size in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:size]):
                    text = text[:-size]
                    break
        return text

    def _delta(self, text: str) -> str:
        if not text.startswith(self.sent):  # the tokenizer re-read earlier text differently: wait for the end
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
