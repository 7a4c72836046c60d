"""From answer token ids to what the client sees: text deltas that never split a character, `stop` strings cut
out, and a ChatGLM3 tool call held back until it can be parsed whole.

Per token only a short window of ids is decoded (`IncrementalText`, the scheme of vLLM's and THUDM's servers):
decoding the whole answer again for every token made a 2,000-token answer cost seconds of tokenizer time and held
up every other request on the event loop. The final text is still `decode_answer(ids)` (what infer_generation.py
prints), read once at the end, so a stream's deltas join to exactly the non-streamed content. A delta is sent only
when it cannot change any more: a partial UTF-8 sequence, trailing whitespace (the final text is stripped) and any
tail that could begin a stop string wait for the next token.
"""
from typing import List, Optional, Tuple

from glm_tune.data.tool_calls import parse_tool_call
from glm_tune.generation import decode_answer, decode_text

REPLACEMENT = "\ufffd"


class IncrementalText:
    """`decode_text` of a growing list of ids, decoding per token only the ids since the last complete character
    plus the piece before them (a SentencePiece decode reads a piece's leading space by its neighbour): two decodes
    of a few ids, as vLLM's detokenizer does. (A window of 16 ids measured twice as slow: PaddleNLP's decode costs
    by length.)"""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self.text = ""  # the text of ids[:self._read], complete characters only
        self.rereads = 0  # times the whole text was read again (earlier text may have changed)
        self._start = self._read = 0  # the window: ids[_start:_read] is the piece before the unread ids
        self._before = ""  # decode of ids[_start:_read]

    def add(self, token: int) -> None:
        self.ids.append(int(token))
        now = decode_text(self.tokenizer, self.ids[self._start:])
        if len(now) <= len(self._before) or now.endswith(REPLACEMENT):
            return  # a character's bytes still arriving
        if now.startswith(self._before):
            self.text += now[len(self._before):]
        else:  # the window's start reads differently alone (ChatGLM-6B's runs of <|blank_n|>): read it all once
            self.text = decode_text(self.tokenizer, self.ids)
            self.rereads += 1
        self._start, self._read = self._read, len(self.ids)
        self._before = decode_text(self.tokenizer, self.ids[self._start:self._read])


class AnswerText:
    """`call_opener`: ChatGLM3's <|assistant|> id. After a thought, THUDM's models open a second assistant turn
    for the call (`\\nthought<|assistant|>get_weather\\n```python ...`, the layout of THUDM's tool data, which
    this suite's training learns; THUDM's process_response returns the call): the thought is the answer's
    content, the turn after it is held back as a call."""

    def __init__(self, tokenizer, stop: List[str] = (), tool_names=None, call_opener: Optional[int] = None):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tool_names = set(tool_names or ())  # None/empty: the answer is plain text, never a tool call
        self.call_opener = call_opener if self.tool_names else None
        self.call_start = 0  # where the ids of a held-back call begin
        self.decoded = IncrementalText(tokenizer)
        self.sent = ""
        self.stopped = False  # a stop string was generated
        self.first_line = None  # ChatGLM3's metadata line, once complete: "" for plain text, a tool's name for a call
        self.holding_call = False  # a metadata line was written: a tool call until proven otherwise
        self._searched = 0  # the text before this offset holds no stop string
        self._longest_stop = max((len(s) for s in self.stop), default=0)

    @property
    def ids(self) -> List[int]:
        return self.decoded.ids

    def add(self, token: int) -> str:
        """Record a token; the new text that is safe to send now ("" when nothing is)."""
        if token == self.call_opener and not self.holding_call:
            self.decoded.add(token)  # a special token: no text of its own
            self.holding_call, self.call_start = True, len(self.ids)
            return ""
        rereads = self.decoded.rereads
        self.decoded.add(token)
        raw = self.decoded.text
        if self.decoded.rereads != rereads:
            self._searched = 0
        if self.tool_names and self.first_line is None:
            if "\n" not in raw:
                return ""
            self.first_line = raw.partition("\n")[0].strip()
            self.holding_call = bool(self.first_line)
        if self.holding_call:
            return ""
        text = raw.lstrip()
        cut = self._first_stop(text, self._searched)
        self._searched = len(text)
        if cut is not None:
            self.stopped = True
            return self._delta(text[:cut].rstrip())
        return self._delta(self._settled(text))

    def finish(self) -> Tuple[str, Optional[Tuple[str, dict]]]:
        """(the rest of the text not yet sent, (tool name, arguments) or None) once generation has ended."""
        if self.holding_call:
            call = parse_tool_call(decode_text(self.tokenizer, self.ids[self.call_start:]))
            if call is not None and call[0] in self.tool_names:
                thought = decode_answer(self.tokenizer, self.ids[:max(self.call_start - 1, 0)])
                return self._delta(thought), call
        text = decode_answer(self.tokenizer, self.ids)  # the whole answer, decoded once
        cut = self._first_stop(text, 0)
        self.stopped = cut is not None
        return self._delta(text if cut is None else text[:cut].rstrip()), None

    @property
    def text(self) -> str:
        """The whole answer as sent (after finish)."""
        return self.sent

    # -------------------------------------------------------------------------------------------- helpers

    def _first_stop(self, text: str, searched: int) -> Optional[int]:
        """Where the first stop string begins in `text`, looking only where one may end past `searched`."""
        start = max(0, searched - self._longest_stop + 1)
        found = [at for at in (text.find(s, start) for s in self.stop) if at >= 0]
        return min(found) if found else None

    def _settled(self, text: str) -> str:
        """The part of `text` no later token can change."""
        text = text.rstrip().rstrip(REPLACEMENT).rstrip()  # as decode_answer ends an answer
        for s in self.stop:  # a tail that may grow into a stop string
            for size in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:size]):
                    text = text[:-size]
                    break
        return text.rstrip()  # the space before a possible stop string is cut with it if it comes

    def _delta(self, text: str) -> str:
        if not text.startswith(self.sent):  # the tokenizer re-read earlier text differently: wait for the end
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
