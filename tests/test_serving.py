"""serve_generation.py: request rules, tool-call parsing, streamed text, continuous batching (in process), and a
live server driven by the official `openai` client (127.0.0.1 only, bounded request loops)."""
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit
from pathlib import Path
from types import SimpleNamespace

import pytest

from data import ChatTurn, get_prompt_format, parse_tool_call, tool_call_turn, tools_system_text
from glm_tune.generation import decode_answer

from .conftest import GENERATIONS
from .test_predict_export import varied_prompts

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"


# ------------------------------------------------------------------------------------- tool-call parsing

THUDM_CALLS = [  # (generated text, expected (name, arguments) or None)
    ("get_weather\n```python\ntool_call(city_name='北京')\n```", ("get_weather", {"city_name": "北京"})),
    (" track\n```python\ntool_call(symbol='AAPL', days=3)\n```", ("track", {"symbol": "AAPL", "days": 3})),
    ("search\n```python\ntool_call(query='he said \"hi\" and it\\'s fine', opts={'deep': [1, {'x': None}], "
     "'on': True})\n```", ("search", {"query": "he said \"hi\" and it's fine", "opts": {"deep": [1, {"x": None}],
                                                                                      "on": True}})),
    ("convert\ntool_call(value=-2.5, unit=\"°C\")", ("convert", {"value": -2.5, "unit": "°C"})),
    ("\n今天天气很好。", None),                                             # plain answer: empty metadata line
    ("get_weather\n```python\ntool_call('北京')\n```", None),             # positional argument
    ("get_weather\n```python\ntool_call(city=北京)\n```", None),          # a name, not a literal
    ("get_weather\n```python\ntool_call(city='北京'\n```", None),         # unclosed
    ("get_weather\n```python\nprint('x')\n```", None),                     # not tool_call
    ("get_weather\n```python\ntool_call(**{'a': 1})\n```", None),         # ** expansion
    ("get weather\n```python\ntool_call(a=1)\n```", None),                # a name with a space is prose
    ("get_weather", None),                                                 # no body
]


@pytest.mark.parametrize("text,expected", THUDM_CALLS)
def test_tool_calls_are_parsed_from_thudm_format_text(text, expected):
    assert parse_tool_call(text) == expected


def test_a_tool_call_is_never_executed(tmp_path):
    marker = tmp_path / "executed"
    for body in (f"__import__('pathlib').Path({str(marker)!r}).touch()",
                 f"x=__import__('pathlib').Path({str(marker)!r}).touch()",
                 f"x=[__import__('os').system('touch {marker}')]"):
        assert parse_tool_call(f"run\n```python\ntool_call({body})\n```") is None
    assert not marker.exists()


def test_a_rendered_tool_call_parses_back_to_the_same_call():
    arguments = {"city": "上海", "quote": "it's \"x\"", "nested": {"list": [1, 2.5, None, False]}}
    turn = tool_call_turn("get_weather", arguments)
    assert turn.metadata == "get_weather" and turn.content.startswith("```python\ntool_call(")
    assert parse_tool_call(f"{turn.metadata}\n{turn.content}") == ("get_weather", arguments)


# ---------------------------------------------------------------------------------------- chat prompts


def test_chatglm3_conversation_prompt_is_role_tokens_as_thudm_builds_them(tiny_tokenizer):
    tok = tiny_tokenizer("chatglm3")
    fmt = get_prompt_format("chatglm3", tok)
    cmd, enc = tok.get_command, tok.tokenizer.encode
    # plain multi-turn: the same ids the training/eval prompt builder makes
    turns = [ChatTurn("user", "你好"), ChatTurn("assistant", "你好！"), ChatTurn("user", "类型#裙")]
    assert fmt.chat_prompt_ids(turns) == fmt.prompt_ids("类型#裙", [("你好", "你好！")])
    # tools, a call, its observation: each piece encoded on its own after the role's special id
    tools = [{"name": "get_weather", "description": "天气", "parameters": {"type": "object"}}]
    turns = [ChatTurn("system", tools_system_text(tools)), ChatTurn("user", "北京天气"),
             tool_call_turn("get_weather", {"city": "北京"}), ChatTurn("observation", '{"temp": 3}')]
    expected = ([cmd("[gMASK]"), cmd("sop")]
                + [cmd("<|system|>")] + enc("\n") + enc(tools_system_text(tools))
                + [cmd("<|user|>")] + enc("\n") + enc("北京天气")
                + [cmd("<|assistant|>")] + enc("get_weather\n") + enc("```python\ntool_call(city='北京')\n```")
                + [cmd("<|observation|>")] + enc("\n") + enc('{"temp": 3}')
                + [cmd("<|assistant|>")])
    assert fmt.chat_prompt_ids(turns) == expected
    assert tools_system_text(tools).startswith("Answer the following questions as best as you can. You have "
                                               "access to the following tools:\n[\n    {")


def test_chatglm2_folds_system_text_into_the_first_question(tiny_tokenizer):
    fmt = get_prompt_format("chatglm2", tiny_tokenizer("chatglm2"))
    turns = [ChatTurn("system", "简短回答"), ChatTurn("user", "你好"), ChatTurn("assistant", "你好！"),
             ChatTurn("user", "类型#裙")]
    assert fmt.chat_prompt_ids(turns) == fmt.prompt_ids("类型#裙", [("简短回答\n你好", "你好！")])
    from data import DataFormatError

    for bad in ([ChatTurn("user", "a"), ChatTurn("user", "b")], [ChatTurn("user", "a"), ChatTurn("assistant", "b")],
                [ChatTurn("observation", "x"), ChatTurn("user", "a")]):
        with pytest.raises(DataFormatError):
            fmt.chat_prompt_ids(bad)


def request_body(**fields):
    return {"messages": [{"role": "user", "content": "你好"}], **fields}


BAD_REQUESTS = [  # (body, status, param)
    ([1, 2], 400, None),
    ({"model": "x"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": ["hi"]}, 400, "messages[0]"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 400,
     "messages[0].content"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    (request_body(n=2), 400, "n"),
    (request_body(max_tokens=0), 400, "max_tokens"),
    (request_body(max_tokens="10"), 400, "max_tokens"),
    (request_body(max_tokens=10 ** 9), 400, "max_tokens"),
    (request_body(temperature=3), 400, "temperature"),
    (request_body(top_p=0), 400, "top_p"),
    (request_body(seed=1.5), 400, "seed"),
    (request_body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (request_body(stream="yes"), 400, "stream"),
    (request_body(logprobs=True), 400, "logprobs"),
    (request_body(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required"), 400,
     "tool_choice"),
    (request_body(tools=[{"type": "function"}]), 400, "tools[0]"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": None,
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "not json"}}]},
                   {"role": "tool", "content": "1"}]}, 400, "messages[1].tool_calls[0].function"),
    # issue 26: each of these was a 500
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": 5},
                   {"role": "user", "content": "y"}]}, 400, "messages[1].tool_calls"),
    (request_body(messages=[{"role": "user", "content": "a\ud800b"}]), 400, None),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": None,
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"a": NaN}'}}]},
                   {"role": "tool", "content": "1"}]}, 400, "messages[1].tool_calls[0].function"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": None,
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"a": 1e309}'}}]},
                   {"role": "tool", "content": "1"}]}, 400, "messages[1].tool_calls[0].function"),
    (request_body(tools=[{"type": "function", "function": {"name": "f", "parameters": {"default": float("inf")}}}]),
     400, "tools[0]"),
    # OpenAI fields this server does not implement are refused by name, not ignored
    (request_body(frequency_penalty=2.5), 400, "frequency_penalty"),
    (request_body(presence_penalty="high"), 400, "presence_penalty"),
    (request_body(logit_bias={"5": 10}), 400, "logit_bias"),
    (request_body(response_format={"type": "json_object"}), 400, "response_format"),
]


def test_frequency_and_presence_penalties_lower_the_answers_own_tokens(tiny_tokenizer):
    """OpenAI's rule on the logits: minus frequency x count, minus presence once present; 0 changes nothing."""
    import numpy as np

    from glm_tune.sampling import Sampling
    from glm_tune.deployment.continuous_batching import Request, Scheduler
    from glm_tune.serving.openai_protocol import Limits, parse_chat_request

    fmt = get_prompt_format("chatglm3", tiny_tokenizer("chatglm3"))
    sampling = parse_chat_request(request_body(frequency_penalty=0.5, presence_penalty=1), fmt, "chatglm3", Limits(),
                                  Sampling()).sampling
    assert (sampling.frequency_penalty, sampling.presence_penalty) == (0.5, 1.0)
    scheduler = Scheduler(engine=None, feeds=None, stop_ids=[])
    rows = [Request([1], 8, print, print, print, sampling=s) for s in (sampling, Sampling())]
    for row in rows:
        row.tokens = [3, 3, 1]
    logits = np.array([[1.0, 2.0, 3.0, 4.0]] * 2, dtype="float32")
    chosen = scheduler._choose(logits.copy(), rows)
    assert chosen.tolist() == [2, 3]  # token 3: 4 - (0.5 x 2 + 1) = 2 < 3; the row without penalties keeps 3
    from glm_tune.sampling import penalize

    assert penalize(logits[0], [3, 3, 1], sampling).tolist() == [1.0, 0.5, 3.0, 2.0]


def test_neutral_values_of_the_unimplemented_fields_are_accepted(tiny_tokenizer):
    from glm_tune.sampling import Sampling
    from glm_tune.serving.openai_protocol import Limits, parse_chat_request

    fmt = get_prompt_format("chatglm3", tiny_tokenizer("chatglm3"))
    body = request_body(frequency_penalty=0, presence_penalty=0.0, logit_bias={}, response_format={"type": "text"})
    assert parse_chat_request(body, fmt, "chatglm3", Limits(), Sampling()).prompt_ids


def test_a_full_queue_answers_429_with_retry_after_and_head_health_is_answered(tiny_tokenizer):
    from starlette.testclient import TestClient

    from glm_tune.serving.app import ServedModel, create_app
    from glm_tune.sampling import Sampling
    from glm_tune.deployment.continuous_batching import Scheduler
    from glm_tune.serving.openai_protocol import Limits

    tok = tiny_tokenizer("chatglm3")
    full = Scheduler(engine=None, feeds=None, stop_ids=[], max_batch=1, max_waiting=0)  # never started: always full
    app = create_app(ServedModel("m", "chatglm3", tok, get_prompt_format("chatglm3", tok), full, Limits(),
                                 Sampling()), allowed_hosts=frozenset({"testserver"}))
    with TestClient(app) as http_client:
        busy = http_client.post("/v1/chat/completions", json=request_body(model="m"))
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "server_busy"
        assert http_client.head("/health").status_code == 200
        missing = http_client.post("/v1/chat/completions", json=request_body(model="gpt-4o"))
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_an_answer_cut_mid_character_does_not_end_in_a_replacement_character(tiny_tokenizer):
    tok = tiny_tokenizer("chatglm3")
    ids = tok.tokenizer.encode("好😀")
    cut = next(ids[:k] for k in range(len(ids), 0, -1) if decode_text_of(tok, ids[:k]).endswith("\ufffd"))
    assert decode_answer(tok, cut) == decode_text_of(tok, cut).rstrip("\ufffd").strip()
    assert "\ufffd" not in decode_answer(tok, cut)


def decode_text_of(tok, ids):
    from glm_tune.generation import decode_text

    return decode_text(tok, ids)


@pytest.mark.parametrize("body,status,param", BAD_REQUESTS)
def test_bad_requests_get_their_status_and_an_openai_error(body, status, param, tiny_tokenizer):
    from glm_tune.sampling import Sampling
    from glm_tune.serving.openai_protocol import ApiError, Limits, parse_chat_request

    fmt = get_prompt_format("chatglm3", tiny_tokenizer("chatglm3"))
    with pytest.raises(ApiError) as caught:
        parse_chat_request(body, fmt, "chatglm3", Limits(max_tokens=512, context_length=2048), Sampling())
    error = caught.value.body()["error"]
    assert caught.value.status == status and error["param"] == param
    assert error["message"] and error["type"] == "invalid_request_error"


def test_tools_need_chatglm3_and_the_context_limit_names_both_lengths(tiny_tokenizer):
    from glm_tune.sampling import Sampling
    from glm_tune.serving.openai_protocol import ApiError, Limits, parse_chat_request

    fmt2 = get_prompt_format("chatglm2", tiny_tokenizer("chatglm2"))
    with pytest.raises(ApiError, match="needs a ChatGLM3 model"):
        parse_chat_request(request_body(tools=[{"type": "function", "function": {"name": "f"}}]), fmt2, "chatglm2",
                           Limits(), Sampling())
    long = request_body(messages=[{"role": "user", "content": "类型#上衣*颜色#白色" * 400}])
    prompt = len(fmt2.chat_prompt_ids([ChatTurn("user", "类型#上衣*颜色#白色" * 400)]))
    with pytest.raises(ApiError) as caught:
        parse_chat_request(long, fmt2, "chatglm2", Limits(context_length=prompt - 5), Sampling())
    assert f"{prompt} tokens" in caught.value.message and f"{prompt - 5} tokens" in caught.value.message
    with pytest.raises(ApiError, match="lower max_tokens to 5"):
        parse_chat_request({**long, "max_tokens": 6}, fmt2, "chatglm2", Limits(context_length=prompt + 5),
                           Sampling())


def test_a_tool_round_trip_request_renders_call_and_result(tiny_tokenizer):
    from glm_tune.sampling import Sampling
    from glm_tune.serving.openai_protocol import Limits, parse_chat_request

    fmt = get_prompt_format("chatglm3", tiny_tokenizer("chatglm3"))
    tool = {"name": "get_weather", "description": "天气", "parameters": {"type": "object"}}
    body = {"tools": [{"type": "function", "function": tool}], "messages": [
        {"role": "user", "content": "北京天气"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'}]}
    request = parse_chat_request(body, fmt, "chatglm3", Limits(), Sampling())
    expected = fmt.chat_prompt_ids([ChatTurn("system", tools_system_text([tool])), ChatTurn("user", "北京天气"),
                                    tool_call_turn("get_weather", {"city": "北京"}),
                                    ChatTurn("observation", '{"temp": 3}')])
    assert request.prompt_ids == expected and request.tool_names == ["get_weather"]


# ------------------------------------------------------------------------------------------ streamed text


def test_streamed_deltas_never_split_a_character_and_join_to_the_answer(tiny_tokenizer):
    from glm_tune.serving.answer_text import AnswerText

    tok = tiny_tokenizer("chatglm2")
    text = "你好龘靐齉𝄞 world 类型#裙"  # rare characters: byte-fallback tokens, 3-4 per character
    ids = get_prompt_format("chatglm2", tok).encode(text)
    assert len(ids) > len(text) // 2
    stream = AnswerText(tok)
    deltas = [stream.add(i) for i in ids]
    deltas.append(stream.finish()[0])
    assert "".join(deltas) == decode_answer(tok, ids) == text
    assert all("\ufffd" not in d for d in deltas) and sum(1 for d in deltas if d) > 3


class CountingTokenizer:
    """A tokenizer that counts the ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded_ids = tokenizer, 0

    def decode(self, ids, **kwargs):
        self.decoded_ids += len(ids)
        return self.tokenizer.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("model_type", GENERATIONS)
def test_streamed_text_decodes_a_few_ids_per_token_and_joins_to_the_whole_answer(model_type, tiny_tokenizer):
    """Issue 26: every token decoded the whole answer again (a 2,000-token answer: 2 million ids through the
    tokenizer, seconds on the event loop). Now each token decodes a short window; the deltas still join to
    exactly decode_answer, on real text (runs of spaces, byte-fallback characters, newlines) and on random ids
    (invalid byte sequences, special tokens)."""
    import random

    from glm_tune.serving.answer_text import AnswerText

    tok = tiny_tokenizer(model_type)
    fmt = get_prompt_format(model_type, tok)
    rng = random.Random(0)
    answers = [fmt.encode(t) for t in ("你好龘靐齉𝄞 world 类型#裙", "这款衬衫白色调清爽干净。\n\n  类型#裙  a  b\tc",
                                       " lead   spaces\n\nnew\t\tline", "get_weather\n```python\nx = 1\n```")]
    answers += [[rng.randrange(tok.vocab_size) for _ in range(60)] for _ in range(60)]
    for ids in answers:
        stream = AnswerText(tok)
        deltas = [stream.add(i) for i in ids] + [stream.finish()[0]]
        assert "".join(deltas) == decode_answer(tok, ids), ids
    counting = CountingTokenizer(tok)
    long_answer = [rng.randrange(tok.vocab_size) for _ in range(2000)]
    stream = AnswerText(counting)
    sent = "".join(stream.add(i) for i in long_answer)
    assert sent and counting.decoded_ids < 10 * len(long_answer)  # was ~len² / 2 = 2,000,000
    assert sent + stream.finish()[0] == decode_answer(tok, long_answer)


def test_a_stop_string_split_over_many_tokens_is_found_and_the_text_before_it_kept(tiny_tokenizer):
    from glm_tune.serving.answer_text import AnswerText

    tok = tiny_tokenizer("chatglm2")
    fmt = get_prompt_format("chatglm2", tok)
    text = "这款衬衫白色调清爽干净。" * 30 + "龘靐齉 the end 这款"
    ids = fmt.encode(text)
    for stop, expected in [("龘靐齉", "这款衬衫白色调清爽干净。" * 30), ("end 这", text[:text.index("end 这")].rstrip()),
                           ("never there", text)]:
        stream = AnswerText(tok, stop=[stop, "xyz"])
        deltas = []
        for i in ids:
            deltas.append(stream.add(i))
            if stream.stopped:
                break
        assert "".join(deltas) + stream.finish()[0] == expected and stream.stopped == (stop in text)


def test_stop_strings_cut_the_answer_and_are_never_sent(tiny_tokenizer):
    from glm_tune.serving.answer_text import AnswerText

    tok = tiny_tokenizer("chatglm2")
    ids = get_prompt_format("chatglm2", tok).encode("这款衬衫白色调清爽干净。类型#裙")
    stream = AnswerText(tok, stop=["清爽", "xyz"])
    deltas = []
    for i in ids:
        deltas.append(stream.add(i))
        if stream.stopped:
            break
    deltas.append(stream.finish()[0])
    assert "".join(deltas) == "这款衬衫白色调" and stream.stopped


def test_a_tool_call_is_held_back_and_returned_whole(tiny_tokenizer):
    from glm_tune.serving.answer_text import AnswerText

    tok = tiny_tokenizer("chatglm3")
    fmt = get_prompt_format("chatglm3", tok)
    call = tool_call_turn("get_weather", {"city": "北京"})
    stream = AnswerText(tok, tool_names=["get_weather"])
    assert [stream.add(i) for i in fmt.encode("get_weather\n") + fmt.encode(call.content)] == [""] * len(
        fmt.encode("get_weather\n") + fmt.encode(call.content))
    assert stream.finish() == ("", ("get_weather", {"city": "北京"}))
    # a call to a tool that was not offered, or a malformed one, is plain text
    other = AnswerText(tok, tool_names=["get_weather"])
    ids = fmt.encode("rm_rf\n") + fmt.encode(call.content)
    for i in ids:
        other.add(i)
    assert other.finish() == (decode_answer(tok, ids), None) and other.text.startswith("rm_rf\n")
    plain = AnswerText(tok, tool_names=["get_weather"])
    assert "".join(plain.add(i) for i in fmt.encode("\n") + fmt.encode("今天很好")) + plain.finish()[0] == "今天很好"


class ScriptedScheduler:
    """Stands in for the engine's scheduler where a test needs a given answer: every request is answered with
    `ids`, from another thread, as the scheduler's thread does."""

    def __init__(self, ids):
        self.ids, self.running, self.stats = ids, 0, {}
        self.summary = dict
        self.waiting = SimpleNamespace(qsize=lambda: 0)

    def submit(self, row):
        def answer():
            for token in self.ids:
                if row.cancelled:
                    return
                row.on_token(token)
            row.on_finish("stop")

        threading.Thread(target=answer, daemon=True).start()


def test_a_thought_then_a_call_in_a_second_assistant_turn_is_content_and_a_tool_call(tiny_tokenizer):
    """THUDM's layout (issue 26.6): `\\n<thought><|assistant|>get_weather\\n```python\\ntool_call(...)\\n````.
    The thought is the message's content, the second turn its tool call, streamed and not, through the openai
    client. A second turn that is not a call of an offered tool stays text."""
    from openai import OpenAI
    from starlette.testclient import TestClient

    from glm_tune.serving.app import ServedModel, create_app
    from glm_tune.sampling import Sampling
    from glm_tune.serving.openai_protocol import Limits

    tok = tiny_tokenizer("chatglm3")
    fmt = get_prompt_format("chatglm3", tok)
    call = tool_call_turn("get_weather", {"city": "北京"})
    thought = "我来查一下北京的天气。"
    answer = fmt.encode("\n" + thought) + [fmt.role_id("assistant")] + fmt.encode("get_weather\n") + fmt.encode(
        call.content)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    for offered, expect_call in ((tools, True), ([{"type": "function", "function": {"name": "other"}}], False)):
        app = create_app(ServedModel("m", "chatglm3", tok, fmt, ScriptedScheduler(answer), Limits(), Sampling()))
        with TestClient(app) as http_client:
            openai_client = OpenAI(base_url="http://testserver/v1", api_key="k", http_client=http_client)
            kwargs = dict(model="m", messages=[{"role": "user", "content": "北京天气"}], tools=offered)
            message = openai_client.chat.completions.create(**kwargs).choices[0]
            chunks = list(openai_client.chat.completions.create(stream=True, **kwargs))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        streamed_calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
        if expect_call:
            assert message.finish_reason == "tool_calls" and message.message.content == thought
            assert [(t.function.name, json.loads(t.function.arguments)) for t in message.message.tool_calls] == [
                ("get_weather", {"city": "北京"})]
            assert streamed == thought and [t.function.name for t in streamed_calls] == ["get_weather"]
        else:
            assert message.finish_reason == "stop" and not message.message.tool_calls
            assert message.message.content == decode_answer(tok, answer) == streamed and not streamed_calls
            assert message.message.content.startswith(thought) and "tool_call(city='北京')" in streamed


# ------------------------------------------------------------------------------- continuous batching


def engine_predictor(export_dir, **extra):
    import infer_generation

    argv = ["--model_path", str(export_dir), "--backend", "onnxruntime", "--precision", "fp32", "--batch_size", "1"]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    return infer_generation.build_predictor(*infer_generation.parse_arguments(argv))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", GENERATIONS)
def test_rows_joining_and_leaving_the_batch_answer_as_they_do_alone(model_type, exported, demo_data):
    """Requests arrive while others decode, one is cancelled mid-way: every greedy answer equals its one-by-one
    answer through infer_generation's predictor."""
    from glm_tune.deployment.continuous_batching import Request, Scheduler

    predictor = engine_predictor(exported(model_type))
    examples = varied_prompts(demo_data, 12)
    alone = predictor.predict_ids(examples)
    # the longest answer is request 3 (cancelled mid-way), the next three longest run first, so they are still
    # decoding when the others arrive
    by_length = sorted(range(len(examples)), key=lambda i: -len(alone[i]))
    order = by_length[1:4] + by_length[:1] + by_length[4:]
    examples, alone = [examples[i] for i in order], [alone[i] for i in order]
    assert len(alone[3]) >= 6 and min(len(a) for a in alone[:3]) >= 4
    prompts = [predictor.format.prompt_ids(e.src, e.history, predictor.src_length) for e in examples]
    assert len({tuple(a) for a in alone}) > 3

    def slow_engine(feeds):  # 20 ms a step: the test thread submits well within one step, however busy the machine
        time.sleep(0.02)
        return predictor.run(feeds)

    scheduler = Scheduler(slow_engine, predictor.feeds, predictor.stops, max_batch=5).start()
    got, finished = {}, {}
    events = {i: threading.Event() for i in range(len(prompts))}

    def submit(i, cancel_after=None):
        got[i] = []

        def on_token(token, i=i):
            got[i].append(token)
            if len(got[i]) == cancel_after:
                request.cancel()  # the client goes away: the row must leave at the next step

        request = Request(prompts[i], predictor.max_new_tokens, on_token=on_token,
                          on_finish=lambda reason, i=i: (finished.__setitem__(i, reason), events[i].set()),
                          on_error=lambda msg, i=i: (finished.__setitem__(i, msg), events[i].set()))
        scheduler.submit(request)
        return request

    try:
        [submit(i) for i in range(3)]
        deadline = time.time() + 60
        while len(got[0]) < 2 and not events[0].is_set() and time.time() < deadline:
            time.sleep(0.001)
        submit(3, cancel_after=2)  # joins a batch that is decoding, then leaves it early
        for i in range(4, len(prompts)):  # wait in the queue, each taking a row as one frees up
            submit(i)
        for i in set(events) - {3}:
            assert events[i].wait(120), f"request {i} did not finish"
    finally:
        scheduler.stop()
    for i in set(events) - {3}:
        assert got[i] == alone[i], (i, finished[i])
        assert finished[i] in ("stop", "length")
    assert got[3] == alone[3][:2] and 3 not in finished  # cancelled: no more tokens, no finish
    assert scheduler.stats["largest_batch"] == 5
    assert scheduler.batch is None  # every row left, the cancelled one included


# ------------------------------------------------------------------------------------------- live server


def http(method, url, body=None, key=KEY, raw=None, headers=None):
    """(status, parsed JSON body) of one call."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@contextlib.contextmanager
def running_server(folder, log_path, *extra):
    """serve_generation.py on an export in a subprocess (ONNX Runtime fp32) until the block ends: its base url."""
    from tools.local_server import start_server

    proc, url = start_server(folder, log_path, "--backend", "onnxruntime", "--precision", "fp32", *extra)
    try:
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    """serve_generation.py on the trained tiny ChatGLM3 (ONNX Runtime fp32) in a subprocess, with an API key and
    the chat page: (base url, export folder)."""
    folder = exported("chatglm3")
    with running_server(folder, tmp_path_factory.mktemp("server") / "server.log", "--served_model_name",
                        f"{SERVED},x", "--api_key", KEY, "--ui", "True", "--max_batch", "8", "--max_messages", "16",
                        "--max_body_bytes", "65536") as url:
        yield url, folder


SERVED = "glm-test"  # the test server's model id; "x" is its alias, so any other name is a 404


def client(url, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def chat_prompts(demo_data):
    return [e.src for e in varied_prompts(demo_data, 8) if not e.history]


def stream_answer(openai_client, prompt, **extra):
    chunks = list(openai_client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": prompt}], stream=True, **extra))
    return chunks, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.fixture(scope="module")
def engine_answers(server, demo_data, tmp_path_factory):
    """infer_generation.py's answers (the file it writes) for the chat prompts."""
    import infer_generation

    url, folder = server
    folder_tmp = tmp_path_factory.mktemp("infer")
    data_file = folder_tmp / "prompts.json"
    prompts = chat_prompts(demo_data)
    data_file.write_text("".join(json.dumps({"content": p}, ensure_ascii=False) + "\n" for p in prompts),
                         encoding="utf-8")
    infer_generation.main(["--model_path", str(folder), "--backend", "onnxruntime", "--precision", "fp32",
                           "--data_file", str(data_file), "--output_file", str(folder_tmp / "out.json")])
    lines = (folder_tmp / "out.json").read_text(encoding="utf-8").splitlines()
    return {json.loads(line)["prompt"]: json.loads(line)["output"] for line in lines}


@pytest.mark.slow
def test_openai_client_stream_and_non_stream_equal_infer_generation(server, engine_answers):
    url, _ = server
    openai_client = client(url)
    listed = openai_client.models.list().data
    assert [m.id for m in listed] == [SERVED] and abs(listed[0].created - time.time()) < 3600
    assert len(set(engine_answers.values())) > 2
    for prompt, expected in engine_answers.items():
        response = openai_client.chat.completions.create(model="x", messages=[{"role": "user", "content": prompt}])
        assert response.choices[0].message.content == expected
        assert response.choices[0].finish_reason in ("stop", "length")
        assert response.usage.prompt_tokens > 0 and response.usage.total_tokens == (
            response.usage.prompt_tokens + response.usage.completion_tokens)
        chunks, text = stream_answer(openai_client, prompt, stream_options={"include_usage": True})
        assert text == expected
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason == response.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == response.usage.completion_tokens


@pytest.mark.slow
def test_a_stop_string_cuts_the_stream_where_it_cuts_the_answer(server, engine_answers):
    """The text before a stop string reaches a streaming client too (it was dropped with the stop: a stop at the
    answer's second character streamed nothing), for stops at several places in each answer."""
    url, _ = server
    openai_client = client(url)
    checked = 0
    for prompt, expected in engine_answers.items():
        for stop in {expected[i:i + 2] for i in (1, len(expected) // 2, len(expected) - 2) if 0 < i < len(expected)}:
            if not stop.strip():
                continue
            response = openai_client.chat.completions.create(
                model="x", messages=[{"role": "user", "content": prompt}], stop=stop)
            content = response.choices[0].message.content
            assert stop not in content and expected.startswith(content.strip()), (stop, content)
            _, streamed = stream_answer(openai_client, prompt, stop=stop)
            assert streamed == content, (prompt, stop)
            checked += content != ""
    assert checked >= 5


@pytest.mark.slow
def test_langchain_openai_invoke_stream_batch_and_ainvoke_equal_infer_generation(server, engine_answers):
    """What a LangChain user runs (langchain-openai, pinned): every path gives infer_generation's answers, and a
    stop string cuts streamed and non-streamed answers at the same place."""
    import asyncio

    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    url, _ = server
    chat = ChatOpenAI(base_url=f"{url}/v1", api_key=KEY, model="x", temperature=0, max_retries=0, timeout=120)
    prompts = list(engine_answers)[:4]
    expected = [engine_answers[p] for p in prompts]
    assert [chat.invoke(p).content for p in prompts] == expected
    assert ["".join(chunk.content for chunk in chat.stream(p)) for p in prompts] == expected
    assert [m.content for m in chat.batch(prompts)] == expected
    assert asyncio.run(chat.ainvoke(prompts[0])).content == expected[0]
    long_prompt = max(prompts, key=lambda p: len(engine_answers[p]))
    stop = engine_answers[long_prompt][len(engine_answers[long_prompt]) // 2:][:2]
    cut = chat.invoke(long_prompt, stop=[stop]).content
    assert stop not in cut and engine_answers[long_prompt].startswith(cut)
    assert "".join(chunk.content for chunk in chat.stream(long_prompt, stop=[stop])) == cut
    # a tool round trip as LangChain writes it: the call and its result are accepted and answered
    tool = {"type": "function", "function": {"name": "get_weather", "description": "天气",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    history = [HumanMessage("北京天气"),
               AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "北京"}, "id": "call_1"}]),
               ToolMessage('{"temp": 3}', tool_call_id="call_1")]
    answer = chat.bind_tools([tool]).invoke(history)
    assert isinstance(answer, AIMessage) and answer.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")


def test_langchain_bind_tools_gets_the_models_call_with_its_thought(tiny_tokenizer):
    """A generated call reaches LangChain as AIMessage.tool_calls (THUDM's thought-then-call layout), streamed
    and not."""
    from langchain_openai import ChatOpenAI
    from starlette.testclient import TestClient

    from glm_tune.serving.app import ServedModel, create_app
    from glm_tune.sampling import Sampling
    from glm_tune.serving.openai_protocol import Limits

    tok = tiny_tokenizer("chatglm3")
    fmt = get_prompt_format("chatglm3", tok)
    answer = fmt.encode("\n我来查一下。") + [fmt.role_id("assistant")] + fmt.encode("get_weather\n") + fmt.encode(
        tool_call_turn("get_weather", {"city": "北京", "days": 2}).content)
    app = create_app(ServedModel("m", "chatglm3", tok, fmt, ScriptedScheduler(answer), Limits(), Sampling()))
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    with TestClient(app) as http_client:
        chat = ChatOpenAI(base_url="http://testserver/v1", api_key="k", model="m", http_client=http_client,
                          max_retries=0).bind_tools([tool])
        message = chat.invoke("北京天气")
        streamed = None
        for chunk in chat.stream("北京天气"):
            streamed = chunk if streamed is None else streamed + chunk
    for m in (message, streamed):
        assert m.content == "我来查一下。"
        assert [(c["name"], c["args"]) for c in m.tool_calls] == [("get_weather", {"city": "北京", "days": 2})]


@pytest.mark.slow
def test_raw_stream_ends_with_done(server, engine_answers):
    url, _ = server
    # a prompt whose answer is long, so 5 tokens end it by length (a short chat answer may stop before)
    prompt = max(engine_answers, key=lambda p: len(engine_answers[p]))
    assert len(engine_answers[prompt]) > 20
    body = {"messages": [{"role": "user", "content": prompt}], "stream": True, "max_tokens": 5}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().splitlines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][5:])["choices"][0]["finish_reason"] == "length"


@pytest.mark.slow
def test_sixteen_concurrent_streams_each_equal_their_one_by_one_answer(server, engine_answers):
    url, _ = server
    prompts = list(engine_answers) * 4
    prompts = prompts[:16]
    results, errors = {}, []

    def run(i):
        try:
            results[i] = stream_answer(client(url), prompts[i])[1]
        except Exception as err:  # collected and reported below
            errors.append(repr(err))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors and len(results) == 16
    assert all(results[i] == engine_answers[prompts[i]] for i in range(16))
    status, health = http("GET", f"{url}/health")
    assert health["largest_batch"] > 1 and health["running"] == 0  # streams shared batches; every row left


KILLED_CLIENT = """
import sys, urllib.request, json
request = urllib.request.Request(sys.argv[1] + "/v1/chat/completions", data=json.dumps({"messages": [
    {"role": "user", "content": "你好"}], "stream": True, "max_tokens": 20000 // 10}).encode(),
    headers={"Authorization": "Bearer " + sys.argv[2], "Content-Type": "application/json"})
response = urllib.request.urlopen(request, timeout=60)
for _ in range(4):
    response.readline()
print("reading", flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_a_client_killed_mid_stream_does_not_disturb_the_others(server, engine_answers):
    url, _ = server
    victim = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, url, KEY], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline().strip() == "reading"
        others = {}
        threads = [threading.Thread(target=lambda p=p: others.__setitem__(p, stream_answer(client(url), p)[1]))
                   for p in list(engine_answers)[:4]]
        for t in threads:
            t.start()
        time.sleep(0.3)
        victim.kill()  # SIGKILL: the connection drops without a goodbye
        victim.wait(30)
        for t in threads:
            t.join(180)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert others == {p: engine_answers[p] for p in others} and len(others) == 4
    deadline = time.time() + 30
    while time.time() < deadline and http("GET", f"{url}/health")[1]["running"]:
        time.sleep(0.2)
    assert http("GET", f"{url}/health")[1]["running"] == 0  # the killed client's row was dropped


@pytest.fixture(scope="module")
def long_answer_export(tmp_path_factory):
    """An untrained ChatGLM3 at hidden 512 / 4 layers exported for up to 2,000 new tokens: its greedy answers run
    to the token limit, and a step costs ~1.3 ms, so the engine, not Python, takes most of an answer's time (as it
    does at real sizes; on the hidden-128 models a step costs 0.2 ms)."""
    import export_generation_model
    from tools.make_tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("long_answer")
    model = make_tiny_model("chatglm3", root / "model", sizes={"hidden_size": 512, "num_layers": 4,
                                                                "num_attention_heads": 8, "ffn_hidden_size": 1376})
    export_generation_model.main(["--model_name_or_path", str(model), "--output_path", str(root / "export" / "chatglm"),
                                  "--src_length", "48", "--tgt_length", "2000"])
    return root / "export"


def timed_post(url, body):
    """(seconds, raw response body) of one chat completion."""
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        data = response.read()
    return time.perf_counter() - started, data


def streamed_text(raw: bytes) -> str:
    events = [line[5:].strip() for line in raw.decode().splitlines() if line.startswith("data:")]
    assert events[-1] == "[DONE]"
    return "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                   if json.loads(e)["choices"])


@pytest.mark.slow
def test_a_long_answer_neither_slows_nor_stalls_the_others(long_answer_export, tmp_path):
    """Issue 26's fairness bar: a 2,000-token answer through the server within 1.3x infer_generation's time for
    it; while it streams, 10 quick requests each finish within 3x their time alone and /health answers within
    0.5 s. (Before: a 1,500-token stream made a 0.09 s request take 42.8 s and /health wait ~70 s.) Each time is
    the best of two, measured in this run."""
    from data import Example

    prompt = "你好"
    predictor = engine_predictor(long_answer_export, tgt_length=2000, src_length=48)
    infer_seconds = []
    for _ in range(2):
        started = time.perf_counter()
        ids = predictor.predict_ids([Example(prompt)])[0]
        infer_seconds.append(time.perf_counter() - started)
    assert len(ids) == 2000  # no stop token on the way: the answer runs to the limit
    expected = decode_answer(predictor.tokenizer, ids)
    long_body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 2000, "temperature": 0,
                 "stream": True}
    quick = [{"messages": [{"role": "user", "content": q}], "max_tokens": 16, "temperature": 0}
             for q in ("类型#裙", "风格#复古", "hello", "颜色#蓝色", "图案#刺绣") * 2]
    with running_server(long_answer_export, tmp_path / "server.log") as url:
        timed_post(url, quick[0])  # warm up
        served = []
        for _ in range(2):
            seconds, raw = timed_post(url, long_body)
            served.append(seconds)
            assert streamed_text(raw) == expected
        alone = [min(timed_post(url, q)[0] for _ in range(2)) for q in quick]
        during, health = [], []
        finished = threading.Event()
        streaming = threading.Thread(target=lambda: (timed_post(url, long_body), finished.set()))
        streaming.start()
        time.sleep(0.2)
        for body in quick:
            during.append(timed_post(url, body)[0])
            started = time.perf_counter()
            urllib.request.urlopen(f"{url}/health", timeout=60).close()
            health.append(time.perf_counter() - started)
        assert not finished.is_set()  # the quick requests all ran beside the long one
        streaming.join(300)
    print(f"2,000-token answer: server {min(served):.2f} s, infer {min(infer_seconds):.2f} s; quick requests "
          f"alone {[round(a * 1000) for a in alone]} ms, during {[round(d * 1000) for d in during]} ms; "
          f"/health at most {max(health) * 1000:.0f} ms")
    assert min(served) <= 1.3 * min(infer_seconds)
    assert all(d <= 3 * a for d, a in zip(during, alone)), (alone, during)
    assert max(health) < 0.5


@pytest.mark.parametrize("text", ["tool_call(city={'Rome', 'Oslo'})", "tool_call(data=b'x')", "tool_call(z=1j)",
                                  "tool_call(x=...)", "tool_call(m={(1, 2): 3})", "tool_call(t=(1, 2))",
                                  "tool_call(n=1e309)"])
def test_a_generated_call_json_cannot_carry_is_plain_text(text, tiny_tokenizer):
    """Literals that are not JSON arguments (issue 26: a 500 and a stream without [DONE]): the answer is the
    model's plain text, as THUDM's server does with a call it cannot parse."""
    from glm_tune.serving.answer_text import AnswerText

    answer = f"get_weather\n```python\n{text}\n```"
    assert parse_tool_call(answer) is None
    assert parse_tool_call("get_weather\n```python\ntool_call(city='Rome', days=[1, 2])\n```") == (
        "get_weather", {"city": "Rome", "days": [1, 2]})
    tok = tiny_tokenizer("chatglm3")
    stream = AnswerText(tok, tool_names=["get_weather"])
    for token in tok.tokenizer.encode(answer):
        stream.add(token)
    rest, call = stream.finish()
    assert call is None and "tool_call(" in stream.text


def test_the_host_names_a_server_answers():
    from types import SimpleNamespace

    from glm_tune.serving.app import host_name
    from serve_generation import allowed_hosts

    assert [host_name(h) for h in ("127.0.0.1:8000", "[::1]:8000", "LocalHost", "evil.example:80", "")] == [
        "127.0.0.1", "::1", "localhost", "evil.example", ""]
    loopback = allowed_hosts(SimpleNamespace(host="127.0.0.1", allowed_hosts="chat.internal, Proxy"))
    assert loopback == {"127.0.0.1", "localhost", "::1", "chat.internal", "proxy"}
    assert allowed_hosts(SimpleNamespace(host="0.0.0.0", allowed_hosts=None)) is None  # --api_key guards it
    assert allowed_hosts(SimpleNamespace(host="0.0.0.0", allowed_hosts="gpu-box")) == {"gpu-box"}


@pytest.mark.slow
def test_bad_calls_get_openai_errors_and_the_server_stays_up(server):
    url, _ = server
    completions = f"{url}/v1/chat/completions"
    cases = [
        (http("POST", completions, raw=b"[" * 10000), 400, "invalid_json"),
        (http("POST", completions, request_body(model="gpt-4o")), 404, "model_not_found"),
        # a page on another domain pointed at 127.0.0.1 (DNS rebinding), and a browser's preflight-free POST
        (http("POST", completions, request_body(), headers={"Host": "attacker.example"}), 400, "host_not_allowed"),
        (http("GET", f"{url}/health", headers={"Host": "attacker.example:80"}), 400, "host_not_allowed"),
        (http("POST", completions, request_body(), headers={"Content-Type": "text/plain"}), 415,
         "unsupported_media_type"),
        (http("POST", completions, raw=b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'), 400,
         "invalid_text"),
        (http("POST", completions, raw=b"{not json"), 400, "invalid_json"),
        (http("POST", completions, raw=b"\xff\xfe"), 400, "invalid_json"),
        (http("POST", completions, {"messages": [{"role": "user", "content": "x"}] * 17}), 400, None),
        (http("POST", completions, {"messages": [{"role": "user", "content": "x" * 70000}]}), 413,
         "request_too_large"),
        (http("POST", completions, request_body(n=3)), 400, None),
        (http("POST", completions, {"messages": [{"role": "user", "content": "类型#上衣*颜色#白色" * 400}]}), 400,
         "context_length_exceeded"),
        (http("POST", completions, request_body(), key=None), 401, "invalid_api_key"),
        (http("POST", completions, request_body(), key="wrong"), 401, "invalid_api_key"),
        (http("GET", f"{url}/v1/models", key=None), 401, "invalid_api_key"),
        (http("GET", f"{url}/v1/nothing"), 404, "not_found"),
        (http("PUT", completions, request_body()), 405, "method_not_allowed"),
    ]
    for (status, body), expected_status, code in cases:
        assert status == expected_status, body
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
        if code:
            assert body["error"]["code"] == code
    assert http("GET", f"{url}/health")[0] == 200
    assert http("GET", f"{url}/health", headers={"Host": f"localhost:{urlsplit(url).port}"})[0] == 200
    import openai

    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").chat.completions.create(model="x", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="messages\\[0\\].role"):
        client(url).chat.completions.create(model="x", messages=[{"role": "wizard", "content": "x"}])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_chat_page_streams_an_answer_in_headless_chromium(server, engine_answers, tmp_path):
    from tools.chat_screenshot import chat_screenshot

    url, _ = server
    prompt = next(iter(engine_answers))
    send = CHAT_PAGE_SEND % (json.dumps(KEY), json.dumps(prompt))
    png, text = chat_screenshot(CHROMIUM, url + "/", send, CHAT_PAGE_ANSWER, tmp_path / "chat.png",
                                tmp_path / "profile")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert prompt in text and engine_answers[prompt] in text


CHAT_PAGE_SEND = """(() => {
  const box = document.getElementById('prompt'), key = document.getElementById('key');
  if (!box || !key) return false;
  key.value = %s; box.value = %s;
  document.getElementById('send').click();
  return true;
})()"""
CHAT_PAGE_ANSWER = "Array.from(document.querySelectorAll('.bot[data-done]')).map(e => e.innerText).join('\\n')"
