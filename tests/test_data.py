"""data.py: golden tokenization per generation, truncation, batching, and clear errors on bad input."""
import json

import numpy as np
import pytest

from data import (IGNORE_INDEX, DataCollator, DataFormatError, Example, chatglm_attention_mask, chatglm_position_ids,
                   get_prompt_format, read_examples, task_file, tokenize_example)

HAND_WRITTEN = Example("颜色#白色", "白色调清爽干净。", [("你好", "你好！")])

# Pieces THUDM's formats produce for HAND_WRITTEN, read off by hand from each format string
# ('' is how PaddleNLP's v2 tokenizer prints its special tokens).
GOLDEN_PIECES = {
    "chatglm": ["▁[", "Round", "▁", "0", "]", "<n>", "问", "：", "你好", "<n>", "答", "：", "你好", "！", "<n>",
                "[", "Round", "▁", "1", "]", "<n>", "问", "：", "颜色", "#", "白色", "<n>", "答", "：",
                "[gMASK]", "<sop>", "▁", "白色调清爽干净", "。"],
    "chatglm2": ["", "", "▁[", "Round", "▁", "1", "]", "\n", "\n", "问", "：", "你好", "\n", "\n", "答", "：",
                 "你好", "！", "\n", "\n", "[", "Round", "▁", "2", "]", "\n", "\n", "问", "：", "颜色", "#", "白色",
                 "\n", "\n", "答", "：", "▁", "白色调清爽干净", "。"],
    "chatglm3": ["", "", "", "▁", "\n", "▁你好", "", "▁", "\n", "▁你好", "！", "", "▁", "\n", "▁颜色", "#", "白色",
                 "", "▁", "\n", "▁", "白色调清爽干净", "。"],
}


def specials(tok, model_type):
    if model_type == "chatglm":
        return {"gmask": tok.gmask_token_id, "sop": tok.bos_token_id, "eos": tok.eos_token_id}
    names = {"gmask": "[gMASK]", "sop": "sop", "user": "<|user|>", "assistant": "<|assistant|>"}
    return {**{k: tok.get_command(v) for k, v in names.items()}, "eos": tok.eos_token_id}


@pytest.mark.parametrize("model_type", ["chatglm", "chatglm2", "chatglm3"])
def test_golden_tokenization(model_type, tiny_tokenizer):
    tok = tiny_tokenizer(model_type)
    sp = specials(tok, model_type)
    feat = tokenize_example(get_prompt_format(model_type, tok), HAND_WRITTEN, src_length=64, tgt_length=16)
    ids, labels = feat["input_ids"], feat["labels"]
    assert tok.convert_ids_to_tokens(ids) == GOLDEN_PIECES[model_type]
    answer = tok.convert_tokens_to_ids(["▁", "白色调清爽干净", "。"])
    if model_type == "chatglm":
        # src [gMASK] <sop> answer <eop>: the answer starts after <sop>.
        assert ids[29:31] == [sp["gmask"], sp["sop"]]
        expected_target = answer + [sp["eos"]]
    elif model_type == "chatglm2":
        assert ids[:2] == [sp["gmask"], sp["sop"]] and sp["gmask"] not in ids[2:]
        expected_target = answer + [sp["eos"]]
    else:
        newline = tok.tokenizer.encode("\n")
        assert ids[:3] == [sp["gmask"], sp["sop"], sp["user"]]
        assert [i for i, t in enumerate(ids) if t in (sp["user"], sp["assistant"])] == [2, 6, 11, 17]
        expected_target = newline + answer + [sp["eos"]]
    n_target = len(expected_target)
    # Labels are shifted: the prompt's last token predicts the first answer token; eos closes the answer.
    assert labels[-n_target:] == expected_target
    assert labels[:-n_target] == [IGNORE_INDEX] * (len(labels) - n_target)
    assert len(ids) == len(labels) and ids[-(n_target - 1):] == expected_target[:-1]


TEMPLATE_TEXT = {"chatglm": ("", ""), "chatglm2": ("[Round 1]\n\n问：", "\n\n答："), "chatglm3": ("", "")}


@pytest.mark.parametrize("model_type", ["chatglm", "chatglm2", "chatglm3"])
def test_truncation_cuts_the_users_text_never_the_template(model_type, tiny_tokenizer):
    tok = tiny_tokenizer(model_type)
    fmt = get_prompt_format(model_type, tok)
    question = "类型#上衣*" * 40 + "颜色#白色"
    long = Example(question, "白色调清爽干净。" * 20, [("你好", "你好！")] * 5)
    feat = tokenize_example(fmt, long, src_length=24, tgt_length=8, is_test=True)
    prompt, target = feat["input_ids"], feat["labels"]
    assert len(target) == 8 and target[-1] == tok.eos_token_id
    assert (fmt.cut_prompts, fmt.cut_answers) == (1, 1)
    # The history went first, then the end of the question: what is left is the one-turn prompt of the longest
    # start of the question that fits, template and answer cue intact.
    kept = next(n for n in range(len(question), -1, -1) if len(fmt.prompt_ids(question[:n])) <= 24)
    assert 0 < kept < len(question) and len(fmt.prompt_ids(question[:kept + 1])) > 24
    assert prompt == fmt.prompt_ids(question[:kept])
    assert prompt[:len(fmt.prefix_ids())] == fmt.prefix_ids()
    if fmt.suffix_ids():
        assert prompt[-len(fmt.suffix_ids()):] == fmt.suffix_ids()
    head, cue = TEMPLATE_TEXT[model_type]
    text = tok.decode(prompt)
    assert head in text and text.rstrip().endswith(cue.strip()) and question[:kept] in text
    if model_type == "chatglm3":
        assert prompt[len(fmt.prefix_ids())] == tok.get_command("<|user|>")
    train = tokenize_example(fmt, long, src_length=24, tgt_length=8)
    assert len(train["input_ids"]) == len(prompt) + 8 - 1


@pytest.mark.parametrize("model_type", ["chatglm", "chatglm2", "chatglm3"])
def test_truncation_drops_oldest_turns_before_the_question(model_type, tiny_tokenizer):
    fmt = get_prompt_format(model_type, tiny_tokenizer(model_type))
    history = [("第一个问题" * 3, "第一个回答" * 3), ("第二个问题", "第二个回答")]
    budget = len(fmt.prompt_ids("你好", history[1:]))
    assert fmt.prompt_ids("你好", history, src_length=budget) == fmt.prompt_ids("你好", history[1:])
    assert fmt.cut_prompts == 1


def cut_one_turn_at_a_time(fmt, query, history, src_length):
    """The cutting rule written the slow, obvious way: drop the oldest turn until the prompt fits."""
    history = list(history)
    while history and len(fmt.prompt_ids(query, history)) > src_length:
        history = history[1:]
    return fmt.prompt_ids(query, history, src_length=src_length)


@pytest.mark.parametrize("model_type", ["chatglm", "chatglm2", "chatglm3"])
def test_a_long_history_is_cut_like_one_turn_at_a_time_and_in_linear_time(model_type, tiny_tokenizer):
    import time

    fmt = get_prompt_format(model_type, tiny_tokenizer(model_type))
    history = [(f"第{i}个问题" + "好" * (i % 7), f"回答{i}" * (1 + i % 3)) for i in range(40)]
    for budget in (24, 40, 64, 120, 300):
        assert fmt.prompt_ids("你好", history, src_length=budget) == cut_one_turn_at_a_time(fmt, "你好", history,
                                                                                           budget), budget
    long_history = history * 250  # 10,000 turns (a record in issue 27 hung infer for minutes)
    started = time.perf_counter()
    ids = fmt.prompt_ids("你好", long_history, src_length=64)
    assert time.perf_counter() - started < 2 and len(ids) <= 64
    assert ids == fmt.prompt_ids("你好", long_history[-len(history):], src_length=64)  # the same newest turns kept


def test_chatglm3_conversation_cutting_is_linear_and_counts_each_prompt_once(tiny_tokenizer):
    import time

    from data import ChatTurn

    fmt = get_prompt_format("chatglm3", tiny_tokenizer("chatglm3"))
    turns = [ChatTurn("system", "简短回答")] + [ChatTurn(role, f"{role}{i}") for i in range(5000)
                                                for role in ("user", "assistant")] + [ChatTurn("user", "类型#裙")]
    started = time.perf_counter()
    ids = fmt.turns_prompt_ids(turns, src_length=48)
    assert time.perf_counter() - started < 2 and len(ids) <= 48 and fmt.cut_prompts == 1
    kept = turns[-200:]  # the slow, obvious rule: the system message stays, the oldest of the others go first
    while len(fmt.turns_prompt_ids([turns[0]] + kept)) > 48:
        kept = kept[1:]
    assert len(kept) > 2 and ids == fmt.turns_prompt_ids([turns[0]] + kept)


def test_a_src_length_below_the_template_is_refused(tiny_tokenizer):
    fmt = get_prompt_format("chatglm2", tiny_tokenizer("chatglm2"))
    with pytest.raises(DataFormatError, match="--src_length 4 cannot hold"):
        fmt.prompt_ids("你好" * 10, src_length=4)


def test_chatglm_v1_positions_and_mask_by_hand():
    # x x [gMASK] <sop> a b  (gmask=5, sop=7)
    ids = [100, 101, 5, 7, 200, 201]
    pos = chatglm_position_ids(ids, gmask_id=5, bos_id=7)
    np.testing.assert_array_equal(pos, [[0, 1, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3]])
    mask = chatglm_attention_mask(ids, bos_id=7)[0]
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 0, 0, 0])  # the prompt sees the whole prompt
    np.testing.assert_array_equal(mask[4], [1, 1, 1, 1, 1, 0])  # the answer sees what came before


@pytest.mark.parametrize("model_type", ["chatglm", "chatglm2", "chatglm3"])
def test_collator_left_pads_without_moving_positions(model_type, tiny_tokenizer):
    tok = tiny_tokenizer(model_type)
    fmt = get_prompt_format(model_type, tok)
    short = tokenize_example(fmt, Example("你好", "好"), 32, 8)
    long = tokenize_example(fmt, HAND_WRITTEN, 64, 16)
    batch = DataCollator(tok, model_type)([short, long])
    alone = DataCollator(tok, model_type)([short])
    pad = batch["input_ids"].shape[1] - alone["input_ids"].shape[1]
    assert pad > 0 and (batch["input_ids"][0, :pad] == tok.pad_token_id).all()
    assert (batch["labels"][0, :pad] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(batch["input_ids"][0, pad:], alone["input_ids"][0])
    if model_type == "chatglm":
        np.testing.assert_array_equal(batch["position_ids"][0][:, pad:], alone["position_ids"][0])
        np.testing.assert_array_equal(batch["attention_mask"][0][0, pad:, pad:], alone["attention_mask"][0][0])
        assert not batch["attention_mask"][0][0, :, :pad].any()
    else:
        np.testing.assert_array_equal(batch["position_ids"][0, pad:], alone["position_ids"][0])
        np.testing.assert_array_equal(batch["attention_mask"][0], [0] * pad + [1] * (len(short["input_ids"])))


# --------------------------------------------------------------------------------------------- reading


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_all_supported_formats(tmp_path):
    adgen = write(tmp_path / "a.json", '{"content": "类型#裙", "summary": "好看"}\n\n'
                                       '{"content": "q", "summary": "a", "history": [["q0", "a0"]]}\n')
    got = read_examples(adgen)
    assert got == [Example("类型#裙", "好看"), Example("q", "a", [("q0", "a0")])]
    inst = write(tmp_path / "i.json", json.dumps([
        {"instruction": "翻译", "input": "你好", "output": "hello", "history": [["hi", "嗨"]]},
        {"instruction": "1+1=?", "input": "", "output": "2"}], ensure_ascii=False, indent=1))
    assert read_examples(inst) == [Example("翻译\n你好", "hello", [("hi", "嗨")]), Example("1+1=?", "2")]
    belle = write(tmp_path / "b.json", '{"instruction": "3+4=?", "output": "7"}\n')
    assert read_examples(belle) == [Example("3+4=?", "7")]


@pytest.mark.parametrize("text, message", [
    ('{"content": "a", "summary": "b"}\n{"content": "a", "summary": \n', r"bad\.json:2: malformed JSON"),
    ('{"content": "a"}\n', r"bad\.json:1: missing field 'summary'"),
    ('{"content": "a", "summary": 3}\n', r"bad\.json:1: field 'summary' must be a string, got int"),
    ('{"text": "a"}\n', r"bad\.json:1: record has neither 'content'"),
    ('{"content": "a", "summary": "b", "history": [["q"]]}\n', r"bad\.json:1: history\[0\] must be a"),
    ('{"instruction": "a", "input": 5, "output": "b"}\n', r"bad\.json:1: field 'input' must be a string"),
    ("  \n", r"bad\.json: file is empty"),
    ('[\n {"content": "a", "summary": "b"},\n\n {"content": "a"}\n]', r"bad\.json:4: missing field 'summary'"),
    ('[\n {"content": "a", "summary": "b"},\n {"content": }\n]', r"bad\.json:3: malformed JSON"),
    ('["just text"]', r"bad\.json:1: expected a JSON object, got str"),
])
def test_bad_input_names_file_and_line(tmp_path, text, message):
    path = write(tmp_path / "bad.json", text)
    with pytest.raises(DataFormatError, match=message):
        read_examples(path)


def test_skip_bad_records_reports_how_many(tmp_path, caplog):
    path = write(tmp_path / "mixed.json", '{"content": "a", "summary": "b"}\n{oops\n{"content": 1, "summary": "x"}\n'
                                          '{"content": "c", "summary": "d"}\n')
    with pytest.raises(DataFormatError, match="--skip_bad_records"):
        read_examples(path, offer_skip=True)
    with pytest.raises(DataFormatError) as err:  # a command without the flag must not suggest it
        read_examples(path)
    assert "pass --skip_bad_records" not in str(err.value) and "mixed.json:2" in str(err.value)
    with caplog.at_level("WARNING"):
        got = read_examples(path, skip_bad_records=True)
    assert got == [Example("a", "b"), Example("c", "d")]
    assert "skipped 2 bad record(s) of 4" in caplog.text and "mixed.json:2" in caplog.text
    only_bad = write(tmp_path / "only_bad.json", "{oops\n")
    with pytest.raises(DataFormatError, match="no usable records"):
        read_examples(only_bad, skip_bad_records=True)


def test_task_folder_errors(tmp_path):
    with pytest.raises(DataFormatError, match="is not a folder"):
        task_file(tmp_path / "nope", "train")
    with pytest.raises(DataFormatError, match="dev.json not found"):
        task_file(tmp_path, "dev")


# ----------------------------------------------------------------------------------------- demo and tools


def test_demo_data_is_a_learnable_function_of_the_keywords(demo_data):
    from tools.make_demo_data import PHRASES, STYLE_KEYS

    train, dev = read_examples(demo_data / "train.json"), read_examples(demo_data / "dev.json")
    assert len(train) == 2000 and len(dev) == 100
    assert not {e.src for e in train} & {e.src for e in dev}
    for example in train[:200]:
        pairs = dict(kv.split("#") for kv in example.src.split("*"))
        style_key = STYLE_KEYS[pairs["类型"]][0]
        expected = f"这款{pairs[style_key]}" + "，".join(PHRASES[a][pairs[a]] for a in PHRASES if a in pairs) + "。"
        assert example.tgt == expected


def test_demo_data_is_deterministic(tmp_path):
    from tools.make_demo_data import make_demo_data

    a = make_demo_data(tmp_path / "a", 50, 10, seed=1)
    b = make_demo_data(tmp_path / "b", 50, 10, seed=1)
    assert (a / "train.json").read_bytes() == (b / "train.json").read_bytes()


def test_longbench_conversion_golden(tmp_path):
    from glm_tune.errors import run_cli
    from tools.longbench_to_adgen import main

    (tmp_path / "lb").mkdir()
    write(tmp_path / "lb" / "qmsum.jsonl", json.dumps({
        "input": "What was decided?", "context": "Meeting text.", "answers": ["They agreed.", "alt"],
        "length": 2, "dataset": "qmsum", "language": "en", "all_classes": None, "_id": "x"}) + "\n")
    write(tmp_path / "lb" / "vcsum.jsonl", json.dumps({"input": "", "context": "会议内容", "answers": ["总结"]},
                                                       ensure_ascii=False) + "\n")
    write(tmp_path / "prompts.json", json.dumps({
        "qmsum": "Transcript:\n{context}\n\nQuery: {input}\nAnswer:", "vcsum": "会议记录：\n{context}\n\n总结："},
        ensure_ascii=False))
    out = tmp_path / "out" / "dev.json"
    main(["--input_dir", str(tmp_path / "lb"), "--prompt_config", str(tmp_path / "prompts.json"),
          "--output_file", str(out)])
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert lines == [
        {"content": "Transcript:\nMeeting text.\n\nQuery: What was decided?\nAnswer:", "summary": "They agreed."},
        {"content": "会议记录：\n会议内容\n\n总结：", "summary": "总结"},
    ]
    assert read_examples(out)[0].tgt == "They agreed."
    with pytest.raises(SystemExit, match="no prompt for dataset 'other'"):
        write(tmp_path / "lb" / "other.jsonl", "{}\n")
        run_cli(main, ["--input_dir", str(tmp_path / "lb"), "--prompt_config", str(tmp_path / "prompts.json"),
                       "--output_file", str(tmp_path / "never.json")])
    assert not (tmp_path / "never.json").exists()


def test_decoding_skips_ids_of_the_padded_vocabulary(tiny_tokenizer):
    from glm_tune.generation import cut_at_stop, decode_answer, stop_token_ids

    tok = tiny_tokenizer("chatglm3")
    ids = tok.tokenizer.encode("白色调清爽干净")
    assert decode_answer(tok, [tok.vocab_size + 3] + ids + [tok.vocab_size]) == "白色调清爽干净"
    stops = stop_token_ids(tok, "chatglm3")
    assert cut_at_stop(ids + [tok.get_command("<|user|>")] + ids, stops) == ids
