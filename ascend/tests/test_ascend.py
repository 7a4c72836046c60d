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
sys.path.insert(0, str(ASCEND))
sys.path.insert(0, str(ROOT))

import convert_weights  # noqa: E402
from checkpoint_convert import HFWeights  # noqa: E402

PADDLE_LOGITS = """
import sys, numpy as np, paddle
from model_loading import load_model
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


def use_cpu_mindspore():
    """PyNative on the CPU, with the CPU fixes MindFormers' ChatGLM2 needs there (ms_cpu_compat.py)."""
    import mindspore as ms

    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    import ms_cpu_compat

    assert ms_cpu_compat.install()


def mindformers_logits(ckpt, hf_config: dict, ids: np.ndarray) -> np.ndarray:
    import mindspore as ms

    import glm2_cpu

    use_cpu_mindspore()
    model = glm2_cpu.build_model(hf_config, seq_length=ids.shape[1], batch_size=ids.shape[0], checkpoint=ckpt)
    _, unused = ms.load_param_into_net(model, ms.load_checkpoint(str(ckpt)))
    assert unused == ["transformer.rotary_pos_emb.inv_freq"]
    return glm2_cpu.logits(model, ids)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["chatglm2", "chatglm3"])
def test_mindformers_logits_equal_the_paddle_suite(model_type, paddle_and_hf, tmp_path):
    root = paddle_and_hf(model_type)
    ids = np.random.RandomState(0).randint(3, 1200, size=(1, 32)).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    main_venv("-c", PADDLE_LOGITS, root / "paddle", model_type, tmp_path / "ids.npy", tmp_path / "paddle.npy")
    ckpt = convert_weights.hf_to_ms(root / "hf", tmp_path / "m.ckpt")
    ours = mindformers_logits(ckpt, json.loads((root / "hf" / "config.json").read_text()), ids)
    reference = np.load(tmp_path / "paddle.npy")
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


PADDLE_GREEDY = """
import json, sys
from generation import generate_ids
from model_loading import load_model, load_tokenizer
model, tok = load_model(sys.argv[1], sys.argv[2]), load_tokenizer(sys.argv[1], sys.argv[2])
prompts = json.loads(sys.argv[3])
print(json.dumps(generate_ids(model, tok, sys.argv[2], prompts, int(sys.argv[4]))))
"""


@pytest.mark.slow
def test_greedy_tokens_equal_the_paddle_suite(paddle_and_hf, tmp_path):
    import glm2_cpu

    root = paddle_and_hf("chatglm2")
    hf_config = json.loads((root / "hf" / "config.json").read_text())
    prompts = [[1201, 1203, 300, 400, 500], [1201, 1203, 77, 88, 99, 111, 222, 333]]
    out = main_venv("-c", PADDLE_GREEDY, root / "paddle", "chatglm2", json.dumps(prompts), 6)
    expected = json.loads(out.stdout.strip().splitlines()[-1])
    ckpt = convert_weights.hf_to_ms(root / "hf", tmp_path / "m.ckpt")
    use_cpu_mindspore()
    got = [glm2_cpu.greedy_generate(hf_config, ckpt, p, 6, hf_config["eos_token_id"]) for p in prompts]
    assert got == expected and sum(map(len, got)) > 4


@pytest.mark.slow
def test_training_steps_lower_the_loss_and_mindir_exports(paddle_and_hf, tmp_path):
    import glm2_cpu

    root = paddle_and_hf("chatglm2")
    hf_config = json.loads((root / "hf" / "config.json").read_text())
    ckpt = convert_weights.hf_to_ms(root / "hf", tmp_path / "m.ckpt")
    use_cpu_mindspore()
    model = glm2_cpu.build_model(hf_config, seq_length=16, batch_size=2, checkpoint=ckpt)
    ids = np.random.RandomState(0).randint(3, 1200, size=(2, 16))
    losses = glm2_cpu.train_steps(model, ids, np.roll(ids, -1, axis=1), steps=5)
    assert losses[-1] < 0.75 * losses[0]
    mindir = Path(glm2_cpu.export_mindir(model, 2, 16, tmp_path / "glm2"))
    assert mindir.stat().st_size > 100_000

