"""ChatGLM3 `conversations` records: golden token layouts and labels built by hand from THUDM's rules, the
history form ChatGLM-6B/2 read them in, and bad records named by file and line."""
import json

import pytest

from data import (IGNORE_INDEX, DataFormatError, get_prompt_format, read_examples, tokenize_example,
                  tools_system_text)

TOOL = {"name": "get_weather", "description": "城市天气", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}}}


def write_records(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def features(tmp_path, model_type, tokenizer, record, src_length=512, tgt_length=512):
    example = read_examples(write_records(tmp_path / "train.json", [record]))[0]
    fmt = get_prompt_format(model_type, tokenizer)
    return tokenize_example(fmt, example, src_length, tgt_length)


def glm3_pieces(tok):
    cmd, enc = tok.get_command, tok.tokenizer.encode

    def message(role, content, metadata=""):
        return [cmd(f"<|{role}|>")] + enc(metadata + "\n") + enc(content)

    return [cmd("[gMASK]"), cmd("sop")], message, tok.eos_token_id


def test_a_tools_conversation_has_thudms_ids_and_labels(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer("chatglm3")
    record = {"tools": [TOOL], "conversations": [
        {"role": "user", "content": "北京天气"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": {"temp": 3}},
        {"role": "assistant", "content": "北京3度"}]}
    prefix, message, eos = glm3_pieces(tok)
    system = message("system", tools_system_text([TOOL]))
    user = message("user", "北京天气")
    call = message("assistant", "```python\ntool_call(city='北京')\n```", "get_weather")
    seen = message("observation", '{"temp": 3}')
    answer = message("assistant", "北京3度")
    full = prefix + system + user + call + seen + answer + [eos]
    feat = features(tmp_path, "chatglm3", tok, record)
    assert feat["input_ids"] == full[:-1]
    # learned: each assistant turn after its role token, and the token after the turn (next role token / eos)
    expected = ([IGNORE_INDEX] * len(prefix + system + user) + call[1:] + [seen[0]] + [IGNORE_INDEX] * len(seen)
                + answer[1:] + [eos])
    assert feat["labels"] == expected
    assert tools_system_text([TOOL]).startswith("Answer the following questions as best as you can. You have access "
                                                "to the following tools:\n[\n    {\n        \"name\": \"get_weather\"")


def test_a_multi_turn_conversation_learns_every_answer(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer("chatglm3")
    record = {"conversations": [{"role": "system", "content": "简短回答"}, {"role": "user", "content": "你好"},
                                {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "类型#裙"},
                                {"role": "assistant", "content": "复古格子裙"}]}
    prefix, message, eos = glm3_pieces(tok)
    pieces = [message("system", "简短回答"), message("user", "你好"), message("assistant", "你好！"),
              message("user", "类型#裙"), message("assistant", "复古格子裙")]
    feat = features(tmp_path, "chatglm3", tok, record)
    assert feat["input_ids"] == (prefix + sum(pieces, []) + [eos])[:-1]
    expected = ([IGNORE_INDEX] * len(prefix + pieces[0] + pieces[1]) + pieces[2][1:] + [pieces[3][0]]
                + [IGNORE_INDEX] * len(pieces[3]) + pieces[4][1:] + [eos])
    assert feat["labels"] == expected


def test_loss_flags_override_the_roles(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer("chatglm3")
    record = {"conversations": [{"role": "user", "content": "你好", "loss": True},
                                {"role": "assistant", "content": "不学这句", "loss": False},
                                {"role": "user", "content": "再见"},
                                {"role": "assistant", "content": "再见！"}]}
    prefix, message, eos = glm3_pieces(tok)
    pieces = [message("user", "你好"), message("assistant", "不学这句"), message("user", "再见"),
              message("assistant", "再见！")]
    feat = features(tmp_path, "chatglm3", tok, record)
    expected = ([IGNORE_INDEX] * len(prefix) + pieces[0][1:] + [pieces[1][0]] + [IGNORE_INDEX] * len(pieces[1])
                + [IGNORE_INDEX] * len(pieces[2]) + pieces[3][1:] + [eos])
    assert feat["labels"] == expected


def test_chatglm2_reads_a_conversation_as_its_history_form(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer("chatglm2")
    record = {"conversations": [{"role": "system", "content": "简短回答"}, {"role": "user", "content": "你好"},
                                {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "类型#裙"},
                                {"role": "assistant", "content": "复古格子裙"}]}
    enc = tok.tokenizer.encode
    prompt = ([tok.get_command("[gMASK]"), tok.get_command("sop")]
              + enc("[Round 1]\n\n问：简短回答\n你好\n\n答：你好！\n\n[Round 2]\n\n问：类型#裙\n\n答："))
    target = enc("复古格子裙") + [tok.eos_token_id]
    feat = features(tmp_path, "chatglm2", tok, record)
    assert feat["input_ids"] == (prompt + target)[:-1]
    assert feat["labels"] == [IGNORE_INDEX] * (len(prompt) - 1) + target
    with pytest.raises(DataFormatError, match="need ChatGLM3"):
        features(tmp_path, "chatglm2", tok, {"tools": [TOOL], "conversations": [
            {"role": "user", "content": "北京天气"},
            {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": "3"},
            {"role": "assistant", "content": "3度"}]})


def test_an_over_long_conversation_is_cut_from_the_end_and_one_with_nothing_to_learn_is_dropped(tiny_tokenizer,
                                                                                             tmp_path):
    tok = tiny_tokenizer("chatglm3")
    fmt = get_prompt_format("chatglm3", tok)
    record = {"conversations": [{"role": "user", "content": "你好" * 20}, {"role": "assistant", "content": "好" * 30}]}
    example = read_examples(write_records(tmp_path / "a.json", [record]))[0]
    whole = tokenize_example(fmt, example, 512, 512)
    cut = tokenize_example(fmt, example, 16, len(whole["input_ids"]) - 20)
    assert cut["input_ids"] == whole["input_ids"][:len(whole["input_ids"]) - 5]
    assert cut["labels"] == whole["labels"][:len(cut["input_ids"])] and fmt.cut_conversations == 1
    assert tokenize_example(fmt, example, 3, 3) is None  # only the prompt's start is left


NAN = float("nan")
BAD_CONVERSATIONS = [
    ({"conversations": [{"role": "wizard", "content": "x"}]}, r"conversations\[0\]: unknown role 'wizard'"),
    ({"conversations": [{"role": "user", "content": "x"}, {"role": "tool", "parameters": {}}]},
     r"conversations\[1\]: a 'tool' message needs 'name'"),
    ({"conversations": [{"role": "user", "content": "x"}, {"role": "tool", "name": "f"}]},
     r"conversations\[1\]: a 'tool' message needs 'parameters'"),
    ({"tools": {"name": "f"}, "conversations": [{"role": "user", "content": "x"}]}, r"'tools' must be a list"),
    ({"conversations": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"},
                        {"role": "assistant", "content": "z"}]},
     r"conversations\[1\]: a system message after a user message"),
    ({"conversations": []}, r"'conversations' must be a non-empty list"),
    ({"conversations": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]},
     r"conversations\[0\]: 'content' must be a string, got list"),
    ({"conversations": [{"role": "user", "content": "x"}]}, r"nothing to learn"),
    ({"conversations": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "loss": "yes"}]},
     r"'loss' must be true or false"),
    ({"tools": [1, "x", None], "conversations": [{"role": "user", "content": "x"}]},
     r"tools\[0\] must be an object with a 'name'"),
    ({"tools": [{"description": "no name"}], "conversations": [{"role": "user", "content": "x"}]},
     r"tools\[0\] must be an object with a 'name'"),
    ({"conversations": [{"role": "user", "content": "x"}, {"role": "tool", "name": "f", "parameters": {"a": NAN}}]},
     r"conversations\[1\]: parameters \['a'\] are NaN or infinite"),
    ({"conversations": [{"role": "user", "content": "x"}, {"role": "tool", "name": "f",
                                                          "parameters": {"c": [1, NAN]}}]},
     r"parameters \['c'\] are NaN or infinite"),  # nested too
    ({"conversations": [{"role": "user", "content": "x"}, {"role": "tool", "name": "f",
                                                          "parameters": {"b": float("inf")}}]},
     r"parameters \['b'\] are NaN or infinite"),
    ({"conversations": [{"role": "user", "content": "x"}, {"role": "observation", "content": "3"},
                        {"role": "assistant", "content": "y"}]},
     r"conversations\[1\]: an observation \(a tool's result\) before any tool call"),
    ({"conversations": [{"role": "user", "content": "x"}, {"role": "tool", "name": "f", "parameters": {"a b": 1}}]},
     r"conversations\[1\]: tool 'f': argument names \['a b'\] are not identifiers"),
]


@pytest.mark.parametrize("record, pattern", BAD_CONVERSATIONS)
def test_bad_conversation_records_are_named_by_file_and_line(record, pattern, tmp_path):
    good = {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}
    path = write_records(tmp_path / "train.json", [good, good, record, good])
    with pytest.raises(DataFormatError, match=rf"train\.json:3: .*{pattern}.*--skip_bad_records"):
        read_examples(path, offer_skip=True)
    assert len(read_examples(path, skip_bad_records=True)) == 3


def test_data_format_overrides_detection(tmp_path):
    path = write_records(tmp_path / "train.json", [{"content": "a", "summary": "b"}])
    with pytest.raises(DataFormatError, match="'conversations' must be a non-empty list"):
        read_examples(path, data_format="conversations")
    with pytest.raises(DataFormatError, match="--data_format instruction records need a 'instruction' field"):
        read_examples(path, data_format="instruction")
    assert read_examples(path, data_format="content")[0].tgt == "b"


# ------------------------------------------------------------------------------------- the tool-use demo set


def test_tool_use_demo_set_has_calls_that_follow_from_the_prompt(tmp_path):
    from tools.make_demo_data import make_demo_data
    from tools.tool_use_data import OPS

    folder = make_demo_data(tmp_path / "tools", kind="tools")
    train = [json.loads(line) for line in (folder / "train.json").read_text(encoding="utf-8").splitlines()]
    dev = [json.loads(line) for line in (folder / "dev.json").read_text(encoding="utf-8").splitlines()]
    assert len(train) >= 2000 and len(dev) >= 100
    assert len(read_examples(folder / "train.json")) == len(train)  # every record reads
    calls = [r["conversations"][1] for r in dev]
    assert all(c["role"] == "tool" for c in calls)  # dev scores tool calls
    assert {c["name"] for c in calls} == {"get_weather", "calculator", "convert_unit"}
    for record, call in zip(dev, calls):
        prompt = record["conversations"][0]["content"]
        for key, value in call["parameters"].items():
            if key == "op":
                assert OPS[value][0] in prompt or OPS[value][1] in prompt
            elif key in ("from_unit", "to_unit") and not prompt.isascii():
                continue  # Chinese prompts name units in Chinese
            else:
                assert str(value) in prompt, (prompt, key, value)
    assert not {r["conversations"][0]["content"] for r in dev} & {r["conversations"][0]["content"] for r in train}
    assert any(len(r["conversations"]) == 2 for r in train)  # small talk: answered without a tool
    assert sum(r["conversations"][0]["content"].isascii() for r in dev) not in (0, len(dev))  # both languages


def test_tool_call_scores_by_hand():
    from utils import compute_metrics, score_answers

    call = "get_weather\n```python\ntool_call(city='北京')\n```"
    refs = [call, "calculator\n```python\ntool_call(a=1, b=2, op='add')\n```", "你好！", call]
    preds = ["get_weather\n```python\ntool_call(city='北京')\n```",          # right name, right arguments
             "calculator\n```python\ntool_call(a=1, b=3, op='add')\n```",    # right name, wrong argument
             "你好！",                                                         # plain answer
             "北京今天晴"]                                                     # no call at all
    scores = score_answers(preds, refs)
    assert scores["tool-calls"] == 3
    assert scores["tool-name-acc"] == pytest.approx(200 / 3) and scores["tool-args-em"] == pytest.approx(100 / 3)
    assert {k: scores[k] for k in ("rouge-1", "bleu-4")} == {k: compute_metrics(["你好！"], ["你好！"])[k]
                                                              for k in ("rouge-1", "bleu-4")}
    assert "rouge-1" not in score_answers(preds[:1], refs[:1])


@pytest.mark.slow
def test_finetune_on_tool_conversations_reports_tool_accuracy(tiny_dir, tmp_path):
    import finetune_generation
    from tools.make_demo_data import make_demo_data

    from .test_finetune import finetune_argv

    data = make_demo_data(tmp_path / "tools", num_train=16, num_dev=3, kind="tools")
    out = tmp_path / "run"
    finetune_generation.main(finetune_argv(tiny_dir("chatglm3"), data, out, max_steps=2, src_length=1984,
                                           tgt_length=64, per_device_train_batch_size=2, per_device_eval_batch_size=3,
                                           do_eval=True, do_generation=True, evaluation_strategy="no",
                                           lora=True, max_eval_samples=3))
    scores = json.loads((out / "metrics.json").read_text())["metrics"]
    assert any(k.endswith("tool-calls") for k in scores), scores
    tool_calls = next(v for k, v in scores.items() if k.endswith("tool-calls"))
    assert tool_calls == 3  # one call per dev conversation; its final answers scored as plain text
    assert any(k.endswith("rouge-1") for k in scores)


def test_interactive_chat_shows_a_tool_call_and_takes_the_next_line_as_its_result():
    import io

    import infer_generation

    seen = []

    class Predictor:  # records the conversations it is asked to answer; answers as a ChatGLM3 would
        def predict(self, examples):
            seen.append(examples[0].conversation)
            return ["get_weather\n ```python\ntool_call(city='北京')\n```" if len(seen) == 1 else "北京今天晴。"]

    stdout = io.StringIO()
    infer_generation.chat(Predictor(), io.StringIO("北京天气\n{\"condition\": \"晴\"}\nexit\n"), stdout,
                          tools=[TOOL])
    text = stdout.getvalue()
    assert 'ChatGLM calls get_weather({"city": "北京"}); type the tool\'s result' in text
    assert "ChatGLM: 北京今天晴。" in text
    roles = [t.role for t in seen[1]]
    assert roles == ["system", "user", "assistant", "observation"] and seen[1][2].metadata == "get_weather"
    assert seen[1][3].content == '{"condition": "晴"}' and seen[1][0].content == tools_system_text([TOOL])


def test_a_tokenizer_that_learned_tool_text_keeps_tool_prompts_short(tmp_path):
    import sentencepiece

    from tools.make_tiny_model import train_sentencepiece
    from tools.tool_use_data import TOOLS

    system = tools_system_text(TOOLS)
    plain = sentencepiece.SentencePieceProcessor(model_file=str(train_sentencepiece(
        "chatglm3", tmp_path / "a" / "tokenizer.model")))
    tools = sentencepiece.SentencePieceProcessor(model_file=str(train_sentencepiece(
        "chatglm3", tmp_path / "b" / "tokenizer.model", vocab_size=2000, corpus="adgen,tools")))
    assert len(tools.encode(system)) < 200 < 2 * len(tools.encode(system)) < len(plain.encode(system))
    assert tools.decode(tools.encode(system)) == system  # blanks runs kept exactly
