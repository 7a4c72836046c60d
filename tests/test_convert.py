"""Hugging Face <-> Paddle conversion: exact round trips, logits against transformers' GLM, refusals."""
import json
import logging
from pathlib import Path

import numpy as np
import paddle
import pytest

from glm_tune.conversion.checkpoint_convert import (ConversionError, HFWeights, convert_hf_to_paddle,
                                                     convert_paddle_to_hf)
from glm_tune.conversion.hf_layout import SAFETENSORS_INDEX
from glm_tune.model_loading import load_model
from tools.make_tiny_model import make_tiny_model

from .conftest import GENERATIONS


def hf_tensors(folder) -> dict:
    weights = HFWeights(folder)
    return {name: weights.get(name) for name in weights.names()}


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    built = {}

    def get(model_type, **sizes):
        key = (model_type, tuple(sorted(sizes.items())))
        if key not in built:
            out = tmp_path_factory.mktemp(f"hf_{model_type}") / "model"
            built[key] = make_tiny_model(model_type, out, fmt="hf", max_shard_size="300KB", sizes=sizes or None)
        return built[key]

    return get


@pytest.mark.parametrize("model_type", GENERATIONS)
def test_hf_to_paddle_to_hf_is_bit_identical(model_type, tiny_hf, tiny_dir, tmp_path):
    hf = tiny_hf(model_type)
    assert len(json.loads((hf / SAFETENSORS_INDEX).read_text())["weight_map"].values()) and \
        len(set(json.loads((hf / SAFETENSORS_INDEX).read_text())["weight_map"].values())) >= 2
    paddle_dir = convert_hf_to_paddle(hf, tmp_path / "paddle", max_shard_size="400KB")
    assert (paddle_dir / "model_state.pdparams.index.json").exists()  # sharded output
    back = convert_paddle_to_hf(paddle_dir, tmp_path / "hf", max_shard_size="300KB")
    original, again = hf_tensors(hf), hf_tensors(back)
    assert set(original) == set(again)
    for name in original:
        assert original[name].dtype == again[name].dtype
        np.testing.assert_array_equal(original[name], again[name], err_msg=name)
    assert json.loads((hf / "config.json").read_text()) == json.loads((back / "config.json").read_text())
    # The Paddle side is what the Paddle-layout tiny model holds, and every script loads it.
    converted = load_model(str(paddle_dir), model_type).state_dict()
    reference = load_model(str(tiny_dir(model_type)), model_type).state_dict()
    for name in reference:
        np.testing.assert_array_equal(converted[name].numpy(), reference[name].numpy(), err_msg=name)


def glm_logits_match(hf_dir, paddle_dir, model_type):
    import torch

    from glm_tune.conversion.hf_glm import build_glm_model

    reference = build_glm_model(hf_tensors(hf_dir), json.loads((Path(hf_dir) / "config.json").read_text()))
    model = load_model(str(paddle_dir), model_type)
    model.eval()
    rng = np.random.RandomState(0)
    worst = 0.0
    for length in (1, 5, 17, 64):
        ids = rng.randint(3, 1200, size=(2, length))
        with torch.no_grad():
            expected = reference(torch.from_numpy(ids)).logits.numpy()
        with paddle.no_grad():
            got = model(input_ids=paddle.to_tensor(ids), use_cache=False, return_dict=True).logits.numpy()
        worst = max(worst, float(np.abs(expected - got).max()))
    return worst


@pytest.mark.parametrize("model_type", ["chatglm2", "chatglm3"])
def test_converted_logits_equal_transformers_glm(model_type, tiny_hf, tmp_path):
    hf = tiny_hf(model_type)
    paddle_dir = convert_hf_to_paddle(hf, tmp_path / "paddle")
    assert glm_logits_match(hf, paddle_dir, model_type) <= 1e-4


def test_32k_rope_ratio_is_honoured(tiny_hf, tmp_path):
    hf = tiny_hf("chatglm3", rope_ratio=50)
    assert json.loads((hf / "config.json").read_text())["rope_ratio"] == 50
    paddle_dir = convert_hf_to_paddle(hf, tmp_path / "paddle")
    assert glm_logits_match(hf, paddle_dir, "chatglm3") <= 1e-4
    # Without the ratio the positions are different: the check above can fail.
    plain = json.loads((paddle_dir / "config.json").read_text())
    plain.pop("rope_ratio")
    (paddle_dir / "config.json").write_text(json.dumps(plain))
    assert glm_logits_match(hf, paddle_dir, "chatglm3") > 1e-3


def write_bin_shards(hf_dir, out_dir):
    """The same tensors as pytorch_model-0000K-of-0000N.bin shards plus their index (THUDM's older layout)."""
    import shutil

    import torch

    shutil.copytree(hf_dir, out_dir)
    index = json.loads((out_dir / SAFETENSORS_INDEX).read_text())
    for f in set(index["weight_map"].values()):
        (out_dir / f).unlink()
    (out_dir / SAFETENSORS_INDEX).unlink()
    tensors = hf_tensors(hf_dir)
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        file_name = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({n: torch.from_numpy(tensors[n]) for n in part}, out_dir / file_name)
        weight_map.update({n: file_name for n in part})
    (out_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return out_dir


def test_bin_shards_convert_like_safetensors(tiny_hf, tmp_path, caplog):
    bin_dir = write_bin_shards(tiny_hf("chatglm2"), tmp_path / "bin")
    with caplog.at_level(logging.INFO):
        from_bin = convert_hf_to_paddle(bin_dir, tmp_path / "from_bin")
    assert "torch.load(weights_only=True" in caplog.text
    from_st = convert_hf_to_paddle(tiny_hf("chatglm2"), tmp_path / "from_st")
    a = paddle.load(str(from_bin / "model_state.pdparams"))
    b = paddle.load(str(from_st / "model_state.pdparams"))
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name].numpy(), b[name].numpy())


def damaged_copy(hf_dir, out_dir, drop=None, add=None, reshape=None):
    """Rewrite the HF checkpoint as one safetensors file with a tensor dropped, added or reshaped."""
    import shutil

    from glm_tune.conversion.safetensors_io import write_safetensors

    shutil.copytree(hf_dir, out_dir)
    tensors = hf_tensors(hf_dir)
    for f in set(json.loads((out_dir / SAFETENSORS_INDEX).read_text())["weight_map"].values()):
        (out_dir / f).unlink()
    (out_dir / SAFETENSORS_INDEX).unlink()
    if drop:
        tensors.pop(drop)
    if add:
        tensors[add] = np.zeros(3, np.float32)
    if reshape:
        tensors[reshape] = tensors[reshape][:-1]
    write_safetensors(out_dir / "model.safetensors", tensors)
    return out_dir


QKV = "transformer.encoder.layers.1.self_attention.query_key_value.weight"


@pytest.mark.parametrize("damage, message", [
    (dict(drop=QKV), r"missing tensors \['chatglm_v2\.encoder\.layers\.1\.self_attention\.query_key_value\.weight'\]"),
    (dict(add="transformer.extra.weight"), r"unexpected tensors \['transformer\.extra\.weight'\]"),
    (dict(reshape=QKV), r"wrong shapes: \['transformer\.encoder\.layers\.1\.self_attention\.query_key_value\.weight"),
])
def test_refusals_name_the_tensor_and_write_nothing(damage, message, tiny_hf, tmp_path):
    bad = damaged_copy(tiny_hf("chatglm2"), tmp_path / "bad", **damage)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ConversionError, match=message):
        convert_hf_to_paddle(bad, out, overwrite=True)  # past the folder guard: the tensor check refuses
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "out"]  # no staging folder left behind


def test_missing_shard_file_is_named(tiny_hf, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_hf("chatglm3"), broken)
    first = sorted(set(json.loads((broken / SAFETENSORS_INDEX).read_text())["weight_map"].values()))[0]
    (broken / first).unlink()
    with pytest.raises(ConversionError, match=f"missing: \\['{first}'\\]"):
        convert_hf_to_paddle(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_scripts_accept_a_hugging_face_folder(tiny_hf, tmp_path, monkeypatch, caplog):
    import predict_generation

    monkeypatch.setenv("GLM_TUNE_CACHE", str(tmp_path / "cache"))
    hf = tiny_hf("chatglm2")
    argv = ["--model_name_or_path", str(hf), "--src_length", "32", "--tgt_length", "4"]
    with caplog.at_level(logging.INFO):
        first = predict_generation.main(argv)
    assert "is a Hugging Face checkpoint: converting it to Paddle" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = predict_generation.main(argv)
    assert "using its Paddle conversion" in caplog.text and first == again
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 1
