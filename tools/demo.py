"""`make demo`: the main job end to end on a tiny ChatGLM2 and generated AdvertiseGen data, on CPU, in minutes.

    python tools/demo.py --work_dir build/demo [--max_steps 300] [--model_type chatglm2]

Steps, each through the project's own command-line scripts exactly as a user runs them:
  1. tools/make_demo_data.py      AdvertiseGen-shaped train/dev data whose summaries follow the keywords
  2. tools/make_tiny_model.py     a randomly initialised ChatGLM of the real architecture + its tokenizer
  3. finetune_generation.py       dev ROUGE/BLEU of the untrained model (evaluation only)
  4. finetune_generation.py       fine-tuning with evaluation + generation, loss curve, metrics.json
  5. export_generation_model.py   the tuned model as a step graph with a KV cache: Paddle, ONNX and ONNX int8
  6. infer_generation.py          answers from the fastest engine the export holds (ONNX Runtime, weight-only
                                  int8) and its first-token latency and decode tok/s
Prints the dev metrics before and after training and where the artefacts were written.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from glm_tune.errors import GlmTuneError, run_cli
from glm_tune.safe_output import check_output_dir, write_owner

COMMAND = "demo"
METRICS = ["rouge-1", "rouge-2", "rouge-l", "bleu-4"]


def run(step: str, args: list) -> None:
    print(f"\n=== {step}\n$ python {' '.join(str(a) for a in args)}", flush=True)
    started = time.time()
    done = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT)
    if done.returncode:
        raise GlmTuneError(f"step '{step}' failed with exit status {done.returncode}; its message is above")
    print(f"--- {step}: {time.time() - started:.0f}s", flush=True)


def eval_metrics(output_dir: Path) -> dict:
    summary = json.loads((output_dir / "metrics.json").read_text(encoding="utf-8"))
    return {k: summary["metrics"][f"eval_{k}"] for k in METRICS}


def finetune_args(model_dir, data_dir, output_dir, args) -> list:
    return ["finetune_generation.py", "--model_name_or_path", model_dir, "--task_name_or_path", data_dir,
            "--output_dir", output_dir, "--src_length", "64", "--tgt_length", "48",
            "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32",
            "--do_eval", "--do_generation", "True", "--disable_tqdm", str(args.disable_tqdm),
            "--logging_steps", "20", "--report_to", "visualdl", "--logging_dir", output_dir / "runs",
            "--overwrite_output_dir", "True"]  # inside the demo's own work folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="build/demo", help="where data, models and outputs go")
    parser.add_argument("--model_type", default="chatglm2", choices=["chatglm", "chatglm2", "chatglm3"],
                        help="generation of the tiny model")
    parser.add_argument("--max_steps", type=int, default=300, help="training steps (batch 16)")
    parser.add_argument("--disable_tqdm", default="False", help="hide progress bars (True/False)")
    parser.add_argument("--overwrite", action="store_true",
                        help="use an existing --work_dir that no demo made (everything the demo writes is replaced)")
    args = parser.parse_args(argv)
    # The demo owns its work folder: an earlier demo's (or a new one) is reused, its steps replace their outputs.
    work = check_output_dir((ROOT / args.work_dir).resolve(), COMMAND, "--work_dir", overwrite=args.overwrite)
    write_owner(work, COMMAND)
    data_dir, model_dir = work / "data" / "AdvertiseGen", work / "models" / f"tiny-{args.model_type}"
    before_dir, out_dir = work / "eval_before", work / "output" / args.model_type
    started = time.time()

    run("1. demo data", ["tools/make_demo_data.py", "--output_dir", data_dir, "--overwrite"])
    run("2. tiny model", ["tools/make_tiny_model.py", "--model_type", args.model_type, "--output_dir", model_dir,
                          "--overwrite"])
    run("3. evaluate the untrained model", finetune_args(model_dir, data_dir, before_dir, args))
    run("4. fine-tune", finetune_args(model_dir, data_dir, out_dir, args) + [
        "--do_train", "--max_steps", args.max_steps, "--learning_rate", "3e-3", "--warmup_steps", "20",
        "--evaluation_strategy", "steps", "--eval_steps", args.max_steps // 2, "--save_steps", args.max_steps // 2,
        "--save_total_limit", "2"])

    infer_dir = work / "infer" / args.model_type
    run("5. export", ["export_generation_model.py", "--model_name_or_path", out_dir, "--output_path",
                      infer_dir / "chatglm", "--src_length", "64", "--tgt_length", "48", "--quantize", "int8",
                      "--overwrite", "True"])
    # No --backend: infer picks the fastest engine the export holds (ONNX Runtime, int8) and logs its speed.
    run("6. infer on the fastest engine", ["infer_generation.py", "--model_path", infer_dir, "--model_prefix",
                                           "chatglm"])

    before, after = eval_metrics(before_dir), eval_metrics(out_dir)
    print(f"\n=== dev set ({args.model_type}, {args.max_steps} steps, {time.time() - started:.0f}s in all)")
    print(f"{'metric':<10}{'before':>10}{'after':>10}")
    for key in METRICS:
        print(f"{key:<10}{before[key]:>10.2f}{after[key]:>10.2f}")
    print(f"\nloss curve:   {out_dir / 'loss_curve.png'}\nmetrics:      {out_dir / 'metrics.json'}"
          f"\nVisualDL:     visualdl --logdir {out_dir / 'runs'}\nfine-tuned:   {out_dir}"
          f"\nexported:     {infer_dir} (python infer_generation.py --model_path {infer_dir} --interactive True)")


if __name__ == "__main__":
    run_cli(main)
