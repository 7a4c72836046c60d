"""Record readers: JSON lines or a JSON list, checked record by record.

Record contract: every reader returns `Example(src, tgt, history)`: the user's question, the answer to learn, and
earlier turns as (question, answer) pairs. Formats read (one JSON object per line, or one JSON list):
  AdvertiseGen        {"content": ..., "summary": ...}                      (optional "history")
  instruction data    {"instruction": ..., "input": ..., "output": ..., "history": [[q, a], ...]}
  BelleGroup math     {"instruction": ..., "output": ...}                   (school_math_0.25M)
Bad input raises DataFormatError naming the file and line; `skip_bad_records=True` skips such records and
reports how many.
"""
import json
import logging
from pathlib import Path
from typing import Iterator, List, Tuple

from glm_tune.data.examples import ChatTurn, DataFormatError, Example
from glm_tune.data.tool_calls import tool_call_turn, tools_system_text

logger = logging.getLogger(__name__)


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
