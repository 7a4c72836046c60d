"""The MindSpore sibling on CPU: weights to and from MindSpore, ChatGLM2 logits in MindFormers equal the Paddle
suite's, LongBench preprocessing. Runs in ascend/.venv; Paddle runs only in the main venv (subprocess)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ASCEND = Path(__file__).resolve().parents[1]
ROOT = ASCEND.parent
MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"

import convert_weights
from glm_tune.conversion.checkpoint_convert import HFWeights

PADDLE_LOGITS = """
import sys, numpy as np, paddle
from glm_tune.model_loading import load_model
model = load_model(sys.argv[1], sys.argv[2]); model.eval()
ids = np.load(sys.argv[3])
with paddle.no_grad():
    np.save(sys.argv[4], model(input_ids=paddle.to_tensor(ids), use_cache=False, return_dict=True).logits.numpy())
"""


def main_venv(*args):
    return subprocess.run([str(MAIN_PYTHON), *map(str, args)], cwd=ROOT, check=True, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def paddle_and_hf(tmp_path_factory):
    """A tiny model of the Paddle suite and its conversion to THUDM's HF layout, made in the main venv."""
    built = {}

    def get(model_type):
        if model_type not in built:
            root = tmp_path_factory.mktemp(model_type)
            main_venv("tools/make_tiny_model.py", "--model_type", model_type, "--output_dir", root / "paddle")
            main_venv("tools/convert_checkpoint.py", "--input_dir", root / "paddle", "--output_dir", root / "hf",
                      "--to", "hf", "--max_shard_size", "300KB")
            built[model_type] = root
        return built[model_type]

    return get


def test_hf_mindspore_hf_round_trip_is_bit_identical(paddle_and_hf, tmp_path):
    hf = paddle_and_hf("chatglm2") / "hf"
    ckpt = convert_weights.main(["--to", "ms", "--input_dir", str(hf), "--output_file", str(tmp_path / "m.ckpt")])
    back = convert_weights.main(["--to", "hf", "--input_file", str(ckpt), "--config_dir", str(hf), "--output_dir",
                                 str(tmp_path / "back")])
    a, b = HFWeights(hf), HFWeights(back)
    assert set(a.names()) == set(b.names())
    for name in a.names():
        np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)
    assert json.loads((hf / "config.json").read_text()) == json.loads((back / "config.json").read_text())


SAME_PADDLE_WEIGHTS = """
import sys, numpy as np, paddle
a, b = (paddle.load(f"{d}/model_state.pdparams") for d in sys.argv[1:3])
assert sorted(a) == sorted(b), (sorted(a), sorted(b))
for name in a:
    assert a[name].dtype == b[name].dtype and np.array_equal(a[name].numpy(), b[name].numpy()), name
print(len(a))
"""


@pytest.mark.parametrize("model_type", ["chatglm2", "chatglm3"])
def test_paddle_mindspore_paddle_round_trip_is_bit_identical(model_type, paddle_and_hf, tmp_path):
    root = paddle_and_hf(model_type)
    ckpt = convert_weights.hf_to_ms(root / "hf", tmp_path / "m.ckpt")
    back = convert_weights.ms_to_hf(ckpt, root / "hf", tmp_path / "hf")
    main_venv("tools/convert_checkpoint.py", "--input_dir", back, "--output_dir", tmp_path / "paddle", "--to", "paddle")
    compared = main_venv("-c", SAME_PADDLE_WEIGHTS, root / "paddle", tmp_path / "paddle")
    assert int(compared.stdout.strip().splitlines()[-1]) > 10


PREDICT_RECIPE = ASCEND / "configs" / "predict_glm2_6b.yaml"
LORA_RECIPE = ASCEND / "configs" / "lora_glm2_6b.yaml"


def recipe_for(model_type):
    return ASCEND / "configs" / ("finetune_glm3_32k.yaml" if model_type == "chatglm3" else "predict_glm2_6b.yaml")


def mindformers_logits(recipe, model_dir, ckpt, ids: np.ndarray, tmp_path) -> np.ndarray:
    """Logits of MindFormers' network built from a recipe (the launchers' path), on the CPU."""
    import tasks

    network = tasks.network_for(recipe, model_dir, ckpt, seq_length=ids.shape[1], batch_size=ids.shape[0],
                                output_dir=str(tmp_path / "ms_out"))
    return tasks.logits(network, ids)


def paddle_logits(paddle_dir, model_type, ids, tmp_path) -> np.ndarray:
    np.save(tmp_path / "ids.npy", ids)
    main_venv("-c", PADDLE_LOGITS, paddle_dir, model_type, tmp_path / "ids.npy", tmp_path / "paddle.npy")
    return np.load(tmp_path / "paddle.npy")


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["chatglm2", "chatglm3"])
def test_mindformers_logits_equal_the_paddle_suite(model_type, paddle_and_hf, tmp_path):
    import mindspore as ms

    root = paddle_and_hf(model_type)
    ids = np.random.RandomState(0).randint(3, 1200, size=(1, 32)).astype(np.int64)
    ckpt = convert_weights.hf_to_ms(root / "hf", tmp_path / "m.ckpt")
    assert "transformer.rotary_pos_emb.inv_freq" in ms.load_checkpoint(str(ckpt))  # kept for the way back
    ours = mindformers_logits(recipe_for(model_type), root / "hf", ckpt, ids, tmp_path)
    reference = paddle_logits(root / "paddle", model_type, ids, tmp_path)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= 1e-4


def test_glm32k_preprocess_golden(tmp_path):
    (tmp_path / "lb").mkdir()
    (tmp_path / "lb" / "qmsum.jsonl").write_text(json.dumps(
        {"input": "What was decided?", "context": "Meeting text.", "answers": ["They agreed."]}) + "\n")
    (tmp_path / "p.json").write_text(json.dumps({"qmsum": "Transcript:\n{context}\n\nQuery: {input}\nAnswer:"}))
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(ASCEND / "glm32k_preprocess.py"), "--input_dir", str(tmp_path / "lb"),
                    "--prompt_config", str(tmp_path / "p.json"), "--output_file", str(out)], check=True)
    assert json.loads(out.read_text()) == {
        "content": "Transcript:\nMeeting text.\n\nQuery: What was decided?\nAnswer:", "summary": "They agreed."}


def launcher(script, *args, check=True):
    """One of ascend/{finetune,evaluate,predict,export}.py as a user runs it (its own process and context)."""
    result = subprocess.run([sys.executable, str(ASCEND / script), "--device_target", "CPU", *map(str, args)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    main_venv("tools/make_demo_data.py", "--output_dir", folder)
    lines = (folder / "train.json").read_text(encoding="utf-8").splitlines()
    (folder / "train48.json").write_text("\n".join(lines[:48]) + "\n", encoding="utf-8")
    dev = (folder / "dev.json").read_text(encoding="utf-8").splitlines()
    (folder / "dev2.json").write_text("\n".join(dev[:2]) + "\n", encoding="utf-8")
    return folder


TRAIN_FLAGS = ("--batch_size", 4, "--max_source_length", 48, "--max_target_length", 48)


@pytest.fixture(scope="module")
def finetuned(paddle_and_hf, demo_data, tmp_path_factory):
    """12 steps of MindFormers' Trainer on 48 demo records, full (the GLM2 recipe) and LoRA (its LoRA recipe)."""
    runs = {}

    def get(kind):
        if kind not in runs:
            out = tmp_path_factory.mktemp(kind)
            recipe = {"full": "finetune_glm2_6b.yaml", "lora": "lora_glm2_6b.yaml"}[kind]
            lr = {"full": 1e-3, "lora": 1e-2}[kind]
            launcher("finetune.py", "--config", ASCEND / "configs" / recipe, "--model_dir",
                     paddle_and_hf("chatglm2") / "hf", "--train_data", demo_data / "train48.json", "--output_dir",
                     out, "--learning_rate", lr, "--save_checkpoint_steps", 6, "--keep_checkpoint_max", 2,
                     *TRAIN_FLAGS)
            runs[kind] = out
        return runs[kind]

    return get


def loss_by_step(out: Path) -> dict:
    return {record["step"]: record["loss"] for record in map(json.loads, (out / "log_history.jsonl").read_text()
                                                              .splitlines())}


def losses_of(out: Path) -> list:
    return [loss for _, loss in sorted(loss_by_step(out).items())]


def trained_checkpoint(out: Path) -> Path:
    import tasks

    return tasks.latest_checkpoint(out)


@pytest.mark.slow
def test_full_finetune_lowers_the_loss_and_the_tuned_model_runs_in_paddle(finetuned, paddle_and_hf, tmp_path):
    import mindspore as ms

    out = finetuned("full")
    losses = losses_of(out)
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.85 * losses[0]
    ckpt = trained_checkpoint(out)
    start = ms.load_checkpoint(str(out / "converted" / "hf.ckpt"))
    tuned = ms.load_checkpoint(str(ckpt))
    name = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    assert np.abs(tuned[name].asnumpy() - start[name].asnumpy()).max() > 1e-4  # the layers trained, not just the head
    # MindSpore -> HF -> Paddle: the Paddle suite computes the tuned model's logits
    hf = convert_weights.ms_to_hf(ckpt, paddle_and_hf("chatglm2") / "hf", tmp_path / "hf")
    main_venv("tools/convert_checkpoint.py", "--input_dir", hf, "--output_dir", tmp_path / "paddle", "--to", "paddle")
    ids = np.random.RandomState(1).randint(3, 1200, size=(1, 24)).astype(np.int64)
    ours = mindformers_logits(PREDICT_RECIPE, hf, ckpt, ids, tmp_path)
    assert np.abs(ours - paddle_logits(tmp_path / "paddle", "chatglm2", ids, tmp_path)).max() <= 1e-4


@pytest.mark.slow
def test_resumed_finetune_continues_the_run_exactly(finetuned, paddle_and_hf, demo_data, tmp_path):
    full = finetuned("full")
    middle = next((full / "checkpoint" / "rank_0").glob("*_6.ckpt"))
    launcher("finetune.py", "--model_dir", paddle_and_hf("chatglm2") / "hf", "--train_data",
             demo_data / "train48.json", "--output_dir", tmp_path, "--learning_rate", 1e-3,
             "--resume_from_checkpoint", middle, *TRAIN_FLAGS)
    uninterrupted, resumed = loss_by_step(full), loss_by_step(tmp_path)
    assert sorted(resumed) == list(range(7, 13))
    for step, loss in resumed.items():
        assert abs(loss - uninterrupted[step]) <= 1e-6, (step, loss, uninterrupted[step])


@pytest.mark.slow
def test_lora_finetune_trains_the_adapters_and_folds_into_weights_paddle_runs(finetuned, paddle_and_hf, tmp_path):
    import mindspore as ms

    out = finetuned("lora")
    losses = losses_of(out)
    assert np.mean(losses[-3:]) < 0.95 * losses[0]
    ckpt = trained_checkpoint(out)
    tuned = ms.load_checkpoint(str(ckpt))
    lora_b = [v.asnumpy() for k, v in tuned.items() if k.endswith("lora_b") and not k.startswith("adam")]
    assert lora_b and all(np.abs(b).max() > 0 for b in lora_b)  # B starts at 0: it moved
    ids = np.random.RandomState(2).randint(3, 1200, size=(1, 24)).astype(np.int64)
    hf_dir = paddle_and_hf("chatglm2") / "hf"
    adapter = mindformers_logits(LORA_RECIPE, hf_dir, ckpt, ids, tmp_path)  # base + adapters, as trained
    folded = convert_weights.ms_to_hf(ckpt, hf_dir, tmp_path / "hf")
    assert not [n for n in HFWeights(folded).names() if "lora" in n]
    main_venv("tools/convert_checkpoint.py", "--input_dir", folded, "--output_dir", tmp_path / "paddle", "--to",
              "paddle")
    reference = paddle_logits(tmp_path / "paddle", "chatglm2", ids, tmp_path)
    base = paddle_logits(paddle_and_hf("chatglm2") / "paddle", "chatglm2", ids, tmp_path)
    assert np.abs(adapter - reference).max() <= 1e-4
    assert np.abs(adapter - base).max() > 1e-3  # the adapters changed the model


@pytest.mark.slow
def test_eval_scores_with_the_suite_metric(finetuned, paddle_and_hf, demo_data, tmp_path):
    from utils import compute_metrics

    launcher("evaluate.py", "--model_dir", paddle_and_hf("chatglm2") / "hf", "--load_checkpoint",
             trained_checkpoint(finetuned("full")), "--eval_data", demo_data / "dev2.json", "--output_dir", tmp_path,
             "--max_decode_length", 96)
    pairs = [json.loads(line) for line in (tmp_path / "eval_predictions.jsonl").read_text().splitlines()]
    dev = [json.loads(line) for line in (demo_data / "dev2.json").read_text().splitlines()]
    assert [p["label"] for p in pairs] == [d["summary"] for d in dev]
    scores = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert set(scores) == {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}
    assert scores == compute_metrics([p["prediction"] for p in pairs], [p["label"] for p in pairs])


PREDICT_RECIPES = {"chatglm2": ("predict_glm2_6b.yaml", []),  # GLM3-32K at a CPU-sized static length
                   "chatglm3": ("predict_glm3_32k.yaml", ["--seq_length", 512])}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["chatglm2", "chatglm3"])
def test_predict_answers_equal_the_paddle_suite_word_for_word(model_type, paddle_and_hf, demo_data, tmp_path):
    root = paddle_and_hf(model_type)
    recipe, extra = PREDICT_RECIPES[model_type]
    launcher("predict.py", "--config", ASCEND / "configs" / recipe, "--model_dir", root / "hf", "--input_file",
             demo_data / "dev2.json", "--output_file", tmp_path / "ms.jsonl", "--output_dir", tmp_path / "out",
             "--max_new_tokens", 8, *extra)
    main_venv("predict_generation.py", "--model_name_or_path", root / "paddle", "--data_file",
              demo_data / "dev2.json", "--output_file", tmp_path / "paddle.json", "--tgt_length", 8,
              "--src_length", 64, "--batch_size", 1)
    ours = [json.loads(line)["answer"] for line in (tmp_path / "ms.jsonl").read_text().splitlines()]
    paddle = [json.loads(line)["output"] for line in (tmp_path / "paddle.json").read_text().splitlines()]
    assert ours == paddle and len(ours) == 2 and all(ours)


@pytest.mark.slow
def test_exported_mindir_computes_the_networks_logits(paddle_and_hf, tmp_path):
    import mindspore as ms

    hf = paddle_and_hf("chatglm2") / "hf"
    ckpt = convert_weights.hf_to_ms(hf, tmp_path / "m.ckpt")
    launcher("export.py", "--model_dir", hf, "--load_checkpoint", ckpt, "--output_dir", tmp_path / "export")
    mindir = tmp_path / "export" / "mindir" / "glm2.mindir"
    ids = np.random.RandomState(3).randint(3, 1200, size=(1, 512)).astype(np.int32)
    expected = mindformers_logits(PREDICT_RECIPE, hf, ckpt, ids, tmp_path)
    graph = ms.nn.GraphCell(ms.load(str(mindir)))
    got = graph(ms.Tensor(ids))
    got = (got[0] if isinstance(got, (tuple, list)) else got).asnumpy()
    assert np.abs(got.reshape(expected.shape) - expected).max() <= 1e-4


def test_a_malformed_record_stops_the_finetune_with_file_and_line(paddle_and_hf, tmp_path):
    bad = tmp_path / "train.json"
    bad.write_text('{"content": "a", "summary": "b"}\n{"content": "c", "summary": \n', encoding="utf-8")
    ckpt = convert_weights.hf_to_ms(paddle_and_hf("chatglm2") / "hf", tmp_path / "m.ckpt")
    result = launcher("finetune.py", "--model_dir", paddle_and_hf("chatglm2") / "hf", "--load_checkpoint", ckpt,
                      "--train_data", bad, "--output_dir", tmp_path / "out", *TRAIN_FLAGS, check=False)
    assert result.returncode != 0
    assert f"{bad}:2" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "checkpoint" / "rank_0").exists()
