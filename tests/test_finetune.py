"""finetune_generation.py end to end on tiny models: learning, tensor parallel parity, LoRA, prefix, resume."""
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

import finetune_generation
from data import DataCollator, Example, get_prompt_format, tokenize_example
from glm_tune.glm_family import NotAChatGLMCheckpoint
from glm_tune.training.glm_trainer import read_log_history
from glm_tune.model_loading import ConfigurationError, apply_lora, apply_prefix, load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def finetune_argv(model_dir, data_dir, output_dir, **overrides):
    args = {
        "model_name_or_path": model_dir, "task_name_or_path": data_dir, "output_dir": output_dir,
        "src_length": 64, "tgt_length": 48, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16,
        "learning_rate": 3e-3, "warmup_steps": 2, "logging_steps": 1, "max_steps": 10, "save_steps": 1000,
        "disable_tqdm": True, "report_to": "none", "seed": 42, "do_train": True,
    }
    args.update(overrides)
    argv = []
    for key, value in args.items():
        if value is True and key.startswith("do_"):
            argv.append(f"--{key}")
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def losses(output_dir):
    return {h["step"]: h["loss"] for h in read_log_history(output_dir) if "loss" in h}


def batch_logits(model, tokenizer, model_type):
    fmt = get_prompt_format(model_type, tokenizer)
    feats = [tokenize_example(fmt, Example(s, t), 32, 16) for s, t in
             [("类型#上衣*颜色#白色", "这款衬衫白色调清爽干净。"), ("类型#裙*风格#复古", "这款连衣裙复古韵味十足。")]]
    batch = {k: paddle.to_tensor(v) for k, v in DataCollator(tokenizer, model_type)(feats).items()}
    model.eval()
    with paddle.no_grad():
        return model(**batch, return_dict=True).logits.numpy()


@pytest.mark.slow
def test_full_finetune_halves_the_loss_and_writes_artifacts(tiny_dir, demo_data, tmp_path):
    out = tmp_path / "full"
    trainer, metrics = finetune_generation.main(finetune_argv(
        tiny_dir("chatglm2"), demo_data, out, max_steps=60, do_eval=True, do_generation=True,
        max_eval_samples=16, eval_steps=60, evaluation_strategy="steps", save_steps=30))
    curve = losses(out)
    assert len(curve) == 60
    assert np.mean([curve[s] for s in range(56, 61)]) <= 0.5 * curve[1]
    for name in ["model_state.pdparams", "config.json", "tokenizer.model", "metrics.json", "loss_curve.png",
                 "checkpoint-30", "checkpoint-60"]:
        assert (out / name).exists(), name
    summary = json.loads((out / "metrics.json").read_text())
    assert {"eval_loss", "eval_accuracy", "eval_rouge-1", "eval_rouge-2", "eval_rouge-l", "eval_bleu-4"} <= set(
        summary["metrics"])
    assert 0 <= metrics["eval_rouge-1"] <= 100 and 0 <= metrics["eval_accuracy"] <= 1
    assert summary["generation"] == "chatglm2"
    # The saved folder reloads and computes the same logits as the trained model in memory.
    reloaded = load_model(str(out), "chatglm2")
    tok = load_tokenizer(str(out), "chatglm2")
    np.testing.assert_allclose(batch_logits(reloaded, tok, "chatglm2"), batch_logits(trainer.model, tok, "chatglm2"),
                               atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["chatglm", "chatglm3"])
def test_other_generations_train_and_evaluate(model_type, tiny_dir, demo_data, tmp_path):
    _, metrics = finetune_generation.main(finetune_argv(tiny_dir(model_type), demo_data, tmp_path, max_steps=20,
                                                        do_eval=True, do_generation=True, max_eval_samples=8))
    curve = losses(tmp_path)
    assert np.mean([curve[s] for s in range(16, 21)]) < 0.75 * curve[1]
    assert {"eval_loss", "eval_accuracy", "eval_rouge-1", "eval_bleu-4"} <= set(metrics)


@pytest.mark.slow
def test_lora_changes_only_adapters_and_reloads(tiny_dir, demo_data, tmp_path):
    base_file = tiny_dir("chatglm2") / "model_state.pdparams"
    base = {k: v.numpy() for k, v in paddle.load(str(base_file)).items()}
    trainer, _ = finetune_generation.main(finetune_argv(tiny_dir("chatglm2"), demo_data, tmp_path, lora=True,
                                                        lora_rank=4, learning_rate=1e-2))
    curve = losses(tmp_path)
    assert curve[10] < curve[1]
    model = trainer.model
    for name, value in model.model.state_dict().items():
        if "lora" in name:
            continue
        np.testing.assert_array_equal(value.numpy(), base[name], err_msg=name)
    lora_b = {n: v.numpy() for n, v in model.model.state_dict().items() if "lora_B" in n}
    assert lora_b and all(np.abs(v).max() > 0 for v in lora_b.values())  # initialised at zero, now trained
    assert (tmp_path / "lora_model_state.pdparams").exists() and (tmp_path / "lora_config.json").exists()
    assert not (tmp_path / "model_state.pdparams").exists()
    reloaded = apply_lora(load_model(str(tiny_dir("chatglm2")), "chatglm2"), "chatglm2", 4, 8, lora_path=str(tmp_path))
    tok = load_tokenizer(str(tiny_dir("chatglm2")), "chatglm2")
    np.testing.assert_allclose(batch_logits(reloaded, tok, "chatglm2"), batch_logits(model, tok, "chatglm2"), atol=1e-6)


@pytest.mark.slow
def test_prefix_tuning_trains_and_reloads(tiny_dir, demo_data, tmp_path):
    trainer, _ = finetune_generation.main(finetune_argv(tiny_dir("chatglm2"), demo_data, tmp_path, prefix_tuning=True,
                                                        num_prefix_tokens=8, learning_rate=3e-2, max_steps=15))
    curve = losses(tmp_path)
    assert np.mean([curve[s] for s in range(11, 16)]) < curve[1]
    assert (tmp_path / "prefix_model_state.pdparams").exists()
    base = load_model(str(tiny_dir("chatglm2")), "chatglm2", use_cache=True)
    reloaded = apply_prefix(base, "chatglm2", 8, prefix_path=str(tmp_path))
    tok = load_tokenizer(str(tiny_dir("chatglm2")), "chatglm2")
    np.testing.assert_allclose(batch_logits(reloaded, tok, "chatglm2"), batch_logits(trainer.model, tok, "chatglm2"),
                               atol=1e-6)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tiny_dir, demo_data, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    finetune_generation.main(finetune_argv(tiny_dir("chatglm2"), demo_data, full, max_steps=12, save_steps=6))
    finetune_generation.main(finetune_argv(tiny_dir("chatglm2"), demo_data, resumed, max_steps=12, save_steps=6,
                                           resume_from_checkpoint=full / "checkpoint-6"))
    a, b = losses(full), losses(resumed)
    assert sorted(b) == list(range(7, 13))
    for step in range(7, 13):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


@pytest.mark.slow
def test_auto_resume_after_a_kill_during_a_save_reaches_the_uninterrupted_loss(tiny_dir, demo_data, tmp_path,
                                                                                caplog):
    caplog.set_level(logging.INFO, logger="finetune_generation")
    common = dict(max_steps=6, save_steps=2)
    full, killed = tmp_path / "full", tmp_path / "killed"
    finetune_generation.main(finetune_argv(tiny_dir("chatglm2"), demo_data, full, **common))
    argv = finetune_argv(tiny_dir("chatglm2"), demo_data, killed, **common)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_during_save.py"), "4", *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (killed / "checkpoint-4" / "model_state.pdparams").exists()  # half-written, no completion marker
    assert not (killed / "checkpoint-4" / "checkpoint_complete.json").exists()
    finetune_generation.main(argv + ["--resume_from_checkpoint", "auto"])
    assert re.search(r"skipping \S*checkpoint-4: no checkpoint_complete\.json", caplog.text)
    assert "resuming from" in caplog.text and "checkpoint-2" in caplog.text
    a, b = losses(full), losses(killed)
    assert sorted(b) == list(range(1, 7))
    for step in range(3, 7):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    assert_train_summary_matches(full, killed, resumed_at=2, max_steps=6, batch=8)


def assert_train_summary_matches(full, resumed, resumed_at, max_steps, batch):
    """A resumed run reports the uninterrupted run's train_loss (the mean over every step: issue 27 saw the resumed
    steps' sum over all of them), and a throughput that counts only the steps it ran."""
    a, b = (json.loads((out / "metrics.json").read_text())["metrics"] for out in (full, resumed))
    assert abs(a["train_loss"] - b["train_loss"]) <= 1e-6, (a["train_loss"], b["train_loss"])
    ran = (max_steps - resumed_at) * batch
    assert b["train_samples_per_second"] * b["train_runtime"] == pytest.approx(ran, rel=0.02)
    assert a["train_samples_per_second"] * a["train_runtime"] == pytest.approx(max_steps * batch, rel=0.02)


@pytest.mark.slow
def test_resume_between_logs_reports_the_uninterrupted_train_loss(tiny_dir, demo_data, tmp_path):
    """Logging every 3 steps and saving every 2: the checkpoint falls between logs, so its loss sum must count the
    steps not yet logged."""
    common = dict(max_steps=8, save_steps=2, logging_steps=3)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    finetune_generation.main(finetune_argv(tiny_dir("chatglm2"), demo_data, full, **common))
    finetune_generation.main(finetune_argv(tiny_dir("chatglm2"), demo_data, resumed, **common,
                                           resume_from_checkpoint=full / "checkpoint-4"))
    assert_train_summary_matches(full, resumed, resumed_at=4, max_steps=8, batch=8)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_tensor_parallel_two_cpu_processes_match_single_process(method, tiny_dir, demo_data, tmp_path):
    common = dict(max_steps=3, save_steps=3, learning_rate=1e-3)
    if method == "lora":  # PaddleNLP #5965: LoRA under TP logged lr=0 and then NaN
        common.update(lora=True, lora_rank=4, learning_rate=1e-2)
    single = tmp_path / "single"
    finetune_generation.main(finetune_argv(tiny_dir("chatglm2"), demo_data, single, **common))
    tp = tmp_path / "tp"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(tmp_path / "launch_log"), str(ROOT / "finetune_generation.py"),
           *finetune_argv(tiny_dir("chatglm2"), demo_data, tp, tensor_parallel_degree=2, **common)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text(errors="replace")[-3000:] for p in sorted((tmp_path / "launch_log").glob("workerlog.*")))
    assert proc.returncode == 0, logs
    a, b = losses(single), losses(tp)
    assert abs(a[1] - b[1]) <= 1e-5, (a, b)
    for step in (2, 3):  # after optimizer steps on sharded weights
        assert abs(a[step] - b[step]) <= 1e-4, (step, a, b)
    rates = [h["learning_rate"] for h in read_log_history(tp) if "loss" in h]
    assert rates[0] > 0 and all(np.isfinite(list(b.values())))
    prefix = "lora_model_state" if method == "lora" else "model_state"
    assert (tp / f"{prefix}.tp00.pdparams").exists() and (tp / f"{prefix}.tp01.pdparams").exists()
    # PaddleNLP writes LoRA checkpoints merged (lora_model_state.pdparams), full ones per shard.
    assert list((tp / "checkpoint-3").glob(f"{prefix}*.pdparams"))
    if method == "full":
        generate_and_merge_under_the_launcher(tp, single, tmp_path)


def generate_and_merge_under_the_launcher(tp, single, tmp_path):
    """The TP run's shards generate across the two ranks, merged there by --merge_tensor_parallel_path; the merged
    folder gives the single process's logits and, in one process, the same generated text."""
    from .test_predict_export import predict_argv

    merged = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                           str(tmp_path / "predict_log"), str(ROOT / "predict_generation.py"),
                           *predict_argv(tp, merge_tensor_parallel_path=merged, output_file=tmp_path / "tp.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (tmp_path / "predict_log" / "workerlog.0").read_text()[-3000:]
    tok = load_tokenizer(str(merged), "chatglm2")
    np.testing.assert_allclose(batch_logits(load_model(str(merged), "chatglm2"), tok, "chatglm2"),
                               batch_logits(load_model(str(single), "chatglm2"), tok, "chatglm2"), atol=1e-5)
    import predict_generation

    predict_generation.main(predict_argv(merged, output_file=tmp_path / "merged.json"))
    assert (tmp_path / "tp.json").read_text() == (tmp_path / "merged.json").read_text()


@pytest.mark.slow
def test_data_parallel_evaluation_equals_the_single_process_one(tiny_dir, demo_data, tmp_path):
    """Two data-parallel CPU ranks score the dev set as one process does. PaddleNLP gathers eval logits across
    ranks before its preprocess hook, and ChatGLM3's logits are a non-contiguous view: gloo's all_gather refused
    them at the first evaluation, after all the training before it."""
    common = dict(do_train=False, do_eval=True, do_generation=True, max_eval_samples=8, per_device_eval_batch_size=2)
    trained, single, dp = tmp_path / "trained", tmp_path / "single", tmp_path / "dp"
    finetune_generation.main(finetune_argv(tiny_dir("chatglm3"), demo_data, trained))  # some tokens right
    finetune_generation.main(finetune_argv(trained, demo_data, single, **common))
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(tmp_path / "launch_log"), str(ROOT / "finetune_generation.py"),
           *finetune_argv(trained, demo_data, dp, **common)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text(errors="replace")[-3000:] for p in sorted((tmp_path / "launch_log").glob("workerlog.*")))
    assert proc.returncode == 0, logs
    a, b = (json.loads((out / "metrics.json").read_text())["metrics"] for out in (single, dp))
    assert a["eval_accuracy"] == pytest.approx(b["eval_accuracy"], abs=1e-6) and 0 < a["eval_accuracy"] < 1
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)
    assert {k: a[k] for k in ("eval_rouge-1", "eval_bleu-4")} == {k: b[k] for k in ("eval_rouge-1", "eval_bleu-4")}


@pytest.mark.slow
def test_lora_tensor_parallel_run_resumes_from_its_merged_checkpoint(tiny_dir, demo_data, tmp_path):
    """PaddleNLP saves a TP LoRA checkpoint merged (one lora_model_state.pdparams, optimizer per shard); resuming
    both ranks from it must continue the run exactly."""
    common = dict(max_steps=6, save_steps=3, learning_rate=1e-2, lora=True, lora_rank=4, tensor_parallel_degree=2)

    def launch(out, **extra):
        cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
               str(tmp_path / f"log_{out.name}"), str(ROOT / "finetune_generation.py"),
               *finetune_argv(tiny_dir("chatglm2"), demo_data, out, **common, **extra)]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, "".join(p.read_text(errors="replace")[-3000:]
                                             for p in sorted((tmp_path / f"log_{out.name}").glob("workerlog.*")))

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch(full)
    assert (full / "checkpoint-3" / "lora_model_state.pdparams").exists()
    assert (full / "checkpoint-3" / "checkpoint_complete.json").exists()  # written once both ranks saved
    launch(resumed, resume_from_checkpoint=full / "checkpoint-3")
    a, b = losses(full), losses(resumed)
    assert sorted(b) == [4, 5, 6] and b[6] < a[1]
    for step in (4, 5, 6):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a, b)


# ------------------------------------------------------------------------------------- refused up front


def run_refused(argv):
    with pytest.raises((ConfigurationError, NotAChatGLMCheckpoint, ValueError)) as err:
        finetune_generation.main(argv)
    return str(err.value)


def test_refuses_tensor_parallel_degree_that_does_not_divide_kv_groups(tiny_dir, demo_data, tmp_path):
    msg = run_refused(finetune_argv(tiny_dir("chatglm2"), demo_data, tmp_path, tensor_parallel_degree=3))
    assert "multi_query_group_num=2" in msg and "use --tensor_parallel_degree 1 or 2 or 4" in msg
    msg = run_refused(finetune_argv(tiny_dir("chatglm"), demo_data, tmp_path, tensor_parallel_degree=3))
    assert "does not divide num_attention_heads=4" in msg


def test_refuses_tensor_parallel_without_the_launcher(tiny_dir, demo_data, tmp_path):
    msg = run_refused(finetune_argv(tiny_dir("chatglm2"), demo_data, tmp_path, tensor_parallel_degree=2))
    assert "paddle.distributed.launch --nproc_per_node 2" in msg


def test_refuses_missing_dataset_files(tiny_dir, tmp_path):
    (tmp_path / "data").mkdir()
    msg = run_refused(finetune_argv(tiny_dir("chatglm2"), tmp_path / "data", tmp_path / "o"))
    assert "train.json not found" in msg
    assert not (tmp_path / "o").exists()


def test_refuses_a_folder_that_is_not_chatglm(demo_data, tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "model_type='llama'" in run_refused(finetune_argv(tmp_path / "llama", demo_data, tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in run_refused(finetune_argv(tmp_path / "empty", demo_data, tmp_path / "o"))


def test_refuses_lengths_over_the_model_sequence_length(tiny_dir, demo_data, tmp_path):
    msg = run_refused(finetune_argv(tiny_dir("chatglm3"), demo_data, tmp_path, src_length=2000, tgt_length=100))
    assert "exceeds this model's sequence length 2048" in msg


def test_refuses_half_precision_without_kernels_on_cpu(tiny_dir, demo_data, tmp_path):
    assert "--fp16 needs a GPU" in run_refused(finetune_argv(tiny_dir("chatglm2"), demo_data, tmp_path, fp16=True))
    msg = run_refused(finetune_argv(tiny_dir("chatglm2"), demo_data, tmp_path, bf16=True, fp16_opt_level="O2"))
    assert "no CPU kernels" in msg


@pytest.mark.slow
def test_recompute_gives_the_same_losses(tiny_dir, demo_data, tmp_path):
    # The 32K recipe trains long sources with recompute; it must change memory, not the numbers.
    common = dict(max_steps=3, src_length=1024, tgt_length=512, per_device_train_batch_size=4)
    finetune_generation.main(finetune_argv(tiny_dir("chatglm3"), demo_data, tmp_path / "a", **common))
    trainer, _ = finetune_generation.main(finetune_argv(tiny_dir("chatglm3"), demo_data, tmp_path / "b", recompute=True,
                                                        **common))
    assert trainer.model.chatglm_v2.encoder.enable_recompute
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert a.keys() == b.keys() == {1, 2, 3}
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6


def test_cli_prints_the_error_without_a_traceback(tiny_dir, demo_data, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "finetune_generation.py"),
                           *finetune_argv(tiny_dir("chatglm2"), tmp_path / "nowhere", tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "error: --task_name_or_path" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cpu_stand_ins_match_the_single_process_ops(tmp_path):
    # Vocab-parallel cross-entropy (forward and backward, ignore_index) and last-axis all-gather, on 2 ranks.
    out = tmp_path / "diff"
    proc = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                           str(tmp_path / "log"), str(ROOT / "tests" / "tp_ops_worker.py"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (tmp_path / "log" / "workerlog.0").read_text()[-3000:]
    for rank in (0, 1):
        diffs = json.loads(Path(f"{out}.{rank}").read_text())
        assert diffs["loss"] <= 1e-6 and diffs["grad"] <= 1e-6 and diffs["concat"] == 0.0, diffs
