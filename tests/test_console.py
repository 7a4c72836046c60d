"""What a user sees and gets: per-step loss lines with and without tqdm, no library start-up noise, a --help per
script that lists only its own flags, and output files readable by the group and others."""
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import export_generation_model

from .test_bad_inputs import task_folder

ROOT = Path(__file__).resolve().parents[1]
NOISE = re.compile(r"UserWarning|PIR pass|^[IW]\d{4} \d\d:|PyTorch version|No ccache", re.M)


def run(script, *argv, env=None):
    done = subprocess.run([sys.executable, script, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("tqdm", [True, False], ids=["tqdm", "no-tqdm"])
def test_training_prints_the_banner_and_a_loss_line_per_step(tqdm, tiny_dir, tmp_path):
    out = run("finetune_generation.py", "--model_name_or_path", tiny_dir("chatglm2"), "--task_name_or_path",
              task_folder(tmp_path, '{"content": "类型#裙", "summary": "复古"}\n' * 12), "--output_dir", tmp_path / "o",
              "--do_train", "--max_steps", 3, "--per_device_train_batch_size", 2, "--logging_steps", 1,
              "--src_length", 16, "--tgt_length", 8, "--report_to", "none", "--disable_tqdm", not tqdm)
    assert re.search(r"training: 12 examples, 3 steps, batch 2 per device x 1 accumulation x 1 data-parallel = 2 "
                     r"examples per step", out)
    losses = re.findall(r"step (\d)/3: loss (\d+\.\d+)", out)
    assert [step for step, _ in losses] == ["1", "2", "3"], out[-2000:]
    assert not NOISE.search(out), NOISE.search(out).group(0)


@pytest.mark.slow
def test_commands_are_quiet_unless_verbose(tiny_dir, tmp_path):
    export = tmp_path / "infer" / "chatglm"
    quiet = run("tools/make_tiny_model.py", "--model_type", "chatglm3", "--output_dir", tmp_path / "tiny")
    assert quiet.strip() == f"wrote tiny chatglm3 (paddle layout) to {tmp_path / 'tiny'}"
    quiet += run("export_generation_model.py", "--model_name_or_path", tiny_dir("chatglm2"), "--output_path", export,
                "--tgt_length", 4)
    for backend in ("onnxruntime", "paddle"):
        quiet += run("infer_generation.py", "--model_path", export.parent, "--batch_size", 4, "--backend", backend)
    assert not NOISE.search(quiet), NOISE.search(quiet).group(0)
    assert quiet.count("### output:") == 8
    loud = run("infer_generation.py", "--model_path", export.parent, "--batch_size", 4, "--backend", "paddle",
               env={"GLM_TUNE_VERBOSE": "1"})
    assert "PIR pass" in loud or re.search(r"^I\d{4} ", loud, re.M)


def flags(script) -> set:
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(re.findall(r"(--[a-z_]+)", done.stdout))


@pytest.mark.slow
def test_each_scripts_help_lists_only_its_own_flags():
    finetune, predict = flags("finetune_generation.py"), flags("predict_generation.py")
    export, infer = flags("export_generation_model.py"), flags("infer_generation.py")
    assert {"--lora", "--lora_rank", "--task_name_or_path", "--max_eval_samples", "--temperature",
            "--resume_from_checkpoint", "--verbose"} <= finetune
    assert not finetune & {"--merge_tensor_parallel_path", "--data_file", "--output_file"}
    assert {"--merge_tensor_parallel_path", "--data_file", "--lora_path", "--batch_size", "--verbose"} <= predict
    assert not predict & {"--task_name_or_path", "--lora_rank", "--num_prefix_tokens", "--max_eval_samples", "--lora"}
    assert {"--model_path", "--data_file", "--output_file", "--verbose"} <= infer
    assert not infer & {"--merge_tensor_parallel_path", "--model_name_or_path", "--task_name_or_path", "--lora_path"}
    assert {"--output_path", "--lora_path", "--src_length", "--overwrite", "--verbose"} <= export
    assert not export & {"--batch_size", "--decode_strategy", "--task_name_or_path", "--lora_rank", "--data_file"}


def test_exported_files_are_readable_by_group_and_others(tiny_dir, tmp_path):
    old = os.umask(0o022)
    try:
        out = export_generation_model.main(["--model_name_or_path", str(tiny_dir("chatglm2")), "--output_path",
                                            str(tmp_path / "srv" / "chatglm"), "--tgt_length", "4"])
    finally:
        os.umask(old)
    files = [p for p in out.parent.iterdir() if p.is_file()]
    assert {"chatglm.generation.json", "chatglm.json", "chatglm.pdiparams", "tokenizer.model"} <= {p.name for p in files}
    for path in files + [out.parent]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044 and not mode & 0o022, (path.name, oct(mode))
