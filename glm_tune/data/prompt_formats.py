"""Prompt formats: how each ChatGLM generation turns a question, its history or a conversation into ids.

Tokenization follows THUDM's own fine-tuning code for each generation:
  chatglm   "[Round {i}]\n问：{q}\n答：" text, then [gMASK] <sop> answer <eop>; 2-D positions
  chatglm2  [gMASK] sop "[Round {i}]\n\n问：{q}\n\n答：" answer </s>
  chatglm3  [gMASK] sop <|user|>\n q <|assistant|> \n answer </s>  (role tokens, history as earlier turns)
Labels are already shifted (labels[i] is the token after input_ids[i]) and are -100 on the prompt and padding;
that is what PaddleNLP's ChatGLM models expect. Prompts longer than `src_length` lose their oldest turns first,
then the end of the user's question; the template (round headers, role tokens, answer cue) is never cut. Answers
are cut at `tgt_length` and always end with the end-of-answer token. Formats count what they cut.
"""
from typing import List, Tuple

from glm_tune.data.examples import IGNORE_INDEX, DataFormatError, Example
from glm_tune.data.records import answer_text


class PromptFormat:
    """How one generation turns (history, question) into prompt ids and an answer into target ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cut_prompts = 0  # prompts shortened to src_length so far (reported by the callers)
        self.cut_answers = 0  # answers shortened to tgt_length so far
        self.cut_conversations = 0  # conversations cut to src_length + tgt_length so far (ChatGLM3)

    def encode(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prefix_ids(self) -> List[int]:
        """Ids that start every prompt and survive truncation."""
        return []

    def suffix_ids(self) -> List[int]:
        """Ids that end every prompt (the answer cue) and survive truncation."""
        return []

    def body_ids(self, query: str, history) -> List[int]:
        raise NotImplementedError

    def _assemble(self, query: str, history) -> List[int]:
        return self.prefix_ids() + self.body_ids(query, history) + self.suffix_ids()

    def prompt_ids(self, query: str, history=(), src_length: int = None) -> List[int]:
        """The prompt as THUDM's tokenizer builds it. Longer than `src_length`: the oldest turns go first, then
        the end of the user's question; the template (round headers, role tokens, answer cue) always stays."""
        ids = self._assemble(query, history)
        if src_length is None or len(ids) <= src_length:
            return ids
        self.cut_prompts += 1
        history = list(history)
        if history and len(self._assemble(query, [])) <= src_length:
            # The fewest oldest turns to drop, by bisection: fewer turns never make a longer prompt, and each try
            # tokenizes the whole prompt, so dropping one turn at a time was quadratic (10,000 turns: minutes).
            fewest, most = 1, len(history)
            while fewest < most:
                middle = (fewest + most) // 2
                if len(self._assemble(query, history[middle:])) <= src_length:
                    most = middle
                else:
                    fewest = middle + 1
            return self._assemble(query, history[fewest:])
        template = len(self._assemble("", []))
        if template > src_length:
            raise DataFormatError(f"--src_length {src_length} cannot hold this generation's prompt template "
                                  f"({template} tokens); raise --src_length")
        kept, too_many = 0, len(query)  # the longest start of the question that fits, by bisection
        while kept < too_many:
            middle = (kept + too_many + 1) // 2
            if len(self._assemble(query[:middle], [])) <= src_length:
                kept = middle
            else:
                too_many = middle - 1
        return self._assemble(query[:kept], [])

    def answer_ids(self, answer: str) -> List[int]:
        return self.encode(answer)

    def chat_prompt_ids(self, turns) -> List[int]:
        """The prompt of a conversation (`ChatTurn`s) that ends with the user's question, untruncated. These
        generations know only (question, answer) rounds: earlier user/assistant pairs become the history THUDM's
        chat() builds, and system text, which has no role here, opens the first question."""
        return self._assemble(*self.history_form(turns))

    @staticmethod
    def history_form(turns) -> tuple:
        """(question, [(question, answer), ...]) of a system/user/assistant conversation ending with a question."""
        system = [t.content for t in turns if t.role == "system"]
        rounds = [t for t in turns if t.role != "system"]
        for number, turn in enumerate(rounds):
            expected = "user" if number % 2 == 0 else "assistant"
            if turn.role != expected:
                raise DataFormatError(f"this model takes user and assistant messages in turn, starting and ending "
                                      f"with the user's (found {turn.role!r} where {expected!r} belongs; tool "
                                      "calls and observations need ChatGLM3)")
        if not rounds or rounds[-1].role != "user":
            raise DataFormatError("the conversation must end with a user message")
        questions = [t.content for t in rounds[::2]]
        if system:
            questions[0] = "\n".join(system + [questions[0]])
        return questions[-1], list(zip(questions[:-1], [t.content for t in rounds[1::2]]))

    def turns_prompt_ids(self, turns, src_length: int = None) -> List[int]:
        """The prompt for the answer after a system/user/assistant conversation that ends with a question."""
        return self.prompt_ids(*self.history_form(turns), src_length=src_length)

    def conversation_example(self, turns) -> Example:
        """A conversation up to its last assistant answer as this generation's (question, answer, history): only
        that answer is learned, as THUDM's multi-turn fine-tuning of these models does."""
        last = max((i for i, t in enumerate(turns) if t.role == "assistant"), default=None)
        if last is None:
            raise DataFormatError("a conversation for this model needs an assistant answer to learn")
        question, history = self.history_form(turns[:last])
        return Example(question, turns[last].content, history)

    def conversation_features(self, turns, src_length: int, tgt_length: int, is_test: bool = False) -> dict:
        return tokenize_example(self, self.conversation_example(turns), src_length, tgt_length, is_test)

    def eval_items(self, example: Example, src_length: int) -> List[Tuple[List[int], str]]:
        """(prompt ids, reference answer) pairs generation-based evaluation scores for one dev record."""
        if example.conversation is not None:
            example = self.conversation_example(example.conversation)
        return [(self.prompt_ids(example.src, example.history, src_length), example.tgt)]

    def target_ids(self, answer: str, tgt_length: int = None) -> List[int]:
        eos = [self.tokenizer.eos_token_id]
        ids = self.answer_ids(answer)
        if tgt_length is not None and len(ids) > tgt_length - 1:
            self.cut_answers += 1
            ids = ids[: max(tgt_length - 1, 0)]
        return ids + eos


class ChatGLMFormat(PromptFormat):
    """ChatGLM-6B: text prompt, then [gMASK] <sop> opens the answer (THUDM ptuning/main.py)."""

    def body_ids(self, query, history):
        if not history:
            return self.encode(query)
        text = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
        return self.encode(text + f"[Round {len(history)}]\n问：{query}\n答：")

    def suffix_ids(self):
        return [self.tokenizer.gmask_token_id, self.tokenizer.bos_token_id]


class ChatGLM2Format(PromptFormat):
    """ChatGLM2-6B: [gMASK] sop, then tokenizer.build_prompt's "[Round i]\\n\\n问：…\\n\\n答：" text."""

    def encode(self, text):
        # Plain SentencePiece, as THUDM's tokenizer does: user text never turns into special tokens.
        return self.tokenizer.tokenizer.encode(text)

    def prefix_ids(self):
        return [self.tokenizer.get_command("[gMASK]"), self.tokenizer.get_command("sop")]

    def body_ids(self, query, history):
        text = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history, start=1))
        return self.encode(text + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答：")


class ChatGLM3Format(ChatGLM2Format):
    """ChatGLM3-6B: role tokens, each message "<|role|>" + metadata + "\\n" + text (THUDM build_single_message)."""

    ROLES = ("system", "user", "assistant", "observation")

    def role_id(self, role: str) -> int:
        return self.tokenizer.get_command(f"<|{role}|>")

    def message(self, role: str, text: str, metadata: str = "") -> List[int]:
        # the role's special id, then metadata line and text encoded apart, as build_single_message does
        return [self.role_id(role)] + self.encode(metadata + "\n") + self.encode(text)

    def chat_prompt_ids(self, turns) -> List[int]:
        """A whole conversation in role tokens (tool calls and observations too), ending with the answer cue."""
        for number, turn in enumerate(turns):
            if turn.role not in self.ROLES:
                raise DataFormatError(f"message {number}: role {turn.role!r} is not one of {', '.join(self.ROLES)}")
        if not turns or turns[-1].role not in ("user", "observation"):
            raise DataFormatError("the conversation must end with a user message or a tool result")
        ids = self.prefix_ids()
        for turn in turns:
            ids += self.message(turn.role, turn.content, turn.metadata)
        return ids + self.suffix_ids()

    def body_ids(self, query, history):
        ids = []
        for q, a in history:
            ids += self.message("user", q) + self.message("assistant", a)
        return ids + self.message("user", query)

    def suffix_ids(self):
        return [self.role_id("assistant")]

    def conversation_features(self, turns, src_length: int, tgt_length: int, is_test: bool = False,
                              shift: bool = True):
        """THUDM's ChatGLM3 layout: [gMASK] sop, each message built by `message`, eos. A learned message's tokens
        are masked true (its role token too, as THUDM's preprocessing does); label j is token j+1 where mask j is
        true: so the metadata line, the content and the token after the turn (next role token or eos) are
        learned, the role token opening the turn is not. Longer than src_length + tgt_length: cut from the end;
        None when nothing learnable is left (the caller skips and counts it). `shift=False` gives the whole ids
        with unshifted labels, for trainers that shift labels themselves (transformers, in qlora/)."""
        if is_test:
            last = max(i for i, t in enumerate(turns) if t.role == "assistant")
            return {"input_ids": self.turns_prompt_ids(turns[:last], src_length),
                    "labels": self.message("assistant", turns[last].content, turns[last].metadata)[1:]
                    + [self.tokenizer.eos_token_id]}
        ids, mask = self.prefix_ids(), [False] * len(self.prefix_ids())
        for turn in turns:
            piece = self.message(turn.role, turn.content, turn.metadata)
            ids += piece
            mask += [turn.learned] * len(piece)
        ids.append(self.tokenizer.eos_token_id)
        mask.append(False)
        budget = src_length + tgt_length
        if len(ids) > budget:
            self.cut_conversations += 1
            ids, mask = ids[:budget], mask[:budget]
        labels = [ids[j + 1] if mask[j] else IGNORE_INDEX for j in range(len(ids) - 1)]
        if all(label == IGNORE_INDEX for label in labels):
            return None
        return {"input_ids": ids[:-1], "labels": labels} if shift else {"input_ids": ids,
                                                                         "labels": [IGNORE_INDEX] + labels}

    def turns_prompt_ids(self, turns, src_length: int = None) -> List[int]:
        """The prompt for the answer after `turns`; too long: the oldest non-system turns go first, then the end."""
        pieces = [self.message(t.role, t.content, t.metadata) for t in turns]  # each message encoded once
        frame = len(self.prefix_ids()) + len(self.suffix_ids())
        length = frame + sum(map(len, pieces))
        kept = [True] * len(pieces)
        if src_length is not None and length > src_length:
            self.cut_prompts += 1
            droppable = (i for i, t in enumerate(turns[:-1]) if t.role != "system")  # oldest first
            while length > src_length:
                dropped = next(droppable, None)
                if dropped is None:
                    ids = [i for piece, keep in zip(pieces, kept) if keep for i in piece]
                    return (self.prefix_ids() + ids)[:src_length - 1] + self.suffix_ids()
                kept[dropped] = False
                length -= len(pieces[dropped])
        return self.prefix_ids() + [i for piece, keep in zip(pieces, kept) if keep for i in piece] + \
            self.suffix_ids()

    def eval_items(self, example, src_length: int):
        """Every assistant turn of a conversation is scored, its prompt being the turns before it: a tool call's
        reference is the call (scored as name and arguments), a plain answer's the text."""
        if example.conversation is None:
            return super().eval_items(example, src_length)
        turns = example.conversation
        return [(self.turns_prompt_ids(turns[:k], src_length), answer_text(turn))
                for k, turn in enumerate(turns) if turn.role == "assistant"]

    def answer_ids(self, answer):
        return self.encode("\n") + self.encode(answer)


def cut_summary(fmt: PromptFormat, total: int, src_length: int, tgt_length: int = None) -> str:
    """A log line for what `fmt` cut since the last summary ("" when nothing), then its counts start again."""
    prompts, answers, conversations = fmt.cut_prompts, fmt.cut_answers, fmt.cut_conversations
    fmt.cut_prompts = fmt.cut_answers = fmt.cut_conversations = 0
    if not prompts and not (answers and tgt_length) and not conversations:
        return ""
    line = f"cut {prompts} of {total} prompts to --src_length {src_length} (template kept, the question's end dropped)"
    line += f" and {answers} answers to --tgt_length {tgt_length}" if tgt_length else ""
    if conversations:
        line += f"; cut {conversations} conversations at their end to --src_length + --tgt_length"
    return line


PROMPT_FORMATS = {"chatglm": ChatGLMFormat, "chatglm2": ChatGLM2Format, "chatglm3": ChatGLM3Format}


def get_prompt_format(generation: str, tokenizer) -> PromptFormat:
    return PROMPT_FORMATS[generation](tokenizer)


def tokenize_example(fmt: PromptFormat, example: Example, src_length: int, tgt_length: int,
                     is_test: bool = False) -> dict:
    """Training features (`input_ids`, shifted `labels`) or, with is_test, the prompt alone plus the
    reference answer ids for scoring. A conversation goes through its generation's layout (None: nothing left to
    learn after cutting)."""
    if example.conversation is not None:
        return fmt.conversation_features(example.conversation, src_length, tgt_length, is_test)
    prompt = fmt.prompt_ids(example.src, example.history, src_length)
    if is_test:
        return {"input_ids": prompt, "labels": fmt.target_ids(example.tgt, tgt_length)}
    target = fmt.target_ids(example.tgt, tgt_length)
    full = prompt + target
    labels = [IGNORE_INDEX] * (len(prompt) - 1) + target
    return {"input_ids": full[:-1], "labels": labels}
