"""The OpenAI chat-completions contract: a request body checked field by field into a `ChatRequest` (or an
`ApiError` with the status and OpenAI's error body), and the response and stream-chunk objects.

Framework-free: the HTTP layer (app.py) only moves bytes; every rule about what a request may hold is here.
"""
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import List, Optional

from glm_tune.data.examples import ChatTurn, DataFormatError
from glm_tune.data.records import check_no_lone_surrogate
from glm_tune.data.tool_calls import tool_call_turn, tools_system_text
from glm_tune.sampling import Sampling


class ApiError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str = None, code: str = None,
                 kind: str = "invalid_request_error", headers: dict = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers  # e.g. Retry-After on a 429

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    max_messages: int = 256
    max_tokens: int = 4096          # the most a request may ask for
    default_max_tokens: int = 512   # when the request does not say
    context_length: int = 2048      # prompt + answer


@dataclass
class ChatRequest:
    turns: List[ChatTurn]
    prompt_ids: List[int] = field(default_factory=list)
    max_tokens: int = 0
    stream: bool = False
    include_usage: bool = False
    sampling: Sampling = field(default_factory=Sampling)
    stop: List[str] = field(default_factory=list)
    tool_names: List[str] = field(default_factory=list)  # offered tools: a generated call to one is parsed


ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_chat_request(body, prompt_format, generation: str, limits: Limits, default_sampling: Sampling) -> ChatRequest:
    """Check every field the server uses and build the prompt ids; anything wrong is a 400 naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:  # JSON may escape half of a UTF-16 pair; the tokenizer would fail on it deep inside (a 500)
        check_no_lone_surrogate(body, "the request", fix="send whole characters")
    except DataFormatError as err:
        raise ApiError(400, str(err), code="invalid_text") from None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    if len(messages) > limits.max_messages:
        raise ApiError(400, f"{len(messages)} messages exceed this server's limit of {limits.max_messages} "
                            "(--max_messages)", "messages")
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise ApiError(400, f"n={n!r}: this server returns one choice per request; send n=1 or leave it out", "n")
    if body.get("logprobs"):
        raise ApiError(400, "logprobs are not supported by this server", "logprobs")
    _refuse_unsupported(body)
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    include_usage = bool(stream and _boolean(options, "include_usage", False, "stream_options.include_usage"))
    tools = _tools(body, generation)
    turns = ([ChatTurn("system", tools_system_text(tools))] if tools else []) + _turns(messages, generation)
    request = ChatRequest(turns, stream=stream, include_usage=include_usage, stop=_stop(body),
                          sampling=_sampling(body, default_sampling), tool_names=[t["name"] for t in tools])
    try:
        request.prompt_ids = prompt_format.chat_prompt_ids(turns)
    except DataFormatError as err:
        raise ApiError(400, str(err), "messages") from None
    request.max_tokens = _max_tokens(body, len(request.prompt_ids), limits)
    return request


def check_model(body, names) -> None:
    """OpenAI answers a model it does not serve with 404 model_not_found; so does this server (`names`: the
    served id and its aliases). A request without `model` is taken as asking for the served one."""
    if isinstance(body, dict) and "model" in body and body["model"] not in names:
        raise ApiError(404, f"the model {body['model']!r} does not exist on this server; it serves {names[0]!r} "
                            "(GET /v1/models)", "model", code="model_not_found")


# Fields OpenAI accepts that this server does not implement, with the value that means "not used": anything else
# is refused by name rather than silently ignored.
UNSUPPORTED_FIELDS = {"logit_bias": (None, {}), "top_logprobs": (None, 0)}


def _refuse_unsupported(body: dict) -> None:
    for key, neutral in UNSUPPORTED_FIELDS.items():
        if key in body and not any(body[key] == v and type(body[key]) is type(v) for v in neutral):
            raise ApiError(400, f"{key} is not supported by this server; leave it out", key)
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise ApiError(400, "response_format: this server writes plain text only ({'type': 'text'}); JSON modes "
                            "are not supported", "response_format")


def _boolean(obj: dict, key: str, default: bool, param: str = None) -> bool:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{param or key}' must be true or false, not {value!r}", param or key)
    return value


def _number(body: dict, key: str, low: float, high: float, low_open: bool = False):
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (low < value if low_open else low <= value) and value <= high):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ApiError(400, f"'{key}' must be a number in {interval}, not {value!r}", key)
    return float(value)


def _sampling(body: dict, default: Sampling) -> Sampling:
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"'seed' must be an integer, not {seed!r}", "seed")
    sampling = Sampling(default.greedy, default.temperature, default.top_p, default.top_k,
                        default.seed if seed is None else seed % 2 ** 32)
    if temperature is not None:  # 0 means the most likely token, as OpenAI's API documents
        sampling.greedy = temperature == 0.0
        sampling.temperature = temperature if temperature > 0 else 1.0
        sampling.top_k = 0 if temperature > 0 and default.greedy else sampling.top_k
    if top_p is not None:
        sampling.top_p = top_p
    sampling.frequency_penalty = _number(body, "frequency_penalty", -2.0, 2.0) or 0.0
    sampling.presence_penalty = _number(body, "presence_penalty", -2.0, 2.0) or 0.0
    return sampling


def _stop(body: dict) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    return stop


def _max_tokens(body: dict, prompt_tokens: int, limits: Limits) -> int:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(key)
    room = limits.context_length - prompt_tokens
    if room < 1:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens and this model's context is "
                            f"{limits.context_length} tokens: shorten the messages", "messages",
                       "context_length_exceeded")
    if value is None:
        return min(limits.default_max_tokens, room)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, f"'{key}' must be a positive integer, not {value!r}", key)
    if value > limits.max_tokens:
        raise ApiError(400, f"'{key}' {value} exceeds this server's limit of {limits.max_tokens} (--max_tokens_limit)",
                       key)
    if value > room:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens; with {key} {value} that exceeds this model's "
                            f"context of {limits.context_length} tokens: lower {key} to {room} or shorten the "
                            "messages", key, "context_length_exceeded")
    return value


def _text(content, where: str, allow_none: bool = False) -> str:
    """A message's content: a string or a list of text parts."""
    if content is None and allow_none:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{where}.content must be a string or a list of text parts", f"{where}.content")


def _turns(messages: list, generation: str) -> List[ChatTurn]:
    turns = []
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role {role!r} is not one of {', '.join(ROLES)}", f"{where}.role")
        if role in ("system", "developer", "user"):
            turns.append(ChatTurn("system" if role == "developer" else role, _text(message.get("content"), where)))
            continue
        if role == "tool":
            _needs_chatglm3(generation, "a 'tool' message", f"{where}.role")
            content = message.get("content")
            turns.append(ChatTurn("observation", content if isinstance(content, str) else
                                  _text(content, where)))
            continue
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise ApiError(400, f"{where}.tool_calls must be a list of tool calls", f"{where}.tool_calls")
        text = _text(message.get("content"), where, allow_none=bool(calls))
        if text or not calls:
            turns.append(ChatTurn("assistant", text))
        if calls:
            _needs_chatglm3(generation, "'tool_calls'", f"{where}.tool_calls")
            turns += [_call_turn(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(calls)]
    return turns


def _call_turn(call, where: str) -> ChatTurn:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ApiError(400, f"{where} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}", where)
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except (TypeError, ValueError, RecursionError):
        arguments = None
    if not isinstance(arguments, dict):
        raise ApiError(400, f"{where}.function.arguments must be a JSON object in a string", f"{where}.function")
    try:
        return tool_call_turn(function["name"], arguments)
    except DataFormatError as err:
        raise ApiError(400, str(err), f"{where}.function") from None


def _tools(body: dict, generation: str) -> List[dict]:
    """The offered functions as ChatGLM3 reads them ({name, description, parameters}); [] when none."""
    tools, choice = body.get("tools"), body.get("tool_choice", "auto")
    if not tools:
        return []
    _needs_chatglm3(generation, "'tools'", "tools")
    if choice not in ("auto", "none", None):
        raise ApiError(400, f"tool_choice {choice!r}: this server supports 'auto' and 'none' (the model decides "
                            "whether to call a tool)", "tool_choice")
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be a list of {type: 'function', function: {...}}", "tools")
    functions = []
    for number, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ApiError(400, f"tools[{number}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                           f"tools[{number}]")
        try:
            json.dumps(function, allow_nan=False)
        except ValueError:
            raise ApiError(400, f"tools[{number}] holds a number JSON cannot carry (NaN or infinite)",
                           f"tools[{number}]") from None
        functions.append(function)
    return [] if choice == "none" else functions


def _needs_chatglm3(generation: str, what: str, param: str) -> None:
    if generation != "chatglm3":
        raise ApiError(400, f"{what} needs a ChatGLM3 model; this server runs {generation}", param)


# --------------------------------------------------------------------------------------------- responses


class Completion:
    """Ids and the fields every response object of one request shares."""

    def __init__(self, model: str):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model

    def _base(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self, content: Optional[str], call, finish_reason: str, usage: dict) -> dict:
        message = {"role": "assistant", "content": content}
        if call is not None:
            message["tool_calls"] = [self.tool_call(call)]
        return {**self._base("chat.completion"), "usage": usage,
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}]}

    def chunk(self, delta: dict, finish_reason: str = None, usage=False) -> dict:
        chunk = {**self._base("chat.completion.chunk"),
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
        if usage is not False:  # with include_usage every chunk carries "usage": null, the last one the counts
            chunk["usage"] = usage
        return chunk

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._base("chat.completion.chunk"), "choices": [], "usage": usage}

    def tool_call(self, call, index: int = None) -> dict:
        name, arguments = call
        entry = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
        return entry if index is None else {"index": index, **entry}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
