"""Tiny models: real architectures, loadable exactly like real checkpoint folders, deterministic."""
import json

import numpy as np
import paddle
import pytest
from paddlenlp.transformers import AutoModelForCausalLM, AutoTokenizer

from data import DataCollator, Example, get_prompt_format, tokenize_example
from glm_tune.glm_family import NotAChatGLMCheckpoint, detect_generation
from glm_tune.conversion.hf_layout import SAFETENSORS_INDEX, needs_transpose, paddle_to_hf_name
from tools.make_tiny_model import build_tiny_model, make_tiny_model

from .conftest import GENERATIONS


def forward_logits(model, tokenizer, model_type, texts):
    fmt = get_prompt_format(model_type, tokenizer)
    feats = [tokenize_example(fmt, Example(t), 64, 16, is_test=True) for t in texts]
    batch = DataCollator(tokenizer, model_type)([{"input_ids": f["input_ids"]} for f in feats])
    with paddle.no_grad():
        out = model(**{k: paddle.to_tensor(v) for k, v in batch.items()}, use_cache=False, return_dict=True)
    return out.logits.numpy()


@pytest.mark.parametrize("model_type", GENERATIONS)
def test_build_save_reload_gives_identical_logits(model_type, tmp_path):
    model, tokenizer = build_tiny_model(model_type, seed=7)
    texts = ["类型#上衣*材质#牛仔布", "你好"]
    before = forward_logits(model, tokenizer, model_type, texts)
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    reloaded.eval()
    re_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    after = forward_logits(reloaded, re_tok, model_type, texts)
    assert np.isfinite(before).all()
    np.testing.assert_array_equal(before, after)
    assert detect_generation(tmp_path) == model_type


@pytest.mark.parametrize("model_type", GENERATIONS)
def test_real_architecture_features(model_type, tiny_dir):
    config = json.loads((tiny_dir(model_type) / "config.json").read_text())
    if model_type == "chatglm":
        assert config["model_type"] == "chatglm"
        assert config["position_encoding_2d"] is True and config["activation"] == "gelu"
        assert config["attention_scale"] is True
    else:
        assert config["model_type"] == "chatglm_v2"
        assert config["multi_query_group_num"] == 2 and config["rmsnorm"] is True
        assert config["kv_channels"] * config["num_attention_heads"] == config["hidden_size"]
        assert config["ffn_hidden_size"] == 2 * config["hidden_size"]  # SwiGLU width as built
    assert 2 <= config["num_hidden_layers"] <= 4 and 64 <= config["hidden_size"] <= 256


def test_tokenizers_carry_the_real_special_tokens(tiny_tokenizer):
    v1 = tiny_tokenizer("chatglm")
    for piece in ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<n>"]:
        assert v1.convert_ids_to_tokens(v1.convert_tokens_to_ids(piece)) == piece
    assert v1.bos_token == "<sop>" and v1.eos_token == "<eop>"
    for model_type in ["chatglm2", "chatglm3"]:
        tok = tiny_tokenizer(model_type)
        ids = [tok.get_command(t) for t in ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>",
                                             "<|user|>", "<|assistant|>", "<|observation|>"]]
        # Appended after the SentencePiece vocabulary in THUDM's order, as in the real tokenizer.
        n = tok.tokenizer.sp_model.vocab_size()
        assert ids == list(range(n, n + 9))
        assert tok.eos_token_id == 2 and tok.pad_token_id == 0


def test_deterministic_given_seed(tmp_path):
    a = make_tiny_model("chatglm2", tmp_path / "a", seed=3)
    b = make_tiny_model("chatglm2", tmp_path / "b", seed=3)
    c = make_tiny_model("chatglm2", tmp_path / "c", seed=4)
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()
    wa, wb, wc = (paddle.load(str(d / "model_state.pdparams")) for d in (a, b, c))
    for name in wa:
        np.testing.assert_array_equal(wa[name].numpy(), wb[name].numpy())
    assert any(not np.array_equal(wa[n].numpy(), wc[n].numpy()) for n in wa if "inv_freq" not in n)


@pytest.mark.parametrize("model_type", GENERATIONS)
def test_hf_layout_holds_the_same_weights(model_type, tmp_path, tiny_dir):
    from safetensors.numpy import load_file

    out = make_tiny_model(model_type, tmp_path / "hf", fmt="hf", max_shard_size="200KB")
    index = json.loads((out / SAFETENSORS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    tensors = {}
    for shard in shards:
        tensors.update(load_file(str(out / shard)))
    # From the loaded model, not the file: v1 ties lm_head to the embeddings and saves the pair once.
    paddle_state = AutoModelForCausalLM.from_pretrained(str(tiny_dir(model_type))).state_dict()
    ptype = "chatglm" if model_type == "chatglm" else "chatglm_v2"
    assert set(tensors) == {paddle_to_hf_name(n, ptype) for n in paddle_state}
    for name, value in paddle_state.items():
        expected = value.numpy().T if needs_transpose(name, value.ndim) else value.numpy()
        np.testing.assert_array_equal(tensors[paddle_to_hf_name(name, ptype)], expected)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "chatglm" and config["num_layers"] == 2
    assert detect_generation(out) == model_type
    vocab = "ice_text.model" if model_type == "chatglm" else "tokenizer.model"
    assert (out / vocab).read_bytes() == (tiny_dir(model_type) / vocab).read_bytes()


def test_detect_generation_on_folders_from_elsewhere(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "padded_vocab_size": 65024,
                                                      "_name_or_path": "THUDM/chatglm3-6b-32k"}))
    assert detect_generation(tmp_path) == "chatglm3"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "padded_vocab_size": 65024,
                                                      "_name_or_path": "THUDM/chatglm2-6b"}))
    assert detect_generation(tmp_path) == "chatglm2"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "inner_hidden_size": 16384}))
    assert detect_generation(tmp_path) == "chatglm"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(NotAChatGLMCheckpoint, match="model_type='llama'"):
        detect_generation(tmp_path)
    with pytest.raises(NotAChatGLMCheckpoint, match="no config.json"):
        detect_generation(tmp_path / "missing")


def test_cli_writes_a_loadable_folder(tmp_path):
    from tools.make_tiny_model import main

    main(["--model_type", "chatglm3", "--output_dir", str(tmp_path / "m"), "--hidden_size", "64",
          "--num_layers", "3"])
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 3
    assert detect_generation(tmp_path / "m") == "chatglm3"
