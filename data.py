"""Data for ChatGLM fine-tuning: record readers, per-generation prompt formats, tokenization and batching.

Record contract: every reader returns `Example(src, tgt, history)`: the user's question, the answer to learn, and
earlier turns as (question, answer) pairs. Formats read (one JSON object per line, or one JSON list):
  AdvertiseGen        {"content": ..., "summary": ...}                      (optional "history")
  instruction data    {"instruction": ..., "input": ..., "output": ..., "history": [[q, a], ...]}
  BelleGroup math     {"instruction": ..., "output": ...}                   (school_math_0.25M)
Bad input raises DataFormatError naming the file and line; `skip_bad_records=True` skips such records and
reports how many.

Tokenization follows THUDM's own fine-tuning code for each generation:
  chatglm   "[Round {i}]\n问：{q}\n答：" text, then [gMASK] <sop> answer <eop>; 2-D positions
  chatglm2  [gMASK] sop "[Round {i}]\n\n问：{q}\n\n答：" answer </s>
  chatglm3  [gMASK] sop <|user|>\n q <|assistant|> \n answer </s>  (role tokens, history as earlier turns)
Labels are already shifted (labels[i] is the token after input_ids[i]) and are -100 on the prompt and padding;
that is what PaddleNLP's ChatGLM models expect. Prompts longer than `src_length` lose their oldest turns first,
then the end of the user's question; the template (round headers, role tokens, answer cue) is never cut. Answers
are cut at `tgt_length` and always end with the end-of-answer token. Formats count what they cut.
"""
import ast
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

from glm_tune.errors import GlmTuneError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class DataFormatError(GlmTuneError):
    """Input data that cannot be used; the message names the file, the line and what to fix."""


@dataclass
class Example:
    src: str
    tgt: str = ""
    history: List[Tuple[str, str]] = field(default_factory=list)
    conversation: Optional[list] = None  # ChatTurns of a `conversations` record (roles, tools, per-message loss)


# ---------------------------------------------------------------------------------- ChatGLM3 tool calls


@dataclass
class ChatTurn:
    """One message: role system | user | assistant | observation; an assistant tool call carries the tool's name
    as `metadata` (ChatGLM3)."""
    role: str
    content: str
    metadata: str = ""
    loss: Optional[bool] = None  # learned? None: assistant turns are, the others are not

    @property
    def learned(self) -> bool:
        return self.role == "assistant" if self.loss is None else self.loss


TOOLS_PREAMBLE = "Answer the following questions as best as you can. You have access to the following tools:"


def tools_system_text(tools: list) -> str:
    """The system message THUDM's ChatGLM3 tokenizer builds for a list of tools."""
    return TOOLS_PREAMBLE + "\n" + json.dumps(tools, indent=4, ensure_ascii=False)


def _finite_json(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return False
    return True


def tool_call_turn(name: str, arguments: dict) -> ChatTurn:
    """An assistant turn that calls `name`: metadata = the name, content = a fenced `tool_call(k=v, ...)` with
    Python literals (how THUDM's tool-use fine-tuning data renders calls)."""
    bad = [k for k in arguments if not (isinstance(k, str) and k.isidentifier())]
    if bad:
        raise DataFormatError(f"tool {name!r}: argument names {bad} are not identifiers; tool_call(...) cannot "
                              "carry them")
    not_json = [k for k, v in arguments.items() if not _finite_json(v)]
    if not_json:  # Python's JSON reader takes NaN, Infinity and 1e309; JSON has none, and the call is JSON's
        raise DataFormatError(f"parameters {not_json} are NaN or infinite (tool {name!r}); a tool call's arguments "
                              "must be JSON values")
    call = ast.Call(func=ast.Name(id="tool_call"), args=[],
                    keywords=[ast.keyword(arg=k, value=ast.Constant(v)) for k, v in arguments.items()])
    return ChatTurn("assistant", "```python\n" + ast.unparse(call) + "\n```", metadata=name)


def parse_tool_call(text: str):
    """(name, arguments) of a generated ChatGLM3 tool call (a metadata line with the tool's name, then a fenced
    `tool_call(k=v, ...)`), or None when `text` is a plain answer or not a well-formed call. The call is read
    with `ast` and its arguments with `ast.literal_eval`: nothing the model wrote is ever evaluated."""
    name, newline, body = text.partition("\n")
    name, body = name.strip(), body.strip()
    if not name or not newline or any(c.isspace() for c in name):
        return None
    if body.startswith("```"):  # ```python ... ```
        body = body.partition("\n")[2].rstrip().removesuffix("```")
    try:
        call = ast.parse(body, mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"
                and not call.args and all(k.arg for k in call.keywords)):
            return None
        arguments = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        # Only arguments JSON can carry make a call (a set, bytes, a complex number, NaN are not): anything else
        # is the model's plain text, as THUDM's server treats a call it cannot parse.
        if json.loads(json.dumps(arguments, allow_nan=False)) != arguments:
            return None
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None
    return name, arguments


# ----------------------------------------------------------------------------------------------- reading


def check_regular_file(path: Path, what: str) -> None:
    """`path` is a regular file: a folder, a missing path and a device or pipe (which would be read forever, or
    block) are each named for what they are."""
    if path.is_dir():
        raise DataFormatError(f"{path} is a folder, not a {what}; pass the JSON file itself")
    if not path.exists():
        raise DataFormatError(f"{path}: file not found")
    if not path.is_file():
        kind = ("a named pipe (FIFO)" if path.is_fifo() else "a device" if path.is_char_device() or
                path.is_block_device() else "a socket" if path.is_socket() else "not a regular file")
        raise DataFormatError(f"{path} is {kind}, not a {what}; pass a JSON file saved on disk")


def read_text_file(path, what: str = "data file") -> str:
    """The text of a UTF-8 file (a byte-order mark, as Notepad writes, is dropped); anything else is a
    DataFormatError naming the file, the line and how to fix it."""
    path = Path(path)
    check_regular_file(path, what)
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataFormatError(f"{path} is UTF-16 text; save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataFormatError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                              f"save the {what} as UTF-8") from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise DataFormatError(f"{path}:{line}: holds NUL bytes, so it is a binary file, not a JSON {what}")
    return text


def iter_json_records(path: Path) -> Iterator[Tuple[int, object]]:
    """(line number, parsed object) for a JSON-lines file or a file holding one JSON list."""
    text = read_text_file(path)
    if not text.strip():
        raise DataFormatError(f"{path}: file is empty; expected JSON lines or a JSON list of records")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{err.lineno}: malformed JSON ({err.msg}, column {err.colno})") from None
        # A JSON list has no per-record line numbers once parsed; find each record's opening line instead.
        starts = _record_start_lines(text, len(items))
        yield from zip(starts, items)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            yield lineno, DataFormatError(f"{path}:{lineno}: malformed JSON ({err.msg}, column {err.colno})")


def _record_start_lines(text: str, count: int) -> List[int]:
    """Line number where each top-level element of a JSON list begins."""
    decoder, starts, pos, line = json.JSONDecoder(), [], text.index("[") + 1, 1
    line += text.count("\n", 0, pos)
    while len(starts) < count:
        while text[pos] in " \t\r\n,":
            line += text[pos] == "\n"
            pos += 1
        starts.append(line)
        _, end = decoder.raw_decode(text, pos)
        line += text.count("\n", pos, end)
        pos = end
    return starts


def _require_str(record: dict, key: str, where: str, hint: str) -> str:
    if key not in record:
        raise DataFormatError(f"{where}: missing field {key!r} ({hint})")
    value = record[key]
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _read_history(record: dict, where: str) -> List[Tuple[str, str]]:
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataFormatError(f"{where}: field 'history' must be a list of [question, answer] pairs")
    turns = []
    for i, turn in enumerate(history):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise DataFormatError(f"{where}: history[{i}] must be a [question, answer] pair of strings, got {turn!r}")
        turns.append((turn[0], turn[1]))
    return turns


def record_to_example(record, where: str, require_target: bool = True) -> Example:
    """Validate one parsed record (AdvertiseGen or instruction shape) and turn it into an Example."""
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    history = _read_history(record, where)
    if "content" in record:
        hint = "AdvertiseGen records need 'content' and 'summary'"
        src = _require_str(record, "content", where, hint)
        tgt = _require_str(record, "summary", where, hint) if require_target else record.get("summary", "")
    elif "instruction" in record:
        hint = "instruction records need 'instruction' and 'output' ('input' and 'history' optional)"
        src = _require_str(record, "instruction", where, hint)
        extra = record.get("input", "")
        if not isinstance(extra, str):
            raise DataFormatError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
        src = f"{src}\n{extra}" if extra.strip() else src
        tgt = _require_str(record, "output", where, hint) if require_target else record.get("output", "")
    else:
        raise DataFormatError(
            f"{where}: record has neither 'content' (AdvertiseGen) nor 'instruction' (instruction / BelleGroup "
            f"data); fields found: {sorted(record)}"
        )
    return Example(src, tgt if isinstance(tgt, str) else "", history)


CONVERSATION_ROLES = ("system", "user", "assistant", "observation", "tool")
DATA_FORMATS = ("conversations", "content", "instruction")


def record_to_conversation(record, where: str) -> Example:
    """A `conversations` record ({"tools": [...], "conversations": [messages]}, THUDM's ChatGLM3 format) as an
    Example whose `conversation` holds the turns; src/tgt/history hold its last question and answer."""
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    messages, tools = record.get("conversations"), record.get("tools")
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{where}: 'conversations' must be a non-empty list of messages")
    if tools is not None and not isinstance(tools, list):
        raise DataFormatError(f"{where}: 'tools' must be a list of tool descriptions, got {type(tools).__name__}")
    for number, tool in enumerate(tools or []):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise DataFormatError(f"{where}: tools[{number}] must be an object with a 'name' (and 'description', "
                                  f"'parameters'), got {json.dumps(tool, ensure_ascii=False)[:80]}")
    turns = [ChatTurn("system", tools_system_text(tools))] if tools else []
    seen_user, called = False, False
    for number, message in enumerate(messages):
        at = f"{where}: conversations[{number}]"
        if not isinstance(message, dict):
            raise DataFormatError(f"{at} must be an object with 'role' and 'content'")
        role, loss = message.get("role"), message.get("loss")
        if role not in CONVERSATION_ROLES:
            raise DataFormatError(f"{at}: unknown role {role!r}; roles are {', '.join(CONVERSATION_ROLES)}")
        if loss is not None and not isinstance(loss, bool):
            raise DataFormatError(f"{at}: 'loss' must be true or false, got {loss!r}")
        if role == "tool":
            name, arguments = message.get("name"), message.get("parameters")
            if not isinstance(name, str) or not name:
                raise DataFormatError(f"{at}: a 'tool' message needs 'name' (the tool called)")
            if not isinstance(arguments, dict):
                raise DataFormatError(f"{at}: a 'tool' message needs 'parameters' (an object of the call's arguments)")
            try:
                call = tool_call_turn(name, arguments)
            except DataFormatError as err:
                raise DataFormatError(f"{at}: {err}") from None
            called = True
            call.loss = loss
            turns.append(call)
            if "observation" in message:
                seen = message["observation"]  # the result of the call just made
                turns.append(ChatTurn("observation", seen if isinstance(seen, str) else
                                      json.dumps(seen, ensure_ascii=False)))
            continue
        if role == "observation" and not called:
            raise DataFormatError(f"{at}: an observation (a tool's result) before any tool call; a 'tool' message "
                                  "comes first")
        content, metadata = message.get("content"), message.get("metadata", "")
        if not isinstance(content, str):
            raise DataFormatError(f"{at}: 'content' must be a string, got {type(content).__name__}")
        if not isinstance(metadata, str):
            raise DataFormatError(f"{at}: 'metadata' must be a string, got {type(metadata).__name__}")
        if role == "system" and seen_user:
            raise DataFormatError(f"{at}: a system message after a user message; system messages come first")
        seen_user |= role == "user"
        turns.append(ChatTurn(role, content, metadata, loss))
    if not any(t.learned for t in turns):
        raise DataFormatError(f"{where}: nothing to learn (no assistant message, and no message with loss: true)")
    last = max(i for i, t in enumerate(turns) if t.role == "assistant") if any(
        t.role == "assistant" for t in turns) else None
    answer = turns[last] if last is not None else ChatTurn("assistant", "")
    question = next((t.content for t in reversed(turns[:last]) if t.role == "user"), "") if last else ""
    return Example(question, answer_text(answer), conversation=turns)


def answer_text(turn: ChatTurn) -> str:
    """An assistant turn as the model writes it after its role token: the metadata line (a tool's name), then the
    content; what generation decodes to and evaluation compares against."""
    return f"{turn.metadata}\n{turn.content}" if turn.metadata else turn.content


def check_no_lone_surrogate(value, where: str, fix: str = "fix its escape in the file") -> None:
    """JSON may escape half of a UTF-16 pair ("\\ud800") that is no character: the tokenizer fails on it deep
    inside, so such a record is refused here, naming it."""
    pending = [value]  # a stack, not recursion: a record may nest as deep as the JSON parser allowed
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise DataFormatError(f"{where}: text holds a lone surrogate (U+{ord(value[err.start]):04X}, half "
                                      f"of a UTF-16 pair, at character {err.start}); {fix}") from None
        elif isinstance(value, dict):
            pending += [*value.keys(), *value.values()]
        elif isinstance(value, list):
            pending += value


def read_record(record, where: str, require_target: bool = True, data_format: str = None) -> Example:
    """One record of the format asked for, or of the format its fields show."""
    if data_format not in (None,) + DATA_FORMATS:
        raise DataFormatError(f"--data_format {data_format!r}: choose one of {', '.join(DATA_FORMATS)}")
    check_no_lone_surrogate(record, where)
    if data_format == "conversations" or (data_format is None and isinstance(record, dict)
                                          and "conversations" in record):
        return record_to_conversation(record, where)
    if data_format and isinstance(record, dict) and data_format not in record:
        raise DataFormatError(f"{where}: --data_format {data_format} records need a {data_format!r} field; "
                              f"fields found: {sorted(record)}")
    return record_to_example(record, where, require_target)


def read_examples(path, skip_bad_records: bool = False, require_target: bool = True,
                  data_format: str = None, offer_skip: bool = False) -> List[Example]:
    """All examples in `path` (any supported format). Bad records raise, or are skipped and counted.
    `offer_skip`: the caller has --skip_bad_records, so the error suggests it (commands without it must not)."""
    path = Path(path)
    examples, bad = [], []
    for lineno, record in iter_json_records(path):
        try:
            if isinstance(record, DataFormatError):
                raise record
            examples.append(read_record(record, f"{path}:{lineno}", require_target, data_format))
        except DataFormatError as err:
            if not skip_bad_records:
                hint = " (pass --skip_bad_records True to skip such records)" if offer_skip else ""
                raise DataFormatError(f"{err}{hint}") from None
            bad.append(str(err))
    if bad:
        logger.warning("skipped %d bad record(s) of %d in %s; first: %s", len(bad), len(bad) + len(examples),
                       path, bad[0])
    if not examples:
        raise DataFormatError(f"{path}: no usable records" + (f" ({len(bad)} skipped as bad)" if bad else ""))
    return examples


def task_file(task_name_or_path, split: str) -> Path:
    """`train.json` / `dev.json` inside the task folder, with an error that says what is expected."""
    folder = Path(task_name_or_path)
    if not folder.is_dir():
        raise DataFormatError(
            f"--task_name_or_path {folder} is not a folder; it must hold train.json and dev.json "
            "(python tools/make_demo_data.py --output_dir DIR writes a demo one)"
        )
    path = folder / f"{split}.json"
    if path.is_dir():
        raise DataFormatError(f"{path} is a folder, not a data file; --task_name_or_path must hold train.json and "
                              "dev.json files")
    if not path.exists():
        raise DataFormatError(f"{path} not found: --task_name_or_path must hold train.json and dev.json")
    check_regular_file(path, "data file")
    return path


# ------------------------------------------------------------------------------------------ tokenization


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


# ----------------------------------------------------------------------------------------------- batching


def chatglm_position_ids(input_ids: List[int], gmask_id: int, bos_id: int) -> np.ndarray:
    """ChatGLM-6B's 2-D positions [2, L]: absolute positions that stop at [gMASK] for the answer, and block
    positions 1, 2, … counting from <sop>."""
    length = len(input_ids)
    context = input_ids.index(bos_id) if bos_id in input_ids else length
    mask_pos = input_ids.index(gmask_id) if gmask_id in input_ids else context - 1
    position = np.arange(length, dtype="int64")
    position[context:] = mask_pos
    block = np.concatenate([np.zeros(context, "int64"), np.arange(1, length - context + 1, dtype="int64")])
    return np.stack([position, block])


def chatglm_attention_mask(input_ids: List[int], bos_id: int) -> np.ndarray:
    """ChatGLM-6B's [1, L, L] mask (1 = may attend): the prompt is seen bidirectionally, the answer causally."""
    length = len(input_ids)
    context = input_ids.index(bos_id) if bos_id in input_ids else length
    mask = np.tril(np.ones((length, length), dtype="int64"))
    mask[:, :context] = 1
    return mask[None]


class DataCollator:
    """Left-pads a list of features into a batch with the masks and positions the generation expects.

    v1: `position_ids` [B, 2, L] and a 4-D `attention_mask` [B, 1, L, L]; v2/v3: a 2-D `attention_mask`
    [B, L] (1 = token) and `position_ids` [B, L] that start at 0 on the first real token, so a padded row gets
    exactly the positions it would get alone (THUDM/ChatGLM-6B #841, #648 are what happens otherwise).
    """

    def __init__(self, tokenizer, generation: str, pad_to_multiple_of: int = None):
        self.tokenizer = tokenizer
        self.generation = generation
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: List[dict]) -> dict:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_id = self.tokenizer.pad_token_id
        batch = {"input_ids": [], "attention_mask": [], "position_ids": []}
        has_labels = "labels" in features[0] and len(features[0]["labels"]) == len(features[0]["input_ids"])
        if has_labels:
            batch["labels"] = []
        for f in features:
            ids = list(f["input_ids"])
            pad = length - len(ids)
            batch["input_ids"].append([pad_id] * pad + ids)
            if has_labels:
                batch["labels"].append([IGNORE_INDEX] * pad + list(f["labels"]))
            if self.generation == "chatglm":
                tok = self.tokenizer
                mask = np.pad(chatglm_attention_mask(ids, tok.bos_token_id), [(0, 0), (pad, 0), (pad, 0)])
                pos = np.pad(chatglm_position_ids(ids, tok.gmask_token_id, tok.bos_token_id), [(0, 0), (pad, 0)])
            else:
                mask = np.array([0] * pad + [1] * len(ids), dtype="int64")
                pos = np.array([0] * pad + list(range(len(ids))), dtype="int64")
            batch["attention_mask"].append(mask)
            batch["position_ids"].append(pos)
        return {k: np.asarray(v, dtype="int64") for k, v in batch.items()}
