"""The PyTorch QLoRA sibling on tiny GLM-layout models: same prompts as the main suite, training, merging,
streaming, and what bitsandbytes does on CPU."""
import json

import numpy as np
import pytest
import torch

import common
import finetune
import merge_lora
from data import Example

from .conftest import run_main_venv

EXAMPLES = [Example("类型#上衣*颜色#白色", "这款衬衫白色调清爽干净。", [("你好", "你好！"), ("谢谢", "不客气")]),
            Example("晚上睡不着应该怎么办"), Example("翻译\n我喜欢学习", "I like studying.", [("hi", "嗨")])]

MAIN_SUITE_IDS = """
import json, sys
from paddlenlp.transformers import ChatGLMv2Tokenizer
from data import Example, get_prompt_format, tokenize_example
tok = ChatGLMv2Tokenizer(vocab_file=sys.argv[1])
fmt = get_prompt_format(sys.argv[2], tok)
examples = [Example(e["src"], e["tgt"], [tuple(h) for h in e["history"]]) for e in json.loads(sys.argv[3])]
print(json.dumps([[fmt.prompt_ids(e.src, e.history), fmt.target_ids(e.tgt)] for e in examples]))
"""


@pytest.mark.parametrize("model_type", ["chatglm2", "chatglm3"])
def test_prompt_format_matches_the_main_suite(model_type, tiny_glm):
    folder = tiny_glm(model_type)
    tokenizer = common.load_tokenizer(folder)
    from data import get_prompt_format

    fmt = get_prompt_format(common.model_generation(folder), tokenizer)
    ours = [[fmt.prompt_ids(e.src, e.history), fmt.target_ids(e.tgt)] for e in EXAMPLES]
    payload = json.dumps([{"src": e.src, "tgt": e.tgt, "history": e.history} for e in EXAMPLES], ensure_ascii=False)
    out = run_main_venv("-c", MAIN_SUITE_IDS, folder / "tokenizer.model", model_type, payload)
    assert ours == json.loads(out.stdout.strip().splitlines()[-1])
    assert tokenizer.decode(fmt.target_ids(EXAMPLES[0].tgt), skip_special_tokens=True).strip() == EXAMPLES[0].tgt


def test_conversations_keep_the_main_suites_layout_with_unshifted_labels(tiny_glm, tmp_path):
    from data import get_prompt_format, read_examples, tokenize_example

    tool = {"name": "get_weather", "description": "天气", "parameters": {"city": "string"}}
    record = {"tools": [tool], "conversations": [
        {"role": "user", "content": "北京天气"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": {"temp": 3}},
        {"role": "assistant", "content": "北京3度"}]}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    folder = tiny_glm("chatglm3")
    tokenizer = common.load_tokenizer(folder)
    [feature] = finetune.build_features(path, tokenizer, "chatglm3", 512, 512)
    shifted = tokenize_example(get_prompt_format("chatglm3", tokenizer), read_examples(path)[0], 512, 512)
    assert feature["input_ids"][:-1] == shifted["input_ids"] and feature["labels"][1:] == shifted["labels"]
    assert feature["input_ids"][-1] == tokenizer.eos_token_id and feature["labels"][-1] == tokenizer.eos_token_id
    assert len(feature["input_ids"]) == len(feature["labels"])


def train(folder, data, out, bits, steps, lr=1e-2):
    return finetune.main(["--base_model", str(folder), "--data_path", str(data), "--output_dir", str(out),
                          "--bits", str(bits), "--max_steps", str(steps), "--per_device_train_batch_size", "8",
                          "--learning_rate", str(lr), "--logging_steps", "1", "--report_to", "none",
                          "--use_cpu", "True", "--seed", "0", "--lora_dropout", "0", "--save_strategy", "no"])


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_lora_steps_lower_the_loss_on_cpu(bits, tiny_glm, instruction_data, tmp_path):
    # bitsandbytes 0.50 runs NF4 and LLM.int8 on CPU (a slower fallback path, without its optional kernels).
    trainer = train(tiny_glm("chatglm3"), instruction_data, tmp_path, bits, steps=40, lr=1e-2)
    curve = losses(trainer)
    assert len(curve) == 40 and np.mean(curve[-5:]) < np.mean(curve[:5]) - 0.5
    layer = trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    final = tmp_path / "checkpoint-final"
    assert (final / "adapter_model.safetensors").exists() and (final / "tokenizer.model").exists()


@pytest.mark.slow
def test_merged_model_equals_base_plus_adapter(tiny_glm, instruction_data, tmp_path):
    from peft import PeftModel

    folder = tiny_glm("chatglm2")
    train(folder, instruction_data, tmp_path / "run", bits=16, steps=6, lr=5e-2)
    adapter = tmp_path / "run" / "checkpoint-final"
    merged_dir = merge_lora.main(["--lora_model", str(adapter), "--output_dir", str(tmp_path / "merged")])
    ids = torch.tensor([common.prompt_ids(common.load_tokenizer(folder), "chatglm2", e.src, e.history)[:12]
                        for e in EXAMPLES[:2]])
    with torch.no_grad():
        unmerged = PeftModel.from_pretrained(common.load_model(folder), str(adapter)).eval()(ids).logits
        base = common.load_model(folder)(ids).logits
        merged = common.load_model(merged_dir)(ids).logits
    assert (unmerged - base).abs().max() > 1e-3  # the adapter changes the model
    assert (merged - unmerged).abs().max() <= 1e-5
    assert common.model_generation(merged_dir) == "chatglm2"


@pytest.mark.parametrize("model_type", ["chatglm2", "chatglm3"])
def test_streamed_chunks_concatenate_to_the_greedy_answer(model_type, tiny_glm):
    folder = tiny_glm(model_type)
    model, tokenizer = common.load_model(folder), common.load_tokenizer(folder)
    for example in EXAMPLES:
        chunks = list(common.stream_chat(model, tokenizer, model_type, example.src, example.history, 24))
        ids = torch.tensor([common.prompt_ids(tokenizer, model_type, example.src, example.history)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                 eos_token_id=common.stop_ids(tokenizer, model_type),
                                 pad_token_id=tokenizer.pad_token_id)
        greedy = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        assert len(chunks) > 1 and "".join(chunks).strip() == greedy


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tiny_glm, instruction_data, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(Path(finetune.__file__)), "--base_model",
                           str(tiny_glm("chatglm2")), "--data_path", str(instruction_data), "--output_dir",
                           str(tmp_path), "--bits", "4", "--max_steps", "3", "--per_device_train_batch_size", "2",
                           "--logging_steps", "1", "--report_to", "none", "--use_cpu", "True", "--ddp_backend",
                           "gloo", "--save_strategy", "no"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved adapter and tokenizer") == 1  # the main process saves, once
    assert (tmp_path / "checkpoint-final" / "adapter_model.safetensors").exists()


def test_merge_refuses_a_folder_it_did_not_write_before_loading_anything(tmp_path):
    from glm_tune.safe_output import OutputRefused

    target = tmp_path / "models"
    (target / "other_model").mkdir(parents=True)
    (target / "other_model" / "weights.bin").write_bytes(b"keep")
    with pytest.raises(OutputRefused, match="already exists and is not written by this command"):
        merge_lora.merge(tmp_path / "no_adapter_needed", target)
    assert (target / "other_model" / "weights.bin").read_bytes() == b"keep"
    with pytest.raises(OutputRefused, match="is also --lora_model"):
        merge_lora.merge(tmp_path / "adapter", tmp_path / "adapter")
