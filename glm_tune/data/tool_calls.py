"""ChatGLM3 tool calls as THUDM writes them: the tools system message, an assistant turn that calls a tool, and
the parser that reads a generated call back without evaluating anything the model wrote."""
import ast
import json

from glm_tune.data.examples import ChatTurn, DataFormatError


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
