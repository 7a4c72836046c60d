"""Bad input, command by command: each case ends in one line naming the flag or file and what to do, exit
status 1, no traceback, and not one file lost, changed or added. The cases are tables; `make_case` builds the
situation a user would be in (a reused folder, a damaged download, a typo in a number) under tmp_path.

Cases run in-process through `errors.run_cli`, the same wrapper each script's `__main__` calls;
`test_scripts_end_bad_input_in_one_line` runs one case per script as a real process to check that wiring.
"""
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import export_generation_model
import finetune_generation
import infer_generation
import predict_generation
import serve_generation
from glm_tune.errors import run_cli
from glm_tune.safe_output import OWNER_MARKER
from glm_tune.training.run_checkpoints import COMPLETE_MARKER
from tools import convert_checkpoint, longbench_to_adgen, make_demo_data, make_tiny_model, merge_tp_shards

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ helpers


def snapshot(*roots) -> dict:
    """Every file and folder under `roots`: path -> content hash (None for folders)."""
    state = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            state[str(p)] = hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else None
    return state


# sysfs takes no new file even from root (permission bits do not stop root; a read-only mount does): it stands for
# a read-only output folder on any machine.
UNWRITABLE = Path("/sys")
UNWRITABLE_PATTERN = r"cannot write in /sys \(Permission denied\); nothing was done"
SURROGATE_RECORD = '{"content": "a\\ud800b", "summary": "x"}\n'  # JSON's escape of a lone surrogate


def assert_refused(main, argv, pattern, *watched):
    """`main(argv)` through run_cli exits with one line matching `pattern`; nothing under `watched` changed."""
    before = snapshot(*watched)
    with pytest.raises(SystemExit) as exited:
        run_cli(main, [str(a) for a in argv])
    message = exited.value.code
    assert isinstance(message, str), f"exit code {message!r} instead of a message"
    assert message.startswith("error: ") and "\n" not in message, message
    assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    after = snapshot(*watched)
    assert after == before, f"files changed: {sorted(set(after.items()) ^ set(before.items()))[:4]}"
    return message


def copy_model(tiny_dir, model_type, dest):
    return Path(shutil.copytree(tiny_dir(model_type), dest))


def fifo(path) -> Path:
    os.mkfifo(path)
    return Path(path)


def write(path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def truncate(path, keep=0.5):
    raw = Path(path).read_bytes()
    Path(path).write_bytes(raw[: int(len(raw) * keep)])


GOOD_RECORD = json.dumps({"content": "类型#裙", "summary": "复古"}, ensure_ascii=False) + "\n"


def task_folder(root, train=None, dev=None):
    folder = Path(root) / "task"
    write(folder / "train.json", train if train is not None else GOOD_RECORD * 4)
    write(folder / "dev.json", dev if dev is not None else GOOD_RECORD * 2)
    return folder


def damage_model(folder: Path, how: str):
    """A model folder as a bad download leaves it."""
    if how == "no tokenizer":
        (folder / "tokenizer.model").unlink()
    elif how == "empty tokenizer":
        write(folder / "tokenizer.model", b"")
    elif how == "garbage tokenizer":
        write(folder / "tokenizer.model", b"<html>404 not found</html>" * 10)
    elif how == "no weights":
        (folder / "model_state.pdparams").unlink()
    elif how == "truncated weights":
        truncate(folder / "model_state.pdparams")
    elif how == "garbage weights":
        write(folder / "model_state.pdparams", b"\x00garbage" * 1000)
    elif how == "config without sizes":
        config = json.loads((folder / "config.json").read_text())
        config.pop("hidden_size")
        config.pop("num_hidden_layers")
        write(folder / "config.json", json.dumps(config))
    elif how == "config not json":
        write(folder / "config.json", "{not json")
    elif how.startswith("config "):  # "config KEY VALUE": one size set to a bad value (issue 27: tracebacks)
        _, key, value = how.split(" ")
        config = json.loads((folder / "config.json").read_text())
        config[key] = json.loads(value)
        write(folder / "config.json", json.dumps(config))
    return folder


MODEL_DAMAGE = [
    ("no tokenizer", r"has no tokenizer\.model"),
    ("empty tokenizer", r"tokenizer\.model is not a SentencePiece model"),
    ("garbage tokenizer", r"tokenizer\.model is not a SentencePiece model"),
    ("no weights", r"has no weights \(model_state\.pdparams\)"),
    ("truncated weights", r"cannot be read .*truncated or not a Paddle checkpoint"),
    ("garbage weights", r"cannot be read .*truncated or not a Paddle checkpoint"),
    ("config without sizes", r"config\.json lacks hidden_size, num_hidden_layers"),
    ("config not json", r"config\.json is not valid JSON"),
    ("config hidden_size -128", r"config\.json: hidden_size is -128, not a positive whole number"),
    ("config vocab_size -5", r"config\.json: vocab_size is -5, not a positive"),
    ("config padded_vocab_size -5", r"config\.json: padded_vocab_size is -5, not a positive"),
    ("config num_attention_heads 0", r"config\.json: num_attention_heads is 0, not a positive"),
    ("config kv_channels 0", r"config\.json: kv_channels is 0, not a positive"),
    ("config num_hidden_layers 0", r"config\.json: num_hidden_layers is 0, not a positive"),
    ("config num_hidden_layers -1", r"config\.json: num_hidden_layers is -1, not a positive"),
    ("config num_hidden_layers 2.5", r"config\.json: num_hidden_layers is 2\.5, not a positive"),
    ("config multi_query_group_num 3", r"num_attention_heads 4 is not a multiple of multi_query_group_num 3"),
]


def ft_argv(model, task, out, **extra):
    args = {"model_name_or_path": model, "task_name_or_path": task, "output_dir": out, "src_length": 32,
            "tgt_length": 16, "max_steps": 2, "per_device_train_batch_size": 2, "report_to": "none",
            "disable_tqdm": True, **extra}
    argv = ["--do_train"]
    for key, value in args.items():
        argv += [f"--{key}", str(value)]
    return argv


# ------------------------------------------------------------------------------------- finetune_generation


def owned_run_folder(root, run_overrides=None, checkpoints=(), model=None, task=None):
    """An --output_dir an earlier finetune_generation.py run left: its marker and complete checkpoints."""
    folder = Path(root) / "run"
    run = {"seed": 42, **(run_overrides or {})}
    write(folder / OWNER_MARKER, json.dumps({"command": "finetune_generation", "run": run}))
    for step in checkpoints:
        ckpt = folder / f"checkpoint-{step}"
        write(ckpt / "trainer_state.json", "{}")
        write(ckpt / COMPLETE_MARKER, json.dumps({"files": {"trainer_state.json": 2}}))
    return folder


FINETUNE_CASES = {
    "output is the model": (lambda t, m: dict(output_dir=m), r"--output_dir .* is also --model_name_or_path"),
    "output inside the model": (lambda t, m: dict(output_dir=m / "tuned"), r"lies inside --model_name_or_path"),
    "output is a file": (lambda t, m: dict(output_dir=write(t / "out.txt", "x")), r"--output_dir .* is a file"),
    "output holds user files": (lambda t, m: dict(output_dir=write(t / "mine" / "notes.txt", "x").parent),
                                r"already exists and was not written by finetune_generation\.py"),
    "output holds another run's checkpoints": (
        lambda t, m: dict(output_dir=owned_run_folder(t, {"seed": 7}, [4])),
        r"holds checkpoints of another run \(checkpoint-4; it differs in .*\)"),
    "model type contradicts the folder": (lambda t, m: dict(model_type="chatglm3"),
                                          r"--model_type chatglm3 does not match .* holds a chatglm2 checkpoint"),
    "v1 model type on a v2 folder": (lambda t, m: dict(model_type="chatglm"), r"--model_type chatglm does not match"),
    "unknown model type": (lambda t, m: dict(model_type="glm4"), r"unknown model type 'glm4'"),
    "lora and prefix adapters together": (lambda t, m: dict(lora_path=t, prefix_path=t),
                                          r"--lora_path and --prefix_path cannot be combined"),
    "lora path missing": (lambda t, m: dict(lora=True, lora_path=t / "nope"), r"--lora_path .*nope is not a folder"),
    "lora path not a lora folder": (lambda t, m: dict(lora=True, lora_path=m), r"is not a lora folder"),
    "resume from a model folder": (lambda t, m: dict(resume_from_checkpoint=m),
                                   r"--resume_from_checkpoint .* is not a training checkpoint"),
    "train batch 0": (lambda t, m: dict(per_device_train_batch_size=0), r"--per_device_train_batch_size"),
    "src_length 2": (lambda t, m: dict(src_length=2), r"--src_length \(2\) must exceed 2"),
    "tgt_length 1": (lambda t, m: dict(tgt_length=1), r"--tgt_length \(1\) must exceed 1"),
    "max_eval_samples negative": (lambda t, m: dict(max_eval_samples=-100), r"--max_eval_samples -100 must be"),
    "temperature 0": (lambda t, m: dict(temperature=0), r"--temperature 0\.0 must be above 0"),
    "temperature negative": (lambda t, m: dict(temperature=-1), r"--temperature -1\.0 must be above 0"),
    "top_p 0": (lambda t, m: dict(top_p=0), r"--top_p 0\.0 must be in \(0, 1\]"),
    "top_p 2": (lambda t, m: dict(top_p=2), r"--top_p 2\.0 must be in \(0, 1\]"),
    "top_k negative": (lambda t, m: dict(top_k=-1), r"--top_k -1 must be 0"),
    "task path is a file": (lambda t, m: dict(task_name_or_path=write(t / "train.json", GOOD_RECORD)),
                            r"--task_name_or_path .* is not a folder"),
    "train data not UTF-8": (lambda t, m: dict(task_name_or_path=task_folder(t, "类型".encode("gbk") * 3)),
                             r"train\.json:1: not UTF-8 text \(byte 0x.. at offset 0\)"),
    "train data UTF-16": (lambda t, m: dict(task_name_or_path=task_folder(t, GOOD_RECORD.encode("utf-16"))),
                          r"train\.json is UTF-16 text; save it as UTF-8"),
    "train data binary": (lambda t, m: dict(task_name_or_path=task_folder(t, b"PK\x03\x04\x00\x00" + bytes(50))),
                          r"train\.json:1: holds NUL bytes"),
    "train data malformed": (lambda t, m: dict(task_name_or_path=task_folder(t, GOOD_RECORD + "{oops\n")),
                             r"train\.json:2: malformed JSON"),
    "train.json is a FIFO": (lambda t, m: dict(task_name_or_path=fifo((t / "task3").mkdir() or t / "task3" /
                                                     "train.json").parent), r"train\.json is a named pipe"),
    "train.json is a folder": (lambda t, m: dict(task_name_or_path=(t / "task2" / "train.json").mkdir(parents=True)
                                                 or t / "task2"), r"train\.json is a folder, not a data file"),
    "output in a read-only folder": (lambda t, m: dict(output_dir=UNWRITABLE / "tuned"), UNWRITABLE_PATTERN),
    "train data with a lone surrogate": (lambda t, m: dict(task_name_or_path=task_folder(t, SURROGATE_RECORD)),
                                         r"train\.json:1: .*lone surrogate"),
}


@pytest.mark.parametrize("case", sorted(FINETUNE_CASES))
def test_finetune_refuses(case, tiny_dir, tmp_path):
    model = copy_model(tiny_dir, "chatglm2", tmp_path / "model")
    make, pattern = FINETUNE_CASES[case]
    args = dict(model_name_or_path=model, task_name_or_path=task_folder(tmp_path), output_dir=tmp_path / "out")
    args.update(make(tmp_path, model))
    argv = ft_argv(args.pop("model_name_or_path"), args.pop("task_name_or_path"), args.pop("output_dir"), **args)
    assert_refused(finetune_generation.main, argv, pattern, tmp_path)


@pytest.mark.parametrize("damage, pattern", MODEL_DAMAGE, ids=[d for d, _ in MODEL_DAMAGE])
def test_finetune_refuses_a_damaged_model_folder(damage, pattern, tiny_dir, tmp_path):
    model = damage_model(copy_model(tiny_dir, "chatglm2", tmp_path / "model"), damage)
    argv = ft_argv(model, task_folder(tmp_path), tmp_path / "out")
    assert_refused(finetune_generation.main, argv, pattern, tmp_path)


def test_finetune_refuses_an_adapter_of_another_generation(tiny_dir, tmp_path):
    lora = tmp_path / "lora_v2"
    write(lora / "lora_config.json", "{}")
    write(lora / "lora_model_state.pdparams", b"x")
    write(lora / OWNER_MARKER, json.dumps({"command": "finetune_generation", "run": {"generation": "chatglm2"}}))
    argv = ft_argv(copy_model(tiny_dir, "chatglm", tmp_path / "v1"), task_folder(tmp_path), tmp_path / "out",
                   lora=True, lora_path=lora)
    assert_refused(finetune_generation.main, argv, r"--lora_path .* was trained on a chatglm2 model but "
                                                   r"--model_name_or_path is a chatglm checkpoint", tmp_path)


def test_a_lora_of_another_generation_without_our_marker_is_refused_after_loading(tiny_dir, tmp_path):
    """A LoRA folder from elsewhere carries no record of its base: its tensors must each find a place."""
    from glm_tune.model_loading import apply_lora, load_model

    lora = tmp_path / "lora_v2"
    apply_lora(load_model(str(tiny_dir("chatglm2")), "chatglm2"), "chatglm2", 4, 8).save_pretrained(str(lora))
    assert not (lora / OWNER_MARKER).exists()
    base = copy_model(tiny_dir, "chatglm", tmp_path / "v1")
    assert_refused(predict_generation.main, pr_argv(base, lora_path=lora),
                   r"lora_v2 does not fit this base model: \d+ of its \d+ tensors have no place in it", tmp_path)


def test_auto_resume_never_goes_past_max_steps(tiny_dir, tmp_path):
    """Same run, later checkpoint than --max_steps: refused before the model loads, not trained past."""
    model, task = copy_model(tiny_dir, "chatglm2", tmp_path / "model"), task_folder(tmp_path)
    args = finetune_generation.parse_arguments(ft_argv(model, task, tmp_path / "x"))
    from glm_tune.training.run_checkpoints import run_identity

    run = run_identity(args[0], args[1], args[3], "chatglm2")
    out = owned_run_folder(tmp_path, run, [2, 4])
    assert_refused(finetune_generation.main, ft_argv(model, task, out, resume_from_checkpoint="auto"),
                   r"newest checkpoint .*checkpoint-4 is at step 4, past --max_steps 2", tmp_path)


def test_overwrite_output_dir_drops_another_runs_checkpoints_only_after_every_check(tiny_dir, tmp_path):
    out = owned_run_folder(tmp_path, {"seed": 7}, [4])
    write(out / "notes.txt", "kept")
    model, task = copy_model(tiny_dir, "chatglm2", tmp_path / "model"), task_folder(tmp_path)
    broken = task_folder(tmp_path / "broken", "{oops\n")
    assert_refused(finetune_generation.main, ft_argv(model, broken, out, overwrite_output_dir=True),
                   r"train\.json:1: malformed JSON", tmp_path)  # a later check fails: nothing dropped yet
    args = finetune_generation.parse_arguments(ft_argv(model, task, out, overwrite_output_dir=True,
                                                       resume_from_checkpoint="auto"))
    _, _, state, _ = finetune_generation.validate(args[0], args[1], args[3])
    assert state == "new" and finetune_generation.resume_checkpoint(args[3], state) is None
    assert not (out / "checkpoint-4").exists() and (out / "notes.txt").read_text() == "kept"


def test_a_bom_data_file_is_read(tmp_path):
    from data import read_examples

    path = write(tmp_path / "bom.json", "\ufeff" + GOOD_RECORD)
    assert read_examples(path)[0].src == "类型#裙"


# ------------------------------------------------------------------------------------- predict_generation


def pr_argv(model, **extra):
    argv = ["--model_name_or_path", model, "--src_length", 32, "--tgt_length", 4]
    for key, value in extra.items():
        argv += [f"--{key}", value]
    return argv


PREDICT_CASES = {
    "output file is the data file": (lambda t: dict(data_file=t / "dev.json", output_file=t / "dev.json"),
                                     r"--output_file .*dev\.json is also --data_file"),
    "batch size -1 with an existing output": (lambda t: dict(batch_size=-1, output_file=t / "preds.json"),
                                              r"--batch_size -1 must be at least 1"),
    "batch size 0": (lambda t: dict(batch_size=0), r"--batch_size 0 must be at least 1"),
    "output file is a folder": (lambda t: dict(output_file=t / "task"), r"--output_file .*task is a folder"),
    "output file is someone's data": (lambda t: dict(output_file=t / "task" / "train.json"),
                                      r"--output_file .*train\.json already exists and is not an earlier output"),
    "output file inside the model": (lambda t: dict(output_file=t / "model" / "preds.json"),
                                     r"lies inside --model_name_or_path"),
    "merge path is a user folder": (lambda t: dict(merge_tensor_parallel_path=t / "task"),
                                    r"--merge_tensor_parallel_path .*task already exists"),
    "merge path is the model": (lambda t: dict(merge_tensor_parallel_path=t / "model"),
                                r"--merge_tensor_parallel_path .* is also --model_name_or_path"),
    "data not UTF-8": (lambda t: dict(data_file=write(t / "gbk.json", "类型".encode("gbk"))),
                       r"gbk\.json:1: not UTF-8 text"),
    "data file is a folder": (lambda t: dict(data_file=t / "task"), r"task is a folder, not a data file"),
    "data file missing": (lambda t: dict(data_file=t / "nope.json"), r"nope\.json: file not found"),
    "data file is a FIFO": (lambda t: dict(data_file=fifo(t / "pipe.json")),
                            r"pipe\.json is a named pipe \(FIFO\), not a data file"),
    "data file is /dev/zero": (lambda t: dict(data_file="/dev/zero"), r"/dev/zero is a device, not a data file"),
    "data file is /dev/urandom": (lambda t: dict(data_file="/dev/urandom"), r"/dev/urandom is a device"),
    "lora and prefix together": (lambda t: dict(lora_path=t / "task", prefix_path=t / "task"),
                                 r"--lora_path and --prefix_path cannot be combined"),
    "prefix path not a prefix folder": (lambda t: dict(prefix_path=t / "task"), r"is not a prefix folder"),
    "src_length 0": (lambda t: dict(src_length=0), r"--src_length \(0\) must exceed 2"),
    "top_p 0": (lambda t: dict(top_p=0), r"--top_p 0\.0 must be in"),
    "decode strategy typo": (lambda t: dict(decode_strategy="beam"), r"--decode_strategy 'beam': choose"),
    "model path is a file": (lambda t: dict(model_name_or_path=t / "dev.json"), r"--model_name_or_path .* is a file"),
    "output file in a read-only folder": (lambda t: dict(output_file=UNWRITABLE / "preds.json"), UNWRITABLE_PATTERN),
    "data with a lone surrogate": (lambda t: dict(data_file=write(t / "s.json", SURROGATE_RECORD)),
                                   r"s\.json:1: .*lone surrogate"),
}


@pytest.mark.parametrize("case", sorted(PREDICT_CASES))
def test_predict_refuses(case, tiny_dir, tmp_path):
    model = copy_model(tiny_dir, "chatglm2", tmp_path / "model")
    task_folder(tmp_path)
    write(tmp_path / "dev.json", GOOD_RECORD)
    write(tmp_path / "preds.json", json.dumps({"prompt": "p", "output": "o"}) + "\n")
    extra = PREDICT_CASES[case][0](tmp_path)
    model = extra.pop("model_name_or_path", model)
    assert_refused(predict_generation.main, pr_argv(model, **extra), PREDICT_CASES[case][1], tmp_path)


@pytest.mark.parametrize("damage, pattern", MODEL_DAMAGE, ids=[d for d, _ in MODEL_DAMAGE])
def test_predict_refuses_a_damaged_model_folder(damage, pattern, tiny_dir, tmp_path):
    model = damage_model(copy_model(tiny_dir, "chatglm3", tmp_path / "model"), damage)
    assert_refused(predict_generation.main, pr_argv(model), pattern, tmp_path)


def test_predict_replaces_its_own_earlier_predictions_only(tiny_dir, tmp_path):
    model, data = tiny_dir("chatglm2"), write(tmp_path / "dev.json", GOOD_RECORD * 2)
    out = write(tmp_path / "preds.json", json.dumps({"prompt": "old", "output": "old"}) + "\n")
    predict_generation.main(pr_argv(model, data_file=data, output_file=out))
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["类型#裙", "类型#裙"]
    mine = write(tmp_path / "mine.json", "my notes\n")
    predict_generation.main(pr_argv(model, data_file=data, output_file=mine, overwrite=True))
    assert "my notes" not in mine.read_text()


# ------------------------------------------------------------------------------------- export / infer


@pytest.fixture(scope="module")
def exports(tiny_dir, tmp_path_factory):
    """Exported step graphs of an untrained tiny ChatGLM2 and ChatGLM-6B."""
    root = tmp_path_factory.mktemp("exports")
    for model_type in ("chatglm2", "chatglm"):
        export_generation_model.main(["--model_name_or_path", str(tiny_dir(model_type)), "--output_path",
                                      str(root / model_type / "chatglm"), "--src_length", "32", "--tgt_length", "4"])
    return root


EXPORT_CASES = {
    "second model into one export folder": (
        lambda t, m: (write(t / "x" / OWNER_MARKER, json.dumps({"command": "export_generation_model",
                                                                 "prefix": "a"})), dict(output_path=t / "x" / "b"))[1],
        r"already holds the export 'a'"),
    "output path is an existing folder": (lambda t, m: dict(output_path=(t / "task").mkdir() or t / "task"),
                                          r"--output_path .*task is an existing folder; pass FOLDER/PREFIX"),
    "export into the model folder": (lambda t, m: dict(output_path=m / "chatglm"),
                                     r"--output_path's folder .* is also --model_name_or_path"),
    "export into a user folder": (lambda t, m: dict(output_path=write(t / "srv" / "app.py", "x").parent / "chatglm"),
                                  r"--output_path's folder .*srv holds files no export wrote \(app\.py\)"),
    "export with --overwrite into a folder of other files": (
        lambda t, m: dict(output_path=write(write(t / "models" / "notes.txt", "mine").parent / "other_model.bin",
                                            "weights").parent / "chatglm", overwrite=True),
        r"holds files no export wrote \(notes\.txt, other_model\.bin\).*--overwrite or not"),
    "export with --overwrite into a training output": (
        lambda t, m: dict(output_path=write(t / "run" / OWNER_MARKER, json.dumps({"command": "finetune_generation.py"})
                                            ).parent / "chatglm", overwrite=True), r"holds files no export wrote"),
    "dtype typo": (lambda t, m: dict(dtype="fp32"), r"--dtype 'fp32': choose"),
    "quantize typo": (lambda t, m: dict(quantize="int3"), r"--quantize 'int3': choose from int8, int4"),
    "quantize without onnx": (lambda t, m: dict(quantize="int8", onnx=False), r"--quantize needs the ONNX graph"),
    "prefix export": (lambda t, m: dict(prefix_path=t), r"exporting prefix-tuned models is not supported"),
    "export into a read-only folder": (lambda t, m: dict(output_path=UNWRITABLE / "infer" / "chatglm"),
                                       UNWRITABLE_PATTERN),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_refuses(case, tiny_dir, tmp_path):
    model = copy_model(tiny_dir, "chatglm2", tmp_path / "model")
    args = {"model_name_or_path": model, "output_path": tmp_path / "infer" / "chatglm",
            **EXPORT_CASES[case][0](tmp_path, model)}
    argv = [a for k, v in args.items() for a in (f"--{k}", v)]
    assert_refused(export_generation_model.main, argv, EXPORT_CASES[case][1], tmp_path)


def test_export_folder_with_trailing_slash_takes_the_default_prefix(tmp_path):
    model_args = type("M", (), {"model_name_or_path": "m", "lora_path": None})()
    target = export_generation_model.export_target(f"{tmp_path / 'srv'}/", model_args, overwrite=False)
    assert target == tmp_path / "srv" / "chatglm"


def test_an_operator_paddle2onnx_cannot_convert_is_named(tmp_path):
    """paddle2onnx aborts its process on such an operator without naming it; the export names it."""
    import paddle
    from paddle.static import InputSpec

    from glm_tune.deployment.onnx_export import OnnxExportError, convert_to_onnx

    class Eigen(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.proj = paddle.nn.Linear(4, 4)

        def forward(self, x):
            return paddle.linalg.eigvalsh(self.proj(x))

    layer = Eigen()
    layer.eval()
    paddle.jit.save(paddle.jit.to_static(layer, input_spec=[InputSpec([4, 4], "float32", "x")], full_graph=True),
                    str(tmp_path / "odd"))
    with pytest.raises(OnnxExportError, match=r"paddle2onnx could not convert .*odd\.json \(operators it cannot "
                                              r"convert: eigvalsh\); export with --onnx False"):
        convert_to_onnx(tmp_path / "odd", tmp_path / "odd.onnx")
    assert not (tmp_path / "odd.onnx").exists()


def export_copy(exports, tmp_path, model_type="chatglm2"):
    return Path(shutil.copytree(exports / model_type, tmp_path / "infer"))


def damage_export(folder: Path, how: str, exports):
    if how == "truncated params":
        truncate(folder / "chatglm.pdiparams")
    elif how == "garbage params":
        write(folder / "chatglm.pdiparams", b"\x00garbage" * 5000)
    elif how == "other generation's params":
        shutil.copy(exports / "chatglm" / "chatglm.pdiparams", folder / "chatglm.pdiparams")
    elif how == "no graph":
        (folder / "chatglm.json").unlink()
    elif how == "invalid description":
        write(folder / "chatglm.generation.json", "{oops")
    elif how == "description lacks defaults":
        write(folder / "chatglm.generation.json", json.dumps({"generation": "chatglm2", "dtype": "float32"}))
    elif how == "export of an earlier glm-tune":
        info = json.loads((folder / "chatglm.generation.json").read_text(encoding="utf-8"))
        write(folder / "chatglm.generation.json", json.dumps({**info, "format": "glm-tune step graph v1"}))
    elif how == "only an unknown format":
        info = json.loads((folder / "chatglm.generation.json").read_text(encoding="utf-8"))
        write(folder / "chatglm.generation.json", json.dumps({**info, "formats": {"tensorrt-fp8": {}}}))
    elif how == "no tokenizer":
        (folder / "tokenizer.model").unlink()
    elif how == "no onnx graph":
        (folder / "chatglm.onnx").unlink()
    elif how == "truncated onnx graph":
        truncate(folder / "chatglm.onnx")


PADDLE = ["--backend", "paddle"]
INFER_DAMAGE = [
    ("truncated params", PADDLE, r"Paddle Inference cannot run .*chatglm\.json with .*chatglm\.pdiparams .* export "
                                 r"the model again"),
    ("garbage params", PADDLE, r"Paddle Inference cannot run"),
    ("other generation's params", PADDLE, r"Paddle Inference cannot run"),
    ("no graph", PADDLE, r"chatglm\.json \(the exported graph\) is missing"),
    ("no onnx graph", [], r"chatglm\.onnx \(the exported ONNX graph\) is missing"),
    ("truncated onnx graph", [], r"ONNX Runtime cannot load .*chatglm\.onnx .*truncated or damaged; export the model"),
    ("invalid description", [], r"chatglm\.generation\.json is not a valid export description"),
    ("description lacks defaults", [], r"chatglm\.generation\.json lacks defaults"),
    ("export of an earlier glm-tune", [], r"describes a step graph from an earlier glm-tune \('glm-tune step graph "
                                          r"v1'.*it returned the whole cache at every step\); export the model again"),
    ("no tokenizer", [], r"has no tokenizer\.model .*or export the model again"),
    ("only an unknown format", [], r"holds no graph this version can run \(it lists tensorrt-fp8; known: onnx, "),
    ("only an unknown format", ["--precision", "int8"], r"holds no onnx-int8 graph \(it holds tensorrt-fp8\)"),
]


@pytest.mark.parametrize("damage, extra, pattern", INFER_DAMAGE, ids=[d + " " * bool(e) + " ".join(e)
                                                                      for d, e, _ in INFER_DAMAGE])
def test_infer_refuses_a_damaged_export(damage, extra, pattern, exports, tmp_path):
    folder = export_copy(exports, tmp_path)
    damage_export(folder, damage, exports)
    assert_refused(infer_generation.main, ["--model_path", folder, "--batch_size", 1, *extra], pattern, tmp_path)


INFER_CASES = {
    "output file is the data file": (lambda t: ["--data_file", t / "dev.json", "--output_file", t / "dev.json"],
                                     r"--output_file .* is also --data_file"),
    "tgt_length 0": (lambda t: ["--tgt_length", 0], r"--tgt_length 0 must be at least 1"),
    "tgt_length -2": (lambda t: ["--tgt_length", -2], r"--tgt_length -2 must be at least 1"),
    "src_length 0": (lambda t: ["--src_length", 0], r"--src_length 0 must exceed 2"),
    "threads 0": (lambda t: ["--threads", 0], r"--threads 0: this machine gives the process \d+ CPUs; use 1 to"),
    "threads 10000": (lambda t: ["--threads", 10000], r"--threads 10000: this machine gives the process \d+ CPUs"),
    "src_length past the positions": (lambda t: ["--src_length", 5000],
                                      r"--src_length 5000 \+ --tgt_length \d+ = \d+ exceeds this export's sequence "
                                      r"length 2048; lower them"),
    "tgt_length past the positions": (lambda t: ["--tgt_length", 5000], r"--tgt_length 5000 = \d+ exceeds this"),
    "output file in a read-only folder": (lambda t: ["--data_file", t / "dev.json", "--output_file",
                                                     UNWRITABLE / "preds.json"], UNWRITABLE_PATTERN),
    "bad data record": (lambda t: ["--data_file", write(t / "bad.json", '{"content": 5}\n')],
                        r"bad\.json:1: .*content(?!.*skip_bad_records)"),
    "model path missing": (lambda t: ["--model_path", t / "nope"], r"--model_path .*nope is not a folder"),
    "wrong prefix": (lambda t: ["--model_prefix", "glm"], r"glm\.generation\.json not found \(this folder holds "
                                                         r"--model_prefix chatglm\)"),
    "temperature negative": (lambda t: ["--temperature", -1], r"--temperature -1\.0 must be above 0"),
    "backend typo": (lambda t: ["--backend", "onnx"], r"unknown backend 'onnx'"),
    "precision the export lacks": (lambda t: ["--precision", "int8"], r"this export holds no onnx-int8 graph \(it "
                                   r"holds onnx, paddle\); export it with export_generation_model\.py \.\.\. "
                                   r"--quantize int8"),
    "quantized paddle engine": (lambda t: ["--backend", "paddle", "--precision", "int4"],
                                r"--backend paddle runs only fp32 graphs"),
    "precision typo": (lambda t: ["--precision", "q8_0"], r"--precision 'q8_0': choose fp32, int8 or int4"),
}


@pytest.mark.parametrize("case", sorted(INFER_CASES))
def test_infer_refuses(case, exports, tmp_path):
    folder = export_copy(exports, tmp_path)
    write(tmp_path / "dev.json", GOOD_RECORD)
    argv = ["--model_path", folder] + INFER_CASES[case][0](tmp_path)
    assert_refused(infer_generation.main, argv, INFER_CASES[case][1], tmp_path)


def busy_port(t):
    """A port something already listens on (kept open for the test session)."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    BUSY.append(listener)
    return listener.getsockname()[1]


BUSY = []
SERVE_CASES = {
    "port 0": (lambda t: ["--port", 0], r"--port 0 must be in 1\.\.65535"),
    "port in use": (lambda t: ["--port", busy_port(t)], r"cannot listen on --host 127\.0\.0\.1 --port \d+ .*choose "
                                                        r"another --port"),
    "host unknown": (lambda t: ["--host", "10.255.255.254", "--port", 8001], r"cannot listen on --host 10\.255"),
    "max_batch 0": (lambda t: ["--max_batch", 0], r"--max_batch 0 must be at least 1"),
    "max_body_bytes 0": (lambda t: ["--max_body_bytes", 0], r"--max_body_bytes 0 must be at least 1"),
    "max_tokens_limit 0": (lambda t: ["--max_tokens_limit", 0], r"--max_tokens_limit 0 must be at least 1"),
    "model path missing": (lambda t: ["--model_path", t / "nope"], r"--model_path .*nope is not a folder"),
    "precision the export lacks": (lambda t: ["--precision", "int4"], r"this export holds no onnx-int4 graph"),
    "top_p 0": (lambda t: ["--top_p", 0], r"--top_p 0\.0 must be in \(0, 1\]"),
}


@pytest.mark.parametrize("case", sorted(SERVE_CASES))
def test_serve_refuses(case, exports, tmp_path):
    folder = export_copy(exports, tmp_path)
    argv = ["--model_path", folder] + SERVE_CASES[case][0](tmp_path)
    assert_refused(serve_generation.main, argv, SERVE_CASES[case][1], tmp_path)


def test_interactive_infer_answers_a_non_utf8_line_with_an_error_and_goes_on(exports, tmp_path):
    args = infer_generation.parse_arguments(["--model_path", str(exports / "chatglm2"), "--tgt_length", "2"])
    predictor = infer_generation.build_predictor(*args)
    stdout = io.StringIO()
    infer_generation.chat(predictor, io.BytesIO("你好\n".encode() + b"\xff\xfe bad\n" + "再见\n".encode()), stdout)
    text = stdout.getvalue()
    assert text.count("ChatGLM:") == 2
    assert re.search(r"error: input line 2 is not UTF-8 text \(.*\); type it again", text)


# ------------------------------------------------------------------------------------- tools


def test_convert_into_a_folder_holding_other_models_deletes_nothing(tiny_hf_dir, tmp_path):
    models = tmp_path / "models"
    write(models / "other_model" / "model_state.pdparams", b"precious")
    assert_refused(convert_checkpoint.main, ["--input_dir", tiny_hf_dir, "--output_dir", models],
                   r"--output_dir .*models already exists and is not written by this command \(it holds other_model\)",
                   tmp_path, tiny_hf_dir)


@pytest.fixture(scope="module")
def tiny_hf_dir(tiny_dir, tmp_path_factory):
    from glm_tune.conversion.checkpoint_convert import convert_paddle_to_hf

    return convert_paddle_to_hf(tiny_dir("chatglm2"), tmp_path_factory.mktemp("hf") / "chatglm2-hf")


CONVERT_CASES = {
    "output is the input": (lambda t, hf: ["--input_dir", hf, "--output_dir", hf], r"is also --input_dir"),
    "output contains the input": (lambda t, hf: ["--input_dir", hf, "--output_dir", hf.parent],
                                  r"contains --input_dir"),
    "output is the current folder": (lambda t, hf: ["--input_dir", hf, "--output_dir", "."],
                                     r"--output_dir \. is the current folder"),
    "output is a parent of the current folder": (lambda t, hf: ["--input_dir", hf, "--output_dir", ".."],
                                                 r"--output_dir \.\. is the current folder, one that holds it"),
    "paddle folder with --to paddle": (lambda t, hf: ["--input_dir", t / "pd", "--output_dir", t / "o"],
                                       r"is already a Paddle checkpoint; to write it in the Hugging Face layout "
                                       r"pass --to hf"),
    "hf folder with --to hf": (lambda t, hf: ["--input_dir", hf, "--output_dir", t / "o", "--to", "hf"],
                               r"has no model_state\.pdparams .*it is in the Hugging Face layout: convert it with "
                               r"--to paddle"),
    "garbage index": (lambda t, hf: ["--input_dir", t / "bad_index", "--output_dir", t / "o"],
                      r"model\.safetensors\.index\.json is not a valid shard index"),
    "truncated safetensors": (lambda t, hf: ["--input_dir", t / "short", "--output_dir", t / "o"],
                              r"model\.safetensors: tensor .* needs bytes \d+\.\.\d+ of the data but only \d+ are "
                              r"present; the file is truncated"),
    "corrupt pdparams with --to hf": (lambda t, hf: ["--input_dir", t / "pd_bad", "--output_dir", t / "o", "--to",
                                                     "hf"], r"model_state\.pdparams cannot be read"),
    "input is not a folder": (lambda t, hf: ["--input_dir", t / "nope", "--output_dir", t / "o"],
                              r"--input_dir .*nope is not a folder"),
    "glm layout into a user folder": (lambda t, hf: ["--input_dir", hf, "--output_dir", write(t / "u" / "a", "x").parent,
                                                     "--to", "glm"], r"already exists"),
}


@pytest.mark.parametrize("case", sorted(CONVERT_CASES))
def test_convert_refuses(case, tiny_hf_dir, tiny_dir, tmp_path, monkeypatch):
    hf = Path(shutil.copytree(tiny_hf_dir, tmp_path / "hf" / "chatglm2-hf"))
    copy_model(tiny_dir, "chatglm2", tmp_path / "pd")
    damage_model(copy_model(tiny_dir, "chatglm2", tmp_path / "pd_bad"), "garbage weights")
    shutil.copytree(hf, tmp_path / "bad_index")
    write(tmp_path / "bad_index" / "model.safetensors.index.json", "[1, 2")
    shutil.copytree(hf, tmp_path / "short")
    truncate(tmp_path / "short" / "model.safetensors", 0.7)
    (tmp_path / "work" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work" / "sub")
    argv = CONVERT_CASES[case][0](tmp_path, hf)
    started = time.monotonic()
    assert_refused(convert_checkpoint.main, argv, CONVERT_CASES[case][1], tmp_path)
    assert time.monotonic() - started < 20  # a truncated file used to spin forever


MERGE_CASES = {
    "truncated shard": (lambda t, s: (truncate(s / "model_state.tp01.pdparams"), [s, t / "merged"])[1],
                        r"model_state\.tp01\.pdparams cannot be read"),
    "output is a user folder": (lambda t, s: [s, write(t / "keep" / "a.txt", "x").parent], r"already exists"),
    "output is the checkpoint": (lambda t, s: [s, s], r"output_dir .* is also checkpoint"),
    "checkpoint is not a folder": (lambda t, s: [t / "nope", t / "merged"], r"nope is not a folder"),
}


@pytest.mark.parametrize("case", sorted(MERGE_CASES))
def test_merge_tp_shards_refuses(case, tiny_dir, tmp_path):
    from .test_predict_export import split_into_shards

    shards = split_into_shards(tiny_dir("chatglm2"), tmp_path / "tp")
    argv = MERGE_CASES[case][0](tmp_path, shards)
    assert_refused(merge_tp_shards.main, argv, MERGE_CASES[case][1], tmp_path)


def test_make_tiny_model_never_empties_the_current_folder(tmp_path, monkeypatch):
    write(tmp_path / "project" / "README.md", "mine")
    monkeypatch.chdir(tmp_path / "project")
    assert_refused(make_tiny_model.main, ["--model_type", "chatglm2", "--output_dir", "."],
                   r"--output_dir \. is the current folder", tmp_path)
    assert_refused(make_tiny_model.main, ["--model_type", "chatglm2", "--output_dir", tmp_path],
                   r"is the current folder, one that holds it", tmp_path)
    write(tmp_path / "models" / "other" / "model_state.pdparams", b"x")
    assert_refused(make_tiny_model.main, ["--model_type", "chatglm2", "--output_dir", tmp_path / "models"],
                   r"already exists and is not written by this command \(it holds other\)", tmp_path)


def dead_pid() -> int:
    """The id of a process that has exited (and was reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_stale_staging_folders_are_removed_by_the_next_run_and_only_they(tmp_path):
    """SIGTERM during an export left `.NAME.staging.*` beside the output that no later run removed (gigabytes for a
    6B). The next write to the same output removes its own dead leftovers; a live run's, another output's and a
    user's hidden folder stay."""
    from glm_tune.safe_output import atomic_folder

    out, gone = tmp_path / "infer", dead_pid()
    stale = [write(tmp_path / f".infer.staging.{gone}.k2j3" / "chatglm.pdiparams", b"w" * 1000).parent,
             write(tmp_path / f".infer.replaced.{gone}" / "chatglm.pdiparams", b"w").parent]
    kept = [write(tmp_path / f".infer.staging.{os.getpid()}.live" / "x", b"live run").parent,  # a run in progress
            write(tmp_path / f".other.staging.{gone}.a1" / "x", b"another output's").parent,
            write(tmp_path / ".infer.notes" / "x", b"the user's").parent]
    with atomic_folder(out, "test") as staging:
        write(staging / "weights", b"new")
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert (out / "weights").read_bytes() == b"new"


def test_an_output_that_was_a_symlink_leaves_no_link_behind(tmp_path):
    """make_tiny_model.py --output_dir LINK (a link to an earlier model): the link is replaced by the new folder,
    the earlier model it pointed at is untouched, and no `.LINK.replaced.PID` link is left (rmtree refuses links)."""
    from glm_tune.safe_output import atomic_folder

    earlier = write(tmp_path / "earlier" / "model_state.pdparams", b"earlier").parent
    (tmp_path / "link").symlink_to(earlier, target_is_directory=True)
    with atomic_folder(tmp_path / "link", "test", overwrite=True) as staging:
        write(staging / "model_state.pdparams", b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "link"]
    assert not (tmp_path / "link").is_symlink() and (earlier / "model_state.pdparams").read_bytes() == b"earlier"


def test_make_demo_data_keeps_a_users_data(tmp_path):
    folder = task_folder(tmp_path)
    assert_refused(make_demo_data.main, ["--output_dir", folder], r"--output_dir .*task already exists", tmp_path)
    write(folder / "notes.txt", "kept")
    make_demo_data.main(["--output_dir", str(folder), "--num_train", "5", "--num_dev", "2", "--overwrite"])
    assert (folder / "notes.txt").read_text() == "kept" and len((folder / "train.json").read_text().splitlines()) == 5
    make_demo_data.main(["--output_dir", str(folder), "--num_train", "6", "--num_dev", "2"])  # its own: no flag needed
    assert len((folder / "train.json").read_text().splitlines()) == 6


def longbench_folder(root):
    folder = Path(root) / "lb"
    write(folder / "qmsum.jsonl", json.dumps({"input": "q", "context": "c", "answers": ["a"]}) + "\n")
    return folder


LONGBENCH_CASES = {
    "output is the input": (lambda t: dict(output_file=t / "lb" / "qmsum.jsonl"), r"lies inside --input_dir"),
    "output exists": (lambda t: dict(output_file=write(t / "dev.json", GOOD_RECORD)),
                      r"--output_file .*dev\.json already exists"),
    "prompt config missing": (lambda t: dict(prompt_config=t / "nope.json"), r"nope\.json: file not found"),
    "prompt config invalid JSON": (lambda t: dict(prompt_config=write(t / "p.json", "{oops")),
                                   r"p\.json:1: malformed JSON"),
    "prompt config a list": (lambda t: dict(prompt_config=write(t / "p.json", "[]")),
                             r"p\.json holds a JSON list; it must be an object"),
    "template not a string": (lambda t: dict(prompt_config=write(t / "p.json", json.dumps({"qmsum": 3}))),
                              r"the template of 'qmsum' is a int, not a string"),
    "positional field": (lambda t: dict(prompt_config=write(t / "p.json", json.dumps({"qmsum": "{0} {context}"}))),
                         r"has the positional field \{0\}"),
    "unbalanced brace": (lambda t: dict(prompt_config=write(t / "p.json", json.dumps({"qmsum": "{context"}))),
                         r"is not a valid format string"),
    "input not a folder": (lambda t: dict(input_dir=t / "nope"), r"--input_dir .*nope is not a folder"),
}


@pytest.mark.parametrize("case", sorted(LONGBENCH_CASES))
def test_longbench_refuses(case, tmp_path):
    args = {"input_dir": longbench_folder(tmp_path), "output_file": tmp_path / "out.json",
            "prompt_config": write(tmp_path / "prompts.json", json.dumps({"qmsum": "{context} {input}"})),
            **LONGBENCH_CASES[case][0](tmp_path)}
    argv = [a for k, v in args.items() for a in (f"--{k}", v)]
    assert_refused(longbench_to_adgen.main, argv, LONGBENCH_CASES[case][1], tmp_path)


# ------------------------------------------------------------------------------------- as real processes


SCRIPT_CASES = [
    ("finetune_generation.py", lambda t, m: ft_argv(m, task_folder(t), m), r"is also --model_name_or_path"),
    ("predict_generation.py", lambda t, m: pr_argv(m, batch_size=0), r"--batch_size 0"),
    ("export_generation_model.py", lambda t, m: ["--model_name_or_path", m, "--output_path", m / "x"],
     r"is also --model_name_or_path"),
    ("infer_generation.py", lambda t, m: ["--model_path", t / "nope"], r"is not a folder"),
    ("serve_generation.py", lambda t, m: ["--model_path", t / "nope"], r"is not a folder"),
    ("tools/convert_checkpoint.py", lambda t, m: ["--input_dir", m, "--output_dir", t / "o"], r"--to hf"),
    ("tools/merge_tp_shards.py", lambda t, m: [m, t / "o"], r"nothing to merge"),
    ("tools/make_tiny_model.py", lambda t, m: ["--model_type", "chatglm2", "--output_dir", t], r"already exists"),
    ("tools/make_demo_data.py", lambda t, m: ["--output_dir", m], r"already exists"),
    ("tools/longbench_to_adgen.py", lambda t, m: ["--input_dir", m, "--prompt_config", t / "p.json",
                                                  "--output_file", t / "o.json"], r"p\.json: file not found"),
]


@pytest.mark.slow
@pytest.mark.parametrize("script, make, pattern", SCRIPT_CASES, ids=[s for s, _, _ in SCRIPT_CASES])
def test_scripts_end_bad_input_in_one_line(script, make, pattern, tiny_dir, tmp_path):
    model = copy_model(tiny_dir, "chatglm2", tmp_path / "model")
    argv = [str(a) for a in make(tmp_path, model)]
    before = snapshot(tmp_path)
    done = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and len(error_lines) == 1 and re.search(pattern, error_lines[0])
    assert snapshot(tmp_path) == before
