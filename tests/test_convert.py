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


def test_safetensors_files_take_tensors_in_any_order_and_refuse_gaps(tmp_path, monkeypatch):
    """The writer conversions stream through: planned first, filled tensor by tensor (a transpose in row blocks)."""
    import ml_dtypes

    from glm_tune.conversion import safetensors_io
    from glm_tune.conversion.hf_layout import SafetensorsShards

    monkeypatch.setattr(safetensors_io, "_WRITE_ROWS_BYTES", 100)  # many row blocks for a 37 x 23 transpose
    rng = np.random.RandomState(0)
    tensors = {"a": rng.rand(23, 37).astype(np.float32).T, "b": rng.rand(5).astype(ml_dtypes.bfloat16),
               "c": rng.rand(300, 8).astype(np.float16), "d": np.array(3, np.int64)}
    shards = SafetensorsShards(tmp_path, [(n, a.shape, a.dtype) for n, a in tensors.items()], "2KB")
    for name in ["d", "c", "a", "b"]:
        shards.write(name, tensors[name])
    files = shards.close()
    assert len(files) == 5 and files[-1] == SAFETENSORS_INDEX  # a 3.4 KB, b 10 B, c 4.8 KB, d: none fit together
    read = hf_tensors(tmp_path)
    assert set(read) == set(tensors)
    for name, array in tensors.items():
        assert read[name].dtype == array.dtype and read[name].shape == array.shape
        np.testing.assert_array_equal(read[name], array)

    (tmp_path / "x").mkdir()
    shards = SafetensorsShards(tmp_path / "x", [("a", (2, 3), np.float32), ("b", (4,), np.float32)])
    with pytest.raises(safetensors_io.SafetensorsError, match=r"planned as float32 \[2, 3\] but arrived as "
                                                              r"float32 \[3, 2\]"):
        shards.write("a", np.zeros((3, 2), np.float32))
    shards.write("a", np.zeros((2, 3), np.float32))
    with pytest.raises(safetensors_io.SafetensorsError, match="written twice"):
        shards.write("a", np.zeros((2, 3), np.float32))
    with pytest.raises(safetensors_io.SafetensorsError, match=r"never written: \['b'\]"):
        shards.close()


def test_paddle_files_are_saved_as_paddle_saves_them(tmp_path):
    """save_paddle_file (paddle.save's format without its memo, which held a shard three times) reads back the same
    through paddle.load, tensors of every dtype and plain arrays alike."""
    from glm_tune.conversion.checkpoint_convert import load_paddle_file, save_paddle_file

    rng = np.random.RandomState(1)
    state = {"w": paddle.to_tensor(rng.rand(7, 3).astype(np.float32)),
             "h": paddle.to_tensor(rng.rand(4).astype(np.float16)),
             "b": paddle.to_tensor(rng.rand(2, 5).astype(np.float32)).astype("bfloat16"),
             "p": paddle.create_parameter([3], "float32"), "n": rng.rand(6).astype(np.float32)}
    paddle.save(state, str(tmp_path / "reference.pdparams"))
    save_paddle_file(state, tmp_path / "ours.pdparams")
    for return_numpy in (False, True):
        reference = load_paddle_file(tmp_path / "reference.pdparams", return_numpy=return_numpy)
        ours = load_paddle_file(tmp_path / "ours.pdparams", return_numpy=return_numpy)
        assert set(ours) == set(reference) == set(state)
        for name in state:
            a, b = ours[name], reference[name]
            assert type(a) is type(b) and str(a.dtype) == str(b.dtype), name
            np.testing.assert_array_equal(np.asarray(a.astype("float32") if not return_numpy else a, np.float32),
                                          np.asarray(b.astype("float32") if not return_numpy else b, np.float32))


def test_paddle_to_hf_refuses_mixed_dtypes_unless_told_one(tiny_dir, tmp_path):
    """The Hugging Face files are planned from the first tensor's dtype; a later tensor of another dtype is refused
    by name (nothing written), and --dtype writes them all in one."""
    import shutil

    from glm_tune.conversion.checkpoint_convert import save_paddle_file

    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_dir("chatglm2"), mixed)
    state = paddle.load(str(mixed / "model_state.pdparams"))
    last = list(state)[-1]
    state[last] = state[last].astype("float16")
    save_paddle_file(state, mixed / "model_state.pdparams")
    with pytest.raises(ConversionError, match=f"{last} is float16 but earlier tensors are float32; pass --dtype"):
        convert_paddle_to_hf(mixed, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed"]
    out = hf_tensors(convert_paddle_to_hf(mixed, tmp_path / "hf", dtype="float16"))
    assert {a.dtype for a in out.values()} == {np.dtype(np.float16)}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_round_trip_rounds_once(dtype, tiny_hf, tmp_path):
    """fp32 -> Paddle in half precision -> Hugging Face: every value is the fp32 value rounded once to the
    nearest half-precision number, and paddle.load reads the Paddle side in that dtype."""
    import ml_dtypes

    hf = tiny_hf("chatglm2")
    paddle_dir = convert_hf_to_paddle(hf, tmp_path / "paddle", dtype=dtype, max_shard_size="400KB")
    state = {}
    for shard in sorted(paddle_dir.glob("model_state-*.pdparams")):
        state.update(paddle.load(str(shard)))
    assert len(state) == len(hf_tensors(hf)) and {str(t.dtype) for t in state.values()} == {f"paddle.{dtype}"}
    back = hf_tensors(convert_paddle_to_hf(paddle_dir, tmp_path / "hf"))
    numpy_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    for name, original in hf_tensors(hf).items():
        assert back[name].dtype == numpy_dtype, name
        np.testing.assert_array_equal(back[name].view(np.uint16), original.astype(numpy_dtype).view(np.uint16))


def test_half_precision_test_model_is_the_fp32_one_rounded(tiny_hf, tmp_path):
    """make_tiny_model --dtype float16 (THUDM's shipping dtype, for the real-size bench) writes the same model."""
    half = make_tiny_model("chatglm2", tmp_path / "fp16", fmt="hf", dtype="float16")
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "float16"
    written = hf_tensors(half)
    for name, original in hf_tensors(tiny_hf("chatglm2")).items():
        assert written[name].dtype == np.float16, name
        np.testing.assert_array_equal(written[name], original.astype(np.float16), err_msg=name)
